"""Trace replay in the daemon: each request follows its own recorded request's routing."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from edgemoe.daemon.config import ConfigError, load_config
from edgemoe.daemon.engine import GenerationParams, InferenceEngine
from edgemoe.daemon.replay import install_replay, load_replay
from edgemoe.model.executor import StaticDirectory
from edgemoe.model.local import LocalExperts
from edgemoe.model.manifest import Manifest
from edgemoe.model.runtime import load_distributed_model

from .conftest import SECRET, TinyModel, make_node, wait_for

LAYERS, EXPERTS, TOP_K = 2, 8, 2  # the tiny Mixtral of conftest
# request lengths: prefill takes the first half of a request's rows, decode one row a step
LENGTHS = (6, 6, 4)


def _trace(path: Path, seed: int = 1) -> np.ndarray:
    """A stream 'task' of len(LENGTHS) requests with distinct expert pairs per row."""
    rng = np.random.default_rng(seed)
    total = sum(LENGTHS)
    ids = np.stack([[rng.choice(EXPERTS, TOP_K, replace=False) for _ in range(LAYERS)]
                    for _ in range(total)]).astype(np.uint8)  # fmt: skip
    off = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
    weights = rng.random(ids.shape).astype(np.float16)
    np.savez(path, task_expert_ids=ids, task_req_offsets=off, task_weights=weights)
    return ids.astype(np.int64)


class PerThreadRecorder:
    """Keeps each model thread's routing as the experts module used it; the first record of
    each thread waits until `parties` threads are inside a generation."""

    def __init__(self, parties: int) -> None:
        self.seen: dict[int, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
        self._barrier = threading.Barrier(parties, timeout=30)
        self._started: set[int] = set()

    def record(self, layer: int, ids: np.ndarray) -> None:
        me = threading.get_ident()
        self.seen[me][layer].append(ids.copy())
        if me not in self._started:
            self._started.add(me)
            self._barrier.wait()

    def routing(self) -> list[np.ndarray]:
        """Per thread: [tokens, layers, top_k] as recorded."""
        return [np.stack([np.concatenate(per[l]) for l in range(LAYERS)], axis=1)
                for per in self.seen.values()]  # fmt: skip


def _engine(tiny: TinyModel, recorder: PerThreadRecorder, trace: Path) -> InferenceEngine:
    local = LocalExperts(tiny.shard_dir).load_all()
    model, tok = load_distributed_model(tiny.shard_dir, StaticDirectory(local), recorder=recorder)
    engine = InferenceEngine(model, tok)
    install_replay(engine, load_replay(trace, "task", Manifest.load(tiny.shard_dir)))
    return engine


def _same_set(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(np.sort(a, axis=-1), np.sort(b, axis=-1)))


def _params(rows: int) -> tuple[list[int], GenerationParams]:
    """A prompt of half the rows; the rest one decode step each (the last token needs none)."""
    half = rows // 2
    new = rows - half + 1
    return list(range(5, 5 + half)), GenerationParams(max_tokens=new, min_tokens=new)


async def test_a_replayed_request_routes_exactly_by_its_trace_rows(
    tiny: TinyModel, tmp_path: Path
) -> None:
    ids = _trace(tmp_path / "t.npz")
    recorder = PerThreadRecorder(parties=1)
    engine = _engine(tiny, recorder, tmp_path / "t.npz")
    try:
        prompt, params = _params(LENGTHS[0])
        result = await engine.generate(prompt, params)
    finally:
        engine.close()
    assert len(result.token_ids) == params.max_tokens  # ran its length (EOS ignored)
    (seen,) = recorder.routing()
    assert seen.shape == (LENGTHS[0], LAYERS, TOP_K)
    assert _same_set(seen, ids[: LENGTHS[0]])


async def test_two_concurrent_replayed_requests_each_get_their_own_rows(
    tiny: TinyModel, tmp_path: Path
) -> None:
    ids = _trace(tmp_path / "t.npz", seed=2)
    recorder = PerThreadRecorder(parties=1)
    engine = _engine(tiny, recorder, tmp_path / "t.npz")
    try:
        prompt, params = _params(LENGTHS[0])  # requests 0 and 1 have the same length
        await asyncio.gather(engine.generate(prompt, params), engine.generate(prompt, params))
    finally:
        engine.close()
    # both ran in the batch scheduler's thread, sharing decode passes: between them they used
    # each of their requests' rows exactly once (rows of a pass follow their own requests)
    (seen,) = recorder.routing()
    (per_layer,) = recorder.seen.values()
    assert {len(rows) for rows in per_layer[0]} >= {2}  # decode passes of both requests at once
    both = ids[: LENGTHS[0] + LENGTHS[1]]
    assert seen.shape == both.shape
    for layer in range(LAYERS):
        got = sorted(map(tuple, np.sort(seen[:, layer], axis=-1)))
        want = sorted(map(tuple, np.sort(both[:, layer], axis=-1)))
        assert got == want


def test_replay_keys_are_checked_at_start(tmp_path: Path) -> None:
    _trace(tmp_path / "t.npz")
    base = {"secret": SECRET, "state_dir": str(tmp_path)}
    cfg = load_config(None, {**base, "routing_trace": str(tmp_path / "t.npz"),
                             "routing_stream": "task"}, env={})  # fmt: skip
    assert cfg.routing_stream == "task"
    with pytest.raises(ConfigError, match=r"routing_stream: 'law' not in t\.npz; it has: task"):
        load_config(None, {**base, "routing_trace": str(tmp_path / "t.npz"),
                           "routing_stream": "law"}, env={})  # fmt: skip
    with pytest.raises(ConfigError, match="give both"):
        load_config(None, {**base, "routing_trace": str(tmp_path / "t.npz")}, env={})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, {**base, "routing_trace": str(tmp_path / "none.npz"),
                           "routing_stream": "task"}, env={})  # fmt: skip


def test_a_daemon_replaying_a_trace_counts_only_the_traces_experts(
    tiny: TinyModel, tmp_path: Path
) -> None:
    ids = _trace(tmp_path / "t.npz", seed=3)
    node = make_node(tmp_path, "replay", shard_dir=tiny.shard_dir, cluster_id="replay",
                     capacity="100%", mdns=False)  # fmt: skip
    node.env = {"EDGEMOE_ROUTING_TRACE": str(tmp_path / "t.npz"), "EDGEMOE_ROUTING_STREAM": "task"}
    node.start()
    try:
        node.wait_ready(120)
        for _ in range(len(LENGTHS)):  # one pass over the stream's requests
            status, body = node.request("POST", "/v1/completions", {
                "prompt": "abc", "max_tokens": 5, "ignore_eos": True, "temperature": 0,
            })  # fmt: skip
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 5
        status, bad = node.request("POST", "/v1/completions",
                                   {"prompt": "abc", "max_tokens": 3, "min_tokens": 4})
        assert status == 400 and "min_tokens" in str(bad)

        def counts() -> list | None:
            stats = node.cluster()["stats"].get(node.node_id)
            return stats["counts"] if stats and np.sum(stats["counts"]) > 0 else None

        seen = np.asarray(wait_for(counts, 60, "the node's statistics snapshot"))
    finally:
        node.stop()
    used = np.zeros((LAYERS, EXPERTS), dtype=bool)
    for l in range(LAYERS):
        used[l, np.unique(ids[:, l])] = True
    assert (seen[~used] == 0).all()  # the model's own routers never chose
    assert (seen[used] > 0).sum() >= 2
