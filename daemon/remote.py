"""The daemon's `ExpertDirectory`: local experts, one remote executor per peer, and failover.

Routing follows announced holdings (`Router.set_holdings`). A remote call runs on the event
loop (`asyncio.run_coroutine_threadsafe`) and completes the future the model thread waits
on. If the peer fails, the rows go to other live holders of their experts; an expert with no
live holder, or whose live holders all failed lately, is computed here from its shard: this
node's own copy on disk when it has one (a standby copy, `standby.py`, or one left from an
earlier epoch), else one fetched from any peer that has the file (standby nodes first).

Failures are bounded: one attempt at a peer gets `attempt_timeout_s` (a frozen box accepts
the connection and never answers), a peer that failed is passed over for `SHUN_S` while
another holder exists (membership may take ~20 s to declare it dead), and a whole layer call,
failovers and fetches included, ends within `call_budget_s` with `ExpertsUnavailable` (the
client API's 503) rather than blocking the model thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from typing import Protocol

import numpy as np
import torch

from edgemoe.daemon.metrics import DaemonMetrics
from edgemoe.daemon.peers import ExpertsUnavailable, PeerClient, PeerError
from edgemoe.daemon.rpc import tensor_from_wire, tensor_to_wire
from edgemoe.daemon.store import CorruptShard
from edgemoe.model.errors import ModelError
from edgemoe.model.executor import ExpertExecutor, InThreadExecutor
from edgemoe.model.local import LocalExperts

log = logging.getLogger(__name__)
FORWARD_PATH = "/v1/experts/forward"
# Seconds one layer call may take in all: attempts, failovers to other holders, fetching a
# shard to compute it here. Past it the step fails with ExpertsUnavailable (a 503).
CALL_BUDGET_S = 15.0
# Seconds one attempt at one peer may take before its rows go elsewhere.
ATTEMPT_TIMEOUT_S = 6.0
# A peer whose call failed is passed over for this long when another holder is alive.
SHUN_S = 10.0


class PeerBook(Protocol):
    """What the router needs to know about peers (the daemon implements it)."""

    def client(self, node_id: str) -> PeerClient | None: ...

    def is_alive(self, node_id: str) -> bool: ...

    def report_failure(self, node_id: str) -> None: ...


class Router:
    """Maps (layer, expert) to an executor; owns the remote executors and the failover."""

    def __init__(
        self,
        node_id: str,
        local: LocalExperts,
        peers: PeerBook,
        loop: asyncio.AbstractEventLoop,
        metrics: DaemonMetrics,
        fetch_and_load: Callable[[int, int], Awaitable[None]],
        *,
        call_timeout_s: float = 20.0,
        remote_executor: Callable[[Router, str], ExpertExecutor] | None = None,
        call_budget_s: float = CALL_BUDGET_S,
        attempt_timeout_s: float = ATTEMPT_TIMEOUT_S,
    ) -> None:
        self.node_id = node_id
        self.local = local
        self.peers = peers
        self.loop = loop
        self.metrics = metrics
        self.fetch_and_load = fetch_and_load
        self.call_timeout_s = call_timeout_s
        self.call_budget_s = call_budget_s
        self.attempt_timeout_s = attempt_timeout_s
        self._shunned: dict[str, float] = {}  # peer -> monotonic time its call failed until
        self._holdings: dict[tuple[int, int], tuple[str, ...]] = {}
        self._preferred: dict[tuple[int, int], str] = {}
        self._remotes: dict[str, ExpertExecutor] = {}
        # The transport: what calls a peer (per_expert.remote_executor_factory chooses).
        self._make_remote = remote_executor or RemoteExecutor
        self._lock = threading.Lock()
        self._orphans = _OrphanExecutor(self)
        self._here = _HeldHere(self)

    # ---- routing table (written from the event loop, read by model threads) -----------------
    def set_holdings(
        self,
        holdings: Mapping[tuple[int, int], list[str] | tuple[str, ...]],
        preferred: Mapping[tuple[int, int], str] | None = None,
    ) -> None:
        """Announced holders per expert, and the placement's routing choice where it has one."""
        table = {k: tuple(v) for k, v in holdings.items()}
        with self._lock:
            self._holdings = table
            self._preferred = dict(preferred or {})

    def holders(self, layer: int, expert: int, exclude: frozenset[str] = frozenset()) -> list[str]:
        with self._lock:
            found = self._holdings.get((layer, expert), ())
            first = self._preferred.get((layer, expert))
        alive = [
            n for n in found if n != self.node_id and n not in exclude and self.peers.is_alive(n)
        ]
        if first in alive:
            alive.remove(first)
            alive.insert(0, first)
        return self._unshunned_first(alive)

    def _unshunned_first(self, alive: list[str]) -> list[str]:
        """Holders whose last call did not fail recently go first (order kept otherwise)."""
        if not self._shunned:
            return alive
        now = time.monotonic()
        for node, until in list(self._shunned.items()):
            if until <= now:
                self._shunned.pop(node, None)
        return sorted(alive, key=lambda n: n in self._shunned)

    def failed_lately(self, node_id: str) -> bool:
        """A call to this peer failed within the last SHUN_S (the node's file fetches ask it
        too: a frozen or cut-off peer still counts as alive for a while)."""
        return self._shunned.get(node_id, 0.0) > time.monotonic()

    def _failed(self, node_id: str, why: str) -> None:
        log.warning("expert call to %s failed (%s); trying other holders", node_id, why)
        self.metrics.remote_failures.labels(peer=node_id).inc()
        self.peers.report_failure(node_id)
        self._shunned[node_id] = time.monotonic() + SHUN_S

    def remote(self, node_id: str) -> ExpertExecutor:
        with self._lock:
            ex = self._remotes.get(node_id)
            if ex is None:
                ex = self._remotes[node_id] = self._make_remote(self, node_id)
            return ex

    def pick(self, layer: int, expert: int, exclude: frozenset[str] = frozenset()
             ) -> str | None:  # fmt: skip
        """The holder to call for an expert not held here, or None to compute it here: none
        is alive, or every live one failed within SHUN_S (waiting on a frozen or cut-off peer
        again costs an attempt timeout; its shard is on disk at standby nodes)."""
        alive = self.holders(layer, expert, exclude)
        if alive and not self.failed_lately(alive[0]):  # unshunned ones come first
            return alive[0]
        return None

    def executor_for(self, layer: int, expert: int) -> ExpertExecutor:
        if self.local.holds(layer, expert):
            return self._here
        who = self.pick(layer, expert)
        return self._orphans if who is None else self.remote(who)

    # ---- failover ---------------------------------------------------------------------------
    async def compute(
        self,
        layer: int,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        target: str | None,
        failed: frozenset[str] = frozenset(),
    ) -> torch.Tensor:
        """Rows of `ids` (>= 0 slots) computed by `target`, or by whoever can after failures;
        within `call_budget_s` in all, else `ExpertsUnavailable`."""
        try:
            async with asyncio.timeout(self.call_budget_s):
                return await self._compute(layer, hidden, ids, weights, target, failed)
        except TimeoutError:
            raise ExpertsUnavailable(
                f"layer {layer}: no holder of its experts answered within "
                f"{self.call_budget_s:g} s"
            ) from None

    async def _compute(
        self,
        layer: int,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        target: str | None,
        failed: frozenset[str],
    ) -> torch.Tensor:
        if target is not None:
            try:
                async with asyncio.timeout(self.attempt_timeout_s):
                    return await self._call(target, layer, hidden, ids, weights)
            except (PeerError, TimeoutError) as exc:
                self._failed(target, str(exc) or f"no answer in {self.attempt_timeout_s:g} s")
                failed = failed | {target}
        out = torch.zeros_like(hidden)
        groups: dict[str | None, list[int]] = {}
        for e in {int(x) for x in torch.unique(ids).tolist() if x >= 0}:
            if self.local.holds(layer, e):
                groups.setdefault(self.node_id, []).append(e)
                continue
            groups.setdefault(self.pick(layer, e, failed), []).append(e)
        parts = []
        for who, experts in groups.items():
            masked = _mask(ids, experts)
            if who in (self.node_id, None):
                parts.append(self._run_here(layer, experts, hidden, masked, weights))
            else:
                parts.append(self._compute(layer, hidden, masked, weights, who, failed))
        for part in await asyncio.gather(*parts):
            out += part
        return out

    async def _run_here(
        self,
        layer: int,
        experts: list[int],
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Compute `experts` here, fetching and loading those not held. They stay pinned
        until computed: a migration dropping one meanwhile cannot fail the call."""
        with self.local.pinned((layer, e) for e in experts):
            for e in experts:
                if self.local.holds(layer, e):
                    continue
                log.warning("no live holder of expert %d/%d answers: computing it here from "
                            "its shard", layer, e)  # fmt: skip
                try:
                    await self.fetch_and_load(layer, e)
                except (PeerError, CorruptShard, ModelError, OSError) as exc:
                    raise ExpertsUnavailable(
                        f"layer {layer} expert {e}: no live holder, and its shard could not "
                        f"be fetched here ({exc})"
                    ) from None
            return await asyncio.to_thread(self.local.forward, layer, hidden, ids, weights)

    async def _call(
        self,
        node_id: str,
        layer: int,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        client = self.peers.client(node_id)
        if client is None:
            raise PeerError(f"{node_id}: unknown peer")
        rows = torch.nonzero((ids >= 0).any(dim=1), as_tuple=True)[0]
        out = torch.zeros_like(hidden)
        if rows.numel() == 0:
            return out
        body = {
            "layer": layer,
            "hidden": tensor_to_wire(hidden[rows]),
            "expert_ids": tensor_to_wire(ids[rows].to(torch.int64)),
            "weights": tensor_to_wire(weights[rows].to(hidden.dtype)),
        }
        sent = sum(len(v["data"]) for k, v in body.items() if k != "layer")
        self.metrics.remote_calls.labels(peer=node_id).inc()
        self.metrics.remote_bytes.labels(peer=node_id, direction="sent").inc(sent)
        answer = await client.post(FORWARD_PATH, body, timeout_s=self.call_timeout_s)
        if not isinstance(answer, dict) or "out" not in answer:
            raise PeerError(f"{node_id}: malformed expert answer")
        try:
            part = tensor_from_wire(
                answer["out"],
                dtypes=(body["hidden"]["dtype"],),
                ndim=2,
                max_elements=hidden[rows].numel(),
                name="out",
            )
        except ValueError as exc:
            raise PeerError(f"{node_id}: bad expert answer: {exc}") from None
        if tuple(part.shape) != (rows.numel(), hidden.shape[1]):
            raise PeerError(f"{node_id}: answer shape {list(part.shape)} is wrong")
        self.metrics.remote_bytes.labels(peer=node_id, direction="received").inc(
            len(answer["out"]["data"])
        )
        out[rows] = part.to(hidden.device)
        return out


def _mask(ids: torch.Tensor, experts: list[int]) -> torch.Tensor:
    keep = torch.isin(ids, torch.tensor(experts, dtype=ids.dtype, device=ids.device))
    return torch.where(keep, ids, torch.full_like(ids, -1))


class RemoteExecutor:
    """Executor for one peer: a pending future the event loop completes."""

    def __init__(self, router: Router, node_id: str) -> None:
        self.router = router
        self.node_id = node_id

    def submit(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> Future[torch.Tensor]:
        coro = self.router.compute(layer, hidden, expert_ids, weights, self.node_id)
        asked = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(coro, self.router.loop)
        observe = self.router.metrics.expert_call_seconds.observe
        future.add_done_callback(lambda _: observe(time.perf_counter() - asked))
        return future


class _HeldHere(InThreadExecutor):
    """The held experts, as routing hands them to the model thread: computed in its thread;
    one dropped since it was routed here (a migration between the routing and the compute)
    is computed the failover's way, loaded again and pinned, instead of failing the step."""

    is_local = True

    def __init__(self, router: Router) -> None:
        self.router = router

    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        try:
            return self.router.local.forward(layer, hidden, expert_ids, weights)
        except ModelError:  # not held any more
            coro = self.router.compute(layer, hidden, expert_ids, weights, None)
            return asyncio.run_coroutine_threadsafe(coro, self.router.loop).result()


class _OrphanExecutor:
    """Experts nobody alive (and not failed lately) holds: computed here from their shards."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def submit(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> Future[torch.Tensor]:
        coro = self.router.compute(layer, hidden, expert_ids, weights, None)
        return asyncio.run_coroutine_threadsafe(coro, self.router.loop)


class LocalShareTap:
    """Wraps the activation recorder: also counts how many routed pairs were held locally.

    Runs on the model thread for every layer of every step: plain lists and a lookup per id;
    the gauge reads `share` when it is scraped, not on every record."""

    def __init__(self, recorder: object, local: LocalExperts, metrics: DaemonMetrics) -> None:
        self.recorder = recorder
        self.local = local
        self.local_pairs = 0
        self.total_pairs = 0
        self.remote_bytes = 0
        metrics.local_share.set_function(lambda: self.share)

    def record(self, layer: int, topk_ids: np.ndarray) -> None:
        self.recorder.record(layer, topk_ids)  # type: ignore[attr-defined]
        flat = [e for e in topk_ids.ravel().tolist() if e >= 0]
        self.local_pairs += self.local.count_held(layer, flat)
        self.total_pairs += len(flat)

    @property
    def share(self) -> float:
        return self.local_pairs / self.total_pairs if self.total_pairs else 1.0
