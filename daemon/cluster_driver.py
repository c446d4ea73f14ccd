"""Drives the sans-IO cluster core (`edgemoe.cluster.node.Node`) with real time and sockets.

Timers: one task sleeps until the core's next deadline (or a message wakes it) and ticks it.
Messages: every (destination, message) of an `Outbox` is POSTed to the destination's
``/v1/gossip`` (signed msgpack); received ones go to `Node.handle`. Effects: members found or
lost update the peer set and routing; `FetchShard` runs the migration executor (pull, verify,
load) and reports `shard_loaded`; `DropShard` frees memory the core says is safe to free.
The placement function is an `edgemoe.placement` strategy over the members' capacities and
activation snapshots (deterministic, so acceptors can recompute proposals), computed on a
worker thread (`PlacementSolver`): the core's proposal waits for it (`PlacementPending`), an
Accept is handed to the core once its value's placement is computed, and meanwhile the timers
keep ticking membership. The drift measure
(`edgemoe.stats.drift`) lets the core start an epoch by itself when the members' statistics
moved away from those the current placement was computed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.consensus import PlacementInputs, build_proposal, placement_inputs
from edgemoe.cluster.effects import (
    AnnounceHolding,
    Decided,
    DropShard,
    FetchShard,
    MemberAlive,
    MemberDead,
    MemberSuspect,
)
from edgemoe.cluster.messages import (
    Accept,
    MessageError,
    Promise,
    Proposal,
    Snapshot,
    from_wire,
    to_wire,
)
from edgemoe.cluster.node import Node
from edgemoe.cluster.outbox import Outbox
from edgemoe.cluster.storage import SqliteStorage
from edgemoe.daemon.migration import MigrationExecutor
from edgemoe.daemon.peers import PeerError
from edgemoe.daemon.placement_fn import ModelShape, PlacementSolver, Solving, place
from edgemoe.daemon.wire import WireError
from edgemoe.stats.drift import statistics_drift
from edgemoe.stats.snapshot import ActivationSnapshot

if TYPE_CHECKING:
    from edgemoe.daemon.node import Daemon

log = logging.getLogger(__name__)
GOSSIP_PATH = "/v1/gossip"
STATS_INTERVAL_S = 3.0
MAX_SENDS_IN_FLIGHT = 64
PLACEMENT_MEMO = 8  # placements remembered (a few candidate values per epoch)
HANDOVER_TIMEOUT_S = 10.0
PENDING_RETRIES = 4  # an operator's epoch request waits at most this many placements
FETCH_BACKOFF_S = 0.5
FETCH_BACKOFF_MAX_S = 8.0
# Seconds a received Accept/Promise waits for its value's placement before it is answered
# unhandled (a placement takes 15-18 s of wall time on a loaded 2-core box; the proposer
# resends every consensus_resend)
SOLVE_WAIT_S = 0.5


def _snapshot(payload: Any) -> ActivationSnapshot | None:
    try:
        return ActivationSnapshot.from_wire(payload)
    except Exception:  # a malformed statistics payload counts as no statistics
        return None


class ClusterDriver:
    """Owns the core of one daemon; `start()` / `leave()` / `stop()`."""

    def __init__(self, daemon: Daemon, *, genesis: Iterable[str] = (),
                 config: ClusterConfig | None = None) -> None:  # fmt: skip
        manifest = daemon.store.manifest
        assert manifest is not None and daemon.local is not None
        self.d = daemon
        self.strategy = daemon.config.strategy
        self.shape = ModelShape(
            manifest.num_layers, manifest.num_experts, manifest.top_k, manifest.expert_bytes,
            manifest.hidden_size,
        )  # fmt: skip
        self.storage = SqliteStorage(daemon.config.state_dir / "consensus.sqlite")
        self._counts: dict[int, tuple[Any, np.ndarray | None]] = {}  # id(payload) -> counts
        self.core = Node(
            daemon.node_id, daemon.url, daemon.capacity_bytes, storage=self.storage,
            placement=self._placement, genesis=genesis, config=config or self._config(),
            drift=self._drift,
        )  # fmt: skip
        self.migration = MigrationExecutor(daemon.local, daemon.fetch_and_load,
                                           manifest.expert_bytes)  # fmt: skip
        self._routes: dict[int, dict[str, dict[tuple[int, int], str]]] = {}
        self._wake = asyncio.Event()
        self.solver: PlacementSolver[PlacementInputs, Any] = PlacementSolver(
            self._compute_placement, _placement_key, memo=PLACEMENT_MEMO, on_ready=self._wake.set
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sends = asyncio.Semaphore(MAX_SENDS_IN_FLIGHT)
        self._decided = asyncio.Condition()
        self._stopped = False
        self._failures: dict[tuple[int, int], int] = {}  # failed fetches in a row, per shard
        self._leaving = False  # handing over: still driving the core
        self._left = False  # goodbye said: the core is no longer driven
        self._refused_logged: set[tuple[str, str]] = set()  # (sender, reason) said once

    # ---- placement (called by the core, also to verify others' proposals) -------------------
    def _placement(self, inputs: PlacementInputs) -> Mapping[str, Iterable[tuple[int, int]]]:
        # A pure function of its inputs, so remembered: every Accept of a retried ballot makes
        # each acceptor check the same value again. Not yet computed: `Solving` (the core
        # retries, the solver wakes the timer when it is done).
        assignment, routes = self.solver.lookup(inputs)
        self._routes[inputs.epoch] = routes
        for old in [e for e in self._routes if e < inputs.epoch - 2]:
            del self._routes[old]
        return assignment

    def _compute_placement(self, inputs: PlacementInputs) -> Any:
        """(assignment, routes) of `inputs`; runs on the solver's worker thread."""
        snaps = {}
        for s in inputs.snapshots:
            snap = _snapshot(s.payload)
            if snap is not None:
                snaps[s.origin] = snap
        return place(self.strategy, self.shape, dict(inputs.members), snaps)

    async def _solve_for(self, value: Any) -> bool:
        """Compute an incoming value's placement off the loop before the core checks it;
        False when it is not ready within SOLVE_WAIT_S (its computation goes on). A
        malformed value is left to the core to refuse."""
        try:
            inputs = placement_inputs(value.epoch, value.members, value.snapshots)
            await asyncio.wait_for(self.solver.solve(inputs), SOLVE_WAIT_S)
        except TimeoutError:
            return False
        except Exception:  # the core sees the same inputs and says why
            return True
        return True

    async def _request_epoch(self, members: list[str] | None, reason: str) -> None:
        """`core.request_epoch`, waiting (off the loop) for the placement it needs."""
        for _ in range(PENDING_RETRIES):
            try:
                self.apply(self.core.request_epoch(self.now(), members, reason=reason))
                return
            except Solving as pending:
                await asyncio.shield(pending.ready)
        raise TimeoutError("the placement inputs kept changing while they were computed")

    # ---- drift (called by the core when statistics, members or the epoch changed) -----------
    def _config(self) -> ClusterConfig:
        cfg = self.d.config
        threshold = cfg.drift_threshold if cfg.drift_threshold < 1 else math.inf  # 1: off
        return replace(ClusterConfig.lan(), drift_threshold=threshold,
                       drift_min_interval=cfg.drift_min_interval)  # fmt: skip

    def _drift(self, current: Mapping[str, Any], used: Mapping[str, Any]) -> float:
        keep: dict[int, tuple[Any, np.ndarray | None]] = {}
        value = statistics_drift(self._decoded(current, keep), self._decoded(used, keep))
        self._counts = keep  # payloads no longer asked about are forgotten
        self.d.metrics.drift.set(value)
        return value

    def _decoded(
        self, payloads: Mapping[str, Any], keep: dict[int, tuple[Any, np.ndarray | None]]
    ) -> dict[str, np.ndarray]:
        """Counts of each payload, decoded once per payload object: the core asks again after
        every statistics change (each node publishes every STATS_INTERVAL_S), and decoding
        copies the co-activation reservoir too. An entry holds its payload, so its id is not
        reused while cached."""
        out: dict[str, np.ndarray] = {}
        for origin, payload in payloads.items():
            hit = self._counts.get(id(payload))
            if hit is None or hit[0] is not payload:
                snap = _snapshot(payload)
                hit = (payload, snap.counts if snap is not None else None)
            keep[id(payload)] = hit
            if hit[1] is not None:
                out[origin] = hit[1]
        return out

    # ---- lifecycle ------------------------------------------------------------------------
    @staticmethod
    def now() -> float:
        return time.monotonic()

    async def start(self) -> None:
        self.apply(self.core.start(self.now()))
        self._spawn(self._timer, "cluster timer", restart=True)
        self._spawn(self._publish_stats, "cluster statistics", restart=True)

    async def leave(self) -> None:
        """Hand our experts over (a new epoch without us, bounded wait), then say goodbye.
        The core keeps running during the handover: it must hear the acceptors' replies."""
        if self._leaving:
            return
        self._leaving = True
        others = [n for n in self.core.alive_members() if n != self.d.node_id]
        if others and self.core.epoch > 0:
            try:
                await asyncio.wait_for(self._handover(others), timeout=HANDOVER_TIMEOUT_S)
                log.info("handover done: epoch %d holds our experts elsewhere", self.core.epoch)
            except TimeoutError:
                log.warning("handover not finished in time; leaving anyway")
        self._left = True
        out = self.core.leave(self.now())
        await asyncio.gather(*(self._send(dest, msg) for dest, msg in out.messages))

    async def _handover(self, others: list[str]) -> None:
        while (cur := self.core.consensus.current) is None or self.d.node_id in cur.member_ids():
            # another epoch with us in it may win the race; then ask again
            start = self.core.epoch
            others = [n for n in self.core.alive_members() if n != self.d.node_id] or others
            await self._request_epoch(others, "leave")
            await self.wait_decided(start + 1, timeout=HANDOVER_TIMEOUT_S)
        mine = set(self.core.routing.holdings_of(self.d.node_id))
        while mine:
            table = self.core.routing_table()
            mine = {s for s in mine if not [h for h in table.get(s, []) if h != self.d.node_id]}
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.solver.close()
        self.storage.close()

    def _spawn(self, coro: Any, name: str, *, restart: bool = False) -> None:
        """A supervised task (`coro` a coroutine, or with `restart` a function making one)."""
        factory = coro if restart else (lambda: coro)
        task = self.d.supervisor.spawn(name, factory, restart=restart)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _timer(self) -> None:
        while not self._stopped:
            wait = min(max(self.core.next_deadline() - self.now(), 0.005), 0.25)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            if self._left:
                return
            self.apply(self.core.tick(self.now()))

    async def _publish_stats(self) -> None:
        assert self.d.recorder is not None
        while not self._stopped:
            if not self._left:
                payload = self.d.recorder.snapshot(self.d.node_id).to_wire()
                self.apply(self.core.publish_stats(self.now(), payload))
            await asyncio.sleep(STATS_INTERVAL_S)

    # ---- inputs from the daemon -------------------------------------------------------------
    def peer_found(self, node_id: str, url: str) -> None:
        if not self._left and not self.core.is_alive(node_id):
            self.apply(self.core.join(self.now(), [(node_id, url)]))

    def is_alive(self, node_id: str) -> bool:
        return self.core.is_alive(node_id)

    def suspect(self, node_id: str) -> None:
        """A call to `node_id` failed: probe soon (the core's SWIM decides, not us)."""
        self._wake.set()

    async def on_message(self, sender: str, raw: Any) -> Any:
        """A signed message from `sender`: decoded against its declared types, handed to the
        core; whatever is wrong with it is refused (counted, a 4xx), never raised further."""
        try:
            msg = from_wire(raw)
        except MessageError as exc:
            self._refuse(sender, exc.reason, str(exc))
            raise WireError(f"bad cluster message: {exc}") from None
        if getattr(msg, "sender", sender) != sender:
            self._refuse(sender, "sender", "message sender differs from the signed sender")
            raise WireError("message sender differs from the signed sender", 403)
        if self._left:
            return {"ok": False}
        # an Accept's check recomputes its value's placement; so does a Promise's accepted
        # value, which this node proposes again and accepts itself
        value = msg.value if isinstance(msg, Accept) else getattr(msg, "accepted_value", None)
        # not ready yet: answer now and let the sender's resend find it computed, rather than
        # hold the request (every resend would hold one more, and past the peer's in-flight
        # limit all its calls here, experts and shards, get 429)
        if (isinstance(msg, Accept | Promise) and value is not None
                and (not await self._solve_for(value) or self._left)):  # fmt: skip
            return {"ok": False}
        self.d.metrics.gossip_messages.labels(direction="in").inc()
        try:
            out = self.core.handle(self.now(), msg)
        except Exception as exc:  # well typed but impossible: the core must not stop
            self._refuse(sender, "rejected", f"{type(exc).__name__}: {exc}", trace=exc)
            raise WireError(f"cluster message rejected: {type(exc).__name__}") from None
        self.apply(out)
        return {"ok": True}

    def _refuse(self, sender: str, reason: str, detail: str, trace: BaseException | None = None
                ) -> None:  # fmt: skip
        self.d.metrics.peer_messages_refused.labels(reason=reason).inc()
        key = (sender, reason)
        if key not in self._refused_logged and len(self._refused_logged) < 1024:
            self._refused_logged.add(key)
            log.warning("refused a cluster message from %s (%s): %s", sender, reason, detail,
                        exc_info=trace)  # fmt: skip

    # ---- outputs of the core ----------------------------------------------------------------
    def apply(self, out: Outbox) -> None:
        for dest, msg in out.messages:
            self._spawn(self._send(dest, msg), "gossip send")
        for eff in out.effects:
            self._effect(eff)
        # every input, not only those with effects: a peer's holdings arrive as a message
        # that changes the routing table and yields none, and requests must follow it at once
        # (else they find no live holder, fetch the expert and compute it here)
        self._refresh_routes()

    async def _send(self, dest: str, msg: Any) -> None:
        client = self.d.client(dest)
        if client is None:
            addr = self.core.address_of(dest)
            if addr is None or (peer := self.d.add_peer(dest, addr, trusted=True)) is None:
                return
            client = peer.client
        async with self._sends:
            try:
                await client.post(GOSSIP_PATH, to_wire(msg), timeout_s=2.0)
                self.d.metrics.gossip_messages.labels(direction="out").inc()
            except PeerError as exc:
                log.debug("gossip to %s failed: %s", dest, exc)

    def _effect(self, eff: Any) -> None:
        if isinstance(eff, MemberAlive):
            if eff.node != self.d.node_id:  # vouched for by an authenticated member
                self.d.add_peer(eff.node, eff.addr, trusted=True)
        elif isinstance(eff, MemberSuspect | MemberDead):
            log.info("member %s is %s", eff.node, type(eff).__name__.removeprefix("Member"))
        elif isinstance(eff, Decided):
            self._on_decided(eff.value)
        elif isinstance(eff, FetchShard):
            self._spawn(self._fetch(eff), "migration fetch")
        elif isinstance(eff, DropShard):
            log.info("dropping expert %d/%d (epoch %d)", eff.layer, eff.expert, eff.epoch)
            self.migration.drop([(eff.layer, eff.expert)])
        elif isinstance(eff, AnnounceHolding):
            self._drop_strays(eff.shards)
        self.d.metrics.members_alive.set(len(self.core.alive_members()))

    def _on_decided(self, value: Proposal) -> None:
        log.info("epoch %d decided (%s, proposer %s): %d members", value.epoch, value.reason,
                 value.proposer, len(value.members))  # fmt: skip
        self.d.metrics.epoch.set(value.epoch)
        self.d.metrics.epochs_decided.inc()
        self.d.metrics.epochs_by_reason.labels(reason=value.reason).inc()
        if self.d.standby is not None:  # standby copies follow the new placement
            self.d.standby.decided()
        self._spawn(self._notify_decided(), "decision notice")

    async def _notify_decided(self) -> None:
        async with self._decided:
            self._decided.notify_all()

    async def wait_decided(self, epoch: int, timeout: float) -> bool:
        async def wait() -> None:
            async with self._decided:
                await self._decided.wait_for(lambda: self.core.epoch >= epoch)

        try:
            await asyncio.wait_for(wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _fetch(self, eff: FetchShard) -> None:
        key = (eff.layer, eff.expert)
        prefer = eff.sources[0] if eff.sources else None
        done = await self.migration.acquire([key], source=lambda _: prefer)
        if self._left:
            return
        if key in done or (self.d.local is not None and self.d.local.holds(*key)):
            self._failures.pop(key, None)
            self.apply(self.core.shard_loaded(self.now(), *key))
            return
        # the core reissues a failed fetch at once: back off so a shard whose sources are all
        # gone is not retried in a busy loop
        n = self._failures[key] = self._failures.get(key, 0) + 1
        await asyncio.sleep(min(FETCH_BACKOFF_S * 2 ** (n - 1), FETCH_BACKOFF_MAX_S))
        if not self._left:
            self.apply(self.core.shard_failed(self.now(), *key))

    def _drop_strays(self, announced: frozenset[tuple[int, int]]) -> None:
        """Experts loaded only to serve a request while their holder was gone: free them once
        they are neither announced nor being fetched by the migration."""
        local = self.d.local
        if local is None:
            return
        pending = set(self.core.migration.pending) | self.migration.pending
        for key in local.held() - set(announced) - pending - set(self.core.migration.target):
            local.drop(*key)

    def _refresh_routes(self) -> None:
        router = self.d.router
        if router is None:
            return
        routes = self._routes.get(self.core.epoch, {}).get(self.d.node_id, {})
        router.set_holdings(self.core.routing_table(), routes)

    # ---- views for the API ------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        core = self.core
        cur = core.consensus.current
        holders: dict[str, list[str]] = {}
        if cur is not None:
            for node, shards in cur.assignment:
                for layer, expert in shards:
                    holders.setdefault(f"{layer}/{expert}", []).append(node)
        members = [
            {
                "node_id": m.node,
                "url": m.addr,
                "state": m.state,
                "capacity_bytes": m.capacity,
                "incarnation": m.incarnation,
            }
            for m in sorted(core.membership.members.values(), key=lambda m: m.node)
        ]
        holdings = {
            n: [f"{l}/{e}" for l, e in sorted(core.routing.holdings_of(n))]
            for n in core.alive_members()
        }
        stats = {}
        for origin, (version, payload) in core.stats_snapshots().items():
            snap = _snapshot(payload)
            if snap is not None:
                stats[origin] = {"version": version, "request_rate": snap.request_rate,
                                 "counts": snap.counts.tolist()}  # fmt: skip
        return {
            "epoch": core.epoch,
            "members": members,
            "placement": {
                "epoch": cur.epoch if cur else 0,
                "strategy": self.strategy,
                "reason": cur.reason if cur else None,
                "holders": dict(sorted(holders.items())),
            },
            "drift": {
                "value": core.drift_now(),
                "threshold": core.config.drift_threshold
                if core.config.drift_threshold < math.inf
                else None,  # off
                "min_interval_s": core.config.drift_min_interval,
            },
            "holdings": holdings,
            "stats": stats,
            "migration": {
                "pending": len(core.migration.pending | dict.fromkeys(self.migration.pending)),
                "bytes_moved": self.d.bytes_fetched,
            },
        }

    async def request_migration(self, *, dry_run: bool, members: list[str] | None) -> Any:
        core = self.core
        known = core.membership.members
        if members is not None:
            unknown = sorted(set(members) - set(known))
            if unknown or not members:
                raise ValueError(f"unknown members {unknown}" if unknown else "members is empty")
        chosen = sorted(set(members)) if members else core.alive_members()
        epoch = core.epoch
        if dry_run:
            snaps = [Snapshot(o, v, p) for o, (v, p) in sorted(core.stats_snapshots().items())
                     if o in chosen]  # fmt: skip
            inputs = placement_inputs(epoch + 1, [(n, known[n].capacity) for n in chosen], snaps)
            await self.solver.solve(inputs)
            value = build_proposal(
                epoch + 1, inputs.members, inputs.snapshots, self._placement,
                core.consensus.current, self.d.node_id, "operator-dry-run",
            )  # fmt: skip
            return {"epoch": epoch + 1, "plan": self._plan(value), "decided": False}
        await self._request_epoch(members, "operator")
        decided = await self.wait_decided(epoch + 1, timeout=30.0)
        value = core.consensus.log[epoch] if decided else None
        return {"epoch": core.epoch, "plan": self._plan(value) if value else [],
                "decided": decided}  # fmt: skip

    def _plan(self, value: Proposal) -> list[dict[str, Any]]:
        return [
            {
                "layer": l,
                "expert": e,
                "from": src or None,
                "to": dst,
                "bytes": self.shape.expert_bytes,
            }
            for l, e, src, dst in value.plan
        ]


def _placement_key(inputs: PlacementInputs) -> Any:
    """What a placement depends on: members with capacities and each snapshot's content."""
    return (inputs.members, tuple(
        (s.origin, s.version, hashlib.sha256(msgpack.packb(s.payload)).hexdigest())
        for s in inputs.snapshots))  # fmt: skip
