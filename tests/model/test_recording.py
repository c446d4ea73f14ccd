"""Activation recording counts the router's real choices; trace replay overrides the router."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from edgemoe.model.executor import StaticDirectory
from edgemoe.model.local import LocalExperts
from edgemoe.model.routing import RoutingTrace
from edgemoe.model.runtime import load_distributed_model, set_routing
from edgemoe.stats.recorder import ActivationRecorder
from edgemoe.stats.snapshot import ActivationSnapshot

TEXT = "Mixture of experts routes every token to a few experts out of many."


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _router_choices(ckpt, ids: torch.Tensor) -> list[np.ndarray]:
    """top_k_index that the original HF model passes to each experts module, in layer order."""
    reference = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    seen: list[np.ndarray] = []
    for name, module in reference.named_modules():
        if name.endswith(".experts") and hasattr(module, "gate_up_proj"):
            module.register_forward_pre_hook(
                lambda _m, args: seen.append(args[1].detach().numpy().copy())
            )
    with torch.no_grad():
        reference(ids)
    return seen


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_recorded_counts_equal_the_routers_choices(tiny_models, arch: str) -> None:
    ckpt, shards = tiny_models.get(arch)
    local = LocalExperts(shards).load_all()
    manifest = local.manifest
    recorder = ActivationRecorder(
        manifest.num_layers, manifest.num_experts, manifest.top_k, clock=FakeClock()
    )
    model, tokenizer = load_distributed_model(shards, StaticDirectory(local), recorder=recorder)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(ids)
    choices = _router_choices(ckpt, ids)
    assert len(choices) == manifest.num_layers
    expected = np.stack([np.bincount(c.ravel(), minlength=manifest.num_experts) for c in choices])
    snap = recorder.snapshot("node-a")
    np.testing.assert_array_equal(snap.counts, expected)
    assert snap.counts.sum() == ids.shape[1] * manifest.top_k * manifest.num_layers
    assert len(snap.coact_sets) == ids.shape[1] * manifest.num_layers
    for layer, chosen in enumerate(choices):
        sets = snap.coact_sets[snap.coact_layers == layer]
        np.testing.assert_array_equal(sets, chosen)


def test_routing_trace_overrides_the_router(tiny_models) -> None:
    _, shards = tiny_models.get("mixtral")
    local = LocalExperts(shards).load_all()
    recorder = ActivationRecorder(2, 8, 2, clock=FakeClock())
    model, tokenizer = load_distributed_model(shards, StaticDirectory(local), recorder=recorder)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    # A trace of a bigger model: 64 experts, 6 slots, 3 layers; mapped modulo onto 8 experts.
    rng = np.random.default_rng(0)
    trace_ids = rng.integers(0, 64, size=(n, 3, 6))
    trace = RoutingTrace(trace_ids, num_experts=8, top_k=2)
    set_routing(model, trace)
    with torch.no_grad():
        routed = model(ids).logits
    expected = np.zeros((2, 8))
    for layer in range(2):
        for row in trace.ids[:, layer]:
            assert row[0] != row[1]
            expected[layer, row] += 1
    np.testing.assert_array_equal(recorder.snapshot("x").counts, expected)
    set_routing(model, None)
    with torch.no_grad():
        plain = model(ids).logits
    assert not torch.allclose(routed, plain)


def test_counts_decay_with_the_half_life() -> None:
    clock = FakeClock()
    rec = ActivationRecorder(1, 4, 2, half_life_s=10.0, clock=clock)
    rec.record(0, np.array([[0, 1], [0, 2]]))
    clock.now += 10.0
    np.testing.assert_allclose(rec.snapshot("n").counts[0], [1.0, 0.5, 0.5, 0.0])
    clock.now += 20.0
    rec.record(0, np.array([[3, -1]]))
    np.testing.assert_allclose(rec.snapshot("n").counts[0], [0.25, 0.125, 0.125, 1.0])


def test_request_rate_tracks_a_steady_rate() -> None:
    clock = FakeClock()
    rec = ActivationRecorder(1, 4, 2, half_life_s=5.0, clock=clock)
    for _ in range(400):
        clock.now += 0.25  # 4 requests per second
        rec.note_request()
    assert rec.snapshot("n").request_rate == pytest.approx(4.0, rel=0.1)
    clock.now += 50.0
    assert rec.snapshot("n").request_rate < 0.01


def test_reservoir_stays_bounded_and_samples_everything_seen() -> None:
    rec = ActivationRecorder(2, 16, 2, reservoir=50, clock=FakeClock(), seed=3)
    for layer in (0, 1):
        for start in range(0, 1000, 10):
            rec.record(layer, np.stack([np.arange(start, start + 10) % 16, np.full(10, 7)], 1))
    snap = rec.snapshot("n")
    assert snap.coact_sets.shape == (50, 2) and snap.coact_layers.shape == (50,)
    assert set(snap.coact_layers.tolist()) == {0, 1}
    assert (snap.coact_sets[:, 1] == 7).all()


def test_snapshot_wire_round_trip_through_msgpack() -> None:
    rec = ActivationRecorder(3, 8, 2, clock=FakeClock())
    rec.record(1, np.array([[1, 2], [3, 4]]))
    rec.note_request()
    first = rec.snapshot("node-7")
    second = rec.snapshot("node-7")
    assert second.version == first.version + 1
    wire = msgpack.unpackb(msgpack.packb(second.to_wire()), raw=False)
    back = ActivationSnapshot.from_wire(wire)
    assert back.origin == "node-7" and back.version == second.version
    np.testing.assert_array_equal(back.counts, second.counts)
    np.testing.assert_array_equal(back.coact_sets, second.coact_sets)
    np.testing.assert_array_equal(back.coact_layers, second.coact_layers)
    assert back.request_rate == second.request_rate
    broken = dict(wire, counts=dict(wire["counts"], shape=[5, 5]))
    with pytest.raises(ValueError, match="shape"):
        ActivationSnapshot.from_wire(broken)
    with pytest.raises(ValueError):
        ActivationSnapshot.from_wire({"wire": 1})


def test_replaying_the_real_deepseek_trace_drives_the_tiny_model(tiny_models) -> None:
    from pathlib import Path

    path = (
        Path(__file__).resolve().parents[3]
        / "shared/traces/esft_deepseek_v2_lite_4tasks_routing.npz"
    )
    if not path.exists():
        pytest.skip(f"{path} not present")
    z = np.load(path)
    ids, weights = z["law_expert_ids"][:40], z["law_weights"][:40]
    _, shards = tiny_models.get("deepseek_v2")
    local = LocalExperts(shards).load_all()
    recorder = ActivationRecorder(2, 8, 2, clock=FakeClock())
    trace = RoutingTrace(ids, num_experts=8, top_k=2, weights=weights)
    model, _ = load_distributed_model(
        shards, StaticDirectory(local), recorder=recorder, routing=trace
    )
    prompt = torch.arange(3, 43)[None, :]
    with torch.no_grad():
        model(prompt)
    expected = np.zeros((2, 8))
    for layer in (0, 1):
        for row in trace.ids[:, layer]:
            expected[layer, row] += 1
    np.testing.assert_array_equal(recorder.snapshot("x").counts, expected)
    assert np.allclose(trace.weights.sum(axis=2), 1.0)


def test_queued_records_count_as_if_counted_when_recorded() -> None:
    """Records are queued and counted together (`FOLD_EVERY`, or a snapshot): each id still
    decays from its own record's time, and the reservoir fills in recording order."""
    from edgemoe.stats.recorder import FOLD_EVERY

    clock = FakeClock()
    rec = ActivationRecorder(3, 8, 2, half_life_s=7.0, reservoir=FOLD_EVERY * 4, clock=clock)
    rng = np.random.default_rng(5)
    expected = np.zeros((3, 8))
    rows: list[tuple[int, list[int]]] = []
    for i in range(FOLD_EVERY * 2 + 37):  # folds when full, then the rest at the snapshot
        dt = float(rng.uniform(0.0, 0.05))
        clock.now += dt
        expected *= 0.5 ** (dt / 7.0)
        layer = int(rng.integers(0, 3))
        ids = rng.integers(-1, 8, size=(int(rng.integers(1, 3)), 2))
        rec.record(layer, ids)
        for row in ids:
            np.add.at(expected[layer], row[row >= 0], 1)
            rows.append((layer, row.tolist()))
        if i == FOLD_EVERY + 5:  # a snapshot in between counts what is queued so far
            np.testing.assert_allclose(rec.snapshot("n").counts, expected, rtol=1e-9)
    snap = rec.snapshot("n")
    np.testing.assert_allclose(snap.counts, expected, rtol=1e-9)
    assert [(int(layer), s.tolist()) for layer, s in zip(snap.coact_layers, snap.coact_sets,
                                                        strict=True)] == rows  # fmt: skip


def test_reservoir_rows_are_cut_or_padded_to_top_k() -> None:
    """Rows wider than top-k keep their first k ids; narrower ones are padded with -1, in the
    order recorded, whether a fold holds only k-wide records or a mix."""
    rec = ActivationRecorder(2, 8, 2, reservoir=16, clock=FakeClock())
    rec.record(0, np.array([[1, 2]]))
    rec.record(1, np.array([[3, 4, 5], [6, 7, 0]]))
    rec.record(0, np.array([[5]]))
    snap = rec.snapshot("n")
    assert snap.coact_layers.tolist() == [0, 1, 1, 0]
    assert snap.coact_sets.tolist() == [[1, 2], [3, 4], [6, 7], [5, -1]]
    rec.record(1, np.array([[2, 3]]))
    assert rec.snapshot("n").coact_sets.tolist()[-1] == [2, 3]
