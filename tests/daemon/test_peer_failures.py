"""Peers that freeze, leave or lose an expert while a node generates (bugs the chaos harness
found): every request ends within its deadline with the right tokens or a clear JSON error,
a leaving node never answers from its closed cluster state, and an expert fetched to run here
survives a concurrent drop."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edgemoe.daemon.metrics import DaemonMetrics
from edgemoe.daemon.remote import Router
from edgemoe.model.local import LocalExperts
from edgemoe.model.manifest import Manifest

from .conftest import (
    PROMPTS,
    Cluster,
    Node,
    PeersWithoutClients,
    TinyModel,
    make_node,
    wait_for,
)

DEADLINE_S = 30.0  # the chaos clients' deadline: a request must end before it


def _ask(node: Node, prompt: str = PROMPTS[0]) -> tuple[int, object, float]:
    start = time.monotonic()
    status, body = node.request("POST", "/v1/completions", {
        "prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=DEADLINE_S + 30)  # fmt: skip
    return status, body, time.monotonic() - start


@pytest.fixture
def pair(tiny: TinyModel, tmp_path: Path) -> Iterator[Cluster]:
    """A seed that holds every expert and a fresh node with room for a third of them: most of
    the fresh node's experts live only on the seed."""
    cid = f"pf-{os.getpid()}-{tmp_path.name[-12:]}"
    seed = make_node(tmp_path, "seed", shard_dir=tiny.shard_dir, cluster_id=cid,
                     capacity="100%")  # fmt: skip
    fresh = make_node(tmp_path, "fresh", shard_dir=None, cluster_id=cid, capacity="30%")
    cluster = Cluster([seed, fresh], tmp_path, cid)
    for node in cluster.nodes:
        node.start()
    try:
        for node in cluster.nodes:
            node.wait_ready(180)
        # before any request: one sent before the holdings are known is computed here from
        # fetched shards, and those stay loaded until the node's next announcement
        wait_for(lambda: all(all(n.cluster()["holdings"].get(m.node_id) for m in cluster.nodes)
                             for n in cluster.nodes), 90,
                 "both nodes to announce holdings, seen by both")  # fmt: skip
        yield cluster
    finally:
        for node in cluster.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
        cluster.stop()


def _reference_answer(node: Node, tiny: TinyModel) -> bool:
    status, body, _ = _ask(node)
    return status == 200 and body["choices"][0]["token_ids"] == tiny.reference[PROMPTS[0]][:8]


def test_a_request_whose_only_holder_is_frozen_ends_with_a_503_then_succeeds_after_thaw(
    pair: Cluster, tiny: TinyModel
) -> None:
    seed, fresh = pair.nodes
    assert _reference_answer(fresh, tiny)
    assert seed.proc is not None
    seed.proc.send_signal(signal.SIGSTOP)  # a frozen box: it accepts connections, never answers
    try:
        # then only the files of the experts it holds on the fresh node's disk (its standby
        # copies or an earlier epoch's would be computed from without asking anyone; frozen
        # first, so the standby loop cannot fetch them back from the seed)
        held = set(fresh.cluster()["holdings"][fresh.node_id])
        for path in (fresh.state_dir / "model" / "experts").glob("L*/E*.safetensors"):
            if f"{path.parent.name[1:]}/{path.stem[1:]}" not in held:
                path.unlink()
        status, body, took = _ask(fresh)
    finally:
        seed.proc.send_signal(signal.SIGCONT)
    assert took < DEADLINE_S, f"the request took {took:.1f}s"
    assert status == 503, body
    assert "could not" in body["error"]["message"] or "answered" in body["error"]["message"]
    wait_for(lambda: _reference_answer(fresh, tiny), 90, "a right answer once the seed thaws",
             interval=1.0)  # fmt: skip


def test_requests_around_a_leave_end_in_time_and_the_leaver_never_answers_from_a_closed_store(
    pair: Cluster, tiny: TinyModel
) -> None:
    """The seed leaves (SIGTERM) while the fresh node generates: every request, during the
    leave and after, ends within the deadline with the reference tokens or a clear 503; the
    seed exits 0 and never answers a peer from its closed cluster state (it stops listening
    before it closes it)."""
    seed, fresh = pair.nodes
    assert seed.proc is not None
    seed.proc.send_signal(signal.SIGTERM)
    outcomes = []
    while seed.proc.poll() is None and len(outcomes) < 20:
        outcomes.append(_ask(fresh))
    code = seed.proc.wait(60)
    outcomes += [_ask(fresh) for _ in range(2)]
    assert code == 0, seed.log()
    assert "closed database" not in seed.log_path.read_text(errors="replace")
    for status, body, took in outcomes:
        assert took < DEADLINE_S, f"a request took {took:.1f}s"
        assert status in (200, 503), body
        if status == 200:
            assert body["choices"][0]["token_ids"] == tiny.reference[PROMPTS[0]][:8]
        else:
            assert body["error"]["code"] == 503


def test_an_expert_fetched_to_run_here_survives_a_concurrent_drop(tiny: TinyModel) -> None:
    """The failover loads an orphan expert and computes it; a migration dropping it between
    the two (as `_drop_strays` does on the next announcement) must not fail the call."""
    manifest = Manifest.load(tiny.shard_dir)
    local = LocalExperts(tiny.shard_dir)
    full = LocalExperts(tiny.shard_dir).load_all()
    torch.manual_seed(0)
    hidden = torch.randn(5, manifest.hidden_size)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]])
    weights = torch.rand(5, 2)
    dropped: list[tuple[int, int]] = []

    async def fetch_and_load(layer: int, expert: int) -> None:
        await asyncio.to_thread(local.load, layer, expert)
        local.drop(layer, expert)  # the migration's drop lands before the compute
        dropped.append((layer, expert))

    async def run() -> torch.Tensor:
        peers = PeersWithoutClients(alive=False)
        router = Router("me", local, peers, asyncio.get_running_loop(), DaemonMetrics(),
                        fetch_and_load)  # fmt: skip
        return await router.compute(0, hidden, ids, weights, None)

    out = asyncio.run(run())
    assert sorted(dropped) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert torch.allclose(out, full.forward(0, hidden, ids, weights), atol=1e-6)


def test_an_expert_dropped_between_routing_and_compute_is_computed_anyway(
    tiny: TinyModel,
) -> None:
    """The model thread asks the router for an expert's executor, a migration drops the
    expert, then the model thread computes: the step must not fail with 'not held here'."""
    manifest = Manifest.load(tiny.shard_dir)
    local = LocalExperts(tiny.shard_dir)
    local.load(1, 2)
    full = LocalExperts(tiny.shard_dir).load_all()
    torch.manual_seed(1)
    hidden = torch.randn(3, manifest.hidden_size)
    ids = torch.tensor([[2, -1], [2, -1], [-1, 2]])
    weights = torch.rand(3, 2)

    async def fetch_and_load(layer: int, expert: int) -> None:
        await asyncio.to_thread(local.load, layer, expert)

    async def run() -> torch.Tensor:
        peers = PeersWithoutClients(alive=False)
        router = Router("me", local, peers, asyncio.get_running_loop(), DaemonMetrics(),
                        fetch_and_load)  # fmt: skip
        executor = router.executor_for(1, 2)  # held here: computed in the model thread
        local.drop(1, 2)  # the migration's drop lands in between
        # the model thread is not the event loop's: it blocks on the failover's future
        return await asyncio.to_thread(
            lambda: executor.submit(1, hidden, ids, weights).result(timeout=60))

    out = asyncio.run(run())
    assert torch.allclose(out, full.forward(1, hidden, ids, weights), atol=1e-6)
