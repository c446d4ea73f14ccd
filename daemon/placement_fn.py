"""The daemon's placement function: members' capacities and activation snapshots -> which node
holds which experts, computed by an `edgemoe.placement` strategy. Deterministic for the same
inputs (members sorted by id), so any acceptor can recompute a proposal.

`PlacementSolver` computes it on a worker thread, so the event loop (membership probes,
gossip, expert RPC) keeps running while a placement takes a second or more on a busy CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from edgemoe.cluster.consensus import PlacementPending
from edgemoe.stats.snapshot import ActivationSnapshot

Assignment = dict[str, set[tuple[int, int]]]
LAN_RTT_S = 2e-4
LAN_BANDWIDTH_BPS = 1e9
# What one more peer call costs a holder: the daemons' CPU per expert call served (signed,
# sealed msgpack over aiohttp, then the answer back). Fitted from the namespace testbed's
# per-node CPU seconds and call counts on the 2-core development box: 1.3-1.7 ms served,
# 0.9-1.9 ms made; a bare signed msgpack echo (`bench calibrate`) is 0.2-0.5 ms a round
# trip. The Problem's own default (0.1 ms) priced a layer split over two peers at almost
# nothing, and on the testbed's recorded snapshots edgemoe then chose placements making
# 2.96-3.16 calls per decode token against layers' 2.67; at >= 0.5 ms it makes 2.64-2.65.
# The same on every node (acceptors recompute proposals), so a constant, not a measurement.
CALL_OVERHEAD_S = 1e-3


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int
    hidden_size: int
    activation_bytes: int = 4


def build_problem(
    shape: ModelShape,
    capacities: Mapping[str, int],
    snapshots: Mapping[str, ActivationSnapshot],
):  # type: ignore[no-untyped-def]
    """An `edgemoe.placement.Problem` for these members (sorted by node id)."""
    from edgemoe.placement.problem import Problem

    names = tuple(sorted(capacities))
    S, L, E, K = len(names), shape.num_layers, shape.num_experts, shape.top_k
    counts = np.zeros((S, L, E))
    servers, layers, sets, rate = [], [], [], np.zeros(S)
    for i, name in enumerate(names):
        snap = snapshots.get(name)
        if snap is None or snap.counts.shape != (L, E):
            continue
        counts[i] = np.maximum(snap.counts, 0.0)
        rate[i] = max(0.0, float(snap.request_rate))
        ok = (snap.coact_sets.shape[1] == K) if snap.coact_sets.ndim == 2 else False
        if ok and len(snap.coact_layers):
            valid = (snap.coact_sets >= 0).all(1) & (snap.coact_sets < E).all(1)
            valid &= (snap.coact_layers >= 0) & (snap.coact_layers < L)
            layers.append(snap.coact_layers[valid])
            sets.append(snap.coact_sets[valid])
            servers.append(np.full(int(valid.sum()), i))
    if rate.sum() <= 0:
        rate[:] = 1.0
    rtt = np.full((S, S), LAN_RTT_S)
    np.fill_diagonal(rtt, 0.0)
    return Problem(
        capacity_bytes=np.array([float(capacities[n]) for n in names]),
        compute_speed=np.ones(S),
        rtt_s=rtt,
        bandwidth_bps=np.full((S, S), LAN_BANDWIDTH_BPS),
        num_layers=L,
        num_experts=E,
        top_k=K,
        expert_bytes=shape.expert_bytes,
        hidden_size=shape.hidden_size,
        call_overhead_s=CALL_OVERHEAD_S,
        counts=counts,
        sample_server=np.concatenate(servers) if servers else np.zeros(0, dtype=np.int64),
        sample_layer=np.concatenate(layers) if layers else np.zeros(0, dtype=np.int64),
        sample_sets=np.concatenate(sets) if sets else np.zeros((0, K), dtype=np.int64),
        request_rate=rate,
        activation_bytes=shape.activation_bytes,
        server_names=names,
    )


def feasible_capacities(shape: ModelShape, capacities: Mapping[str, int]) -> dict[str, int]:
    """Capacities scaled up (deterministically) until every expert fits once: a cluster too
    small for the model still serves, its members over-committed, rather than not at all."""
    need = shape.num_layers * shape.num_experts
    caps = {n: max(0, int(c)) for n, c in capacities.items()}
    slots = sum(c // shape.expert_bytes for c in caps.values())
    if slots >= need or not caps:
        return caps
    total = sum(caps.values())
    share = {n: (c / total if total > 0 else 1 / len(caps)) for n, c in caps.items()}
    grown = {n: int(np.ceil(need * share[n]) + 1) * shape.expert_bytes for n in caps}
    return {n: max(caps[n], grown[n]) for n in caps}


def place(
    strategy: str,
    shape: ModelShape,
    capacities: Mapping[str, int],
    snapshots: Mapping[str, ActivationSnapshot],
) -> tuple[Assignment, dict[str, dict[tuple[int, int], str]]]:
    """(node -> held experts, node -> {expert: node it calls}) from the named strategy."""
    from edgemoe.placement import get_strategy

    problem = build_problem(shape, feasible_capacities(shape, capacities), snapshots)
    # Every acceptor recomputes a proposal and must get the same answer: the strategies'
    # searches are bounded by counts of work, never by wall-clock time.
    result = get_strategy(strategy).place(problem)
    names = problem.server_names
    assignment = {name: result.held_by(i) for i, name in enumerate(names)}
    routes: dict[str, dict[tuple[int, int], str]] = {}
    for i, name in enumerate(names):
        ls, es = np.nonzero(~result.holders[i])
        routes[name] = {
            (int(l), int(e)): names[int(result.route[i, l, e])] for l, e in zip(ls, es, strict=True)
        }
    return assignment, routes


InputsT = TypeVar("InputsT")
ResultT = TypeVar("ResultT")


class Solving(PlacementPending):
    """The placement of these inputs is being computed; `ready` completes when it is."""

    def __init__(self, ready: asyncio.Future[Any]) -> None:
        super().__init__("placement is being computed")
        self.ready = ready


# A queued computation nobody asked for within this long is dropped before it starts: the
# core re-asks the placement its proposal waits on every 50 ms, and an acceptor awaits the one
# it checks, so only inputs that changed since (statistics republished, a member gone) go
# stale. Without it, each change queued one more 1-3 s solve ahead of the one still wanted.
STALE_S = 2.0


@dataclass
class _Job(Generic[InputsT]):
    inputs: InputsT
    done: asyncio.Future[Any]  # True once computed; None when dropped before it ran
    asked: float  # loop time of the latest lookup or solve
    order: int  # when first asked: the newest wanted job runs first
    waiters: int = 0  # solve() calls awaiting it (never dropped while awaited)


class PlacementSolver(Generic[InputsT, ResultT]):
    """`compute` run on one worker thread, its last `memo` outcomes remembered by `key`.

    The core asks synchronously (`lookup`, on the event loop): a remembered outcome is
    returned (or its exception raised again); otherwise its computation is queued, once, and
    `Solving` tells the caller to ask again (`on_ready` is called on the loop when it is done;
    the `ready` future also completes, with None, when the job was dropped as stale). Queued
    jobs run newest first, and one not asked for within STALE_S is dropped unstarted.
    `solve` awaits the outcome. The same `compute` runs whichever thread asks, so the result
    is as deterministic as `compute`."""

    def __init__(
        self,
        compute: Callable[[InputsT], ResultT],
        key: Callable[[InputsT], Hashable],
        *,
        memo: int = 8,
        on_ready: Callable[[], None] = lambda: None,
        stale_s: float = STALE_S,
    ) -> None:
        self.compute = compute
        self.key = key
        self.memo = memo
        self.on_ready = on_ready
        self.stale_s = stale_s
        self._done: dict[Hashable, tuple[ResultT | None, BaseException | None]] = {}  # oldest first
        self._queued: dict[Hashable, _Job[InputsT]] = {}  # the running one included
        self._running: Hashable | None = None
        self._asked = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="placement")
        self.computed = 0
        self.dropped = 0

    def lookup(self, inputs: InputsT) -> ResultT:
        k = self.key(inputs)
        if k in self._done:
            value, exc = self._done[k]
            if exc is not None:
                raise exc
            return value  # type: ignore[return-value]
        raise Solving(self._start(k, inputs).done)

    async def solve(self, inputs: InputsT) -> ResultT:
        k = self.key(inputs)
        while k not in self._done:
            job = self._start(k, inputs)
            job.waiters += 1
            try:
                await asyncio.shield(job.done)
            finally:
                job.waiters -= 1
        return self.lookup(inputs)

    def _start(self, k: Hashable, inputs: InputsT) -> _Job[InputsT]:
        loop = asyncio.get_running_loop()
        job = self._queued.get(k)
        if job is None:
            self._asked += 1
            job = self._queued[k] = _Job(inputs, loop.create_future(), loop.time(), self._asked)
        job.asked = loop.time()
        self._next()
        return job

    def _next(self) -> None:
        """Start the newest wanted job when the worker is free; drop the stale ones."""
        if self._running is not None:
            return
        loop = asyncio.get_running_loop()
        for k, job in list(self._queued.items()):
            if job.waiters == 0 and loop.time() - job.asked > self.stale_s:
                del self._queued[k]
                self.dropped += 1
                if not job.done.done():
                    job.done.set_result(None)
        if not self._queued:
            return
        k = max(self._queued, key=lambda q: self._queued[q].order)
        self._running = k
        fut = loop.run_in_executor(self._pool, self._outcome, self._queued[k].inputs)
        fut.add_done_callback(lambda f: self._finish(k, f))

    def _outcome(self, inputs: InputsT) -> tuple[ResultT | None, BaseException | None]:
        try:
            return self.compute(inputs), None
        except Exception as exc:  # raised again to whoever looks it up
            return None, exc

    def _finish(self, k: Hashable, fut: asyncio.Future[Any]) -> None:
        self._running = None
        job = self._queued.pop(k)
        if fut.cancelled():
            job.done.cancel()
            return
        self._done[k] = fut.result()
        self.computed += 1
        while len(self._done) > self.memo:
            del self._done[next(iter(self._done))]
        job.done.set_result(True)
        self.on_ready()
        self._next()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
