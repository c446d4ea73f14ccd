"""The per-expert transport: one peer call per (token, expert), as DanceMoE's system does.

The default per-server transport (`remote.RemoteExecutor` as it is) sends a peer one call per
layer carrying each token's hidden state once; the peer runs all that token's experts it
holds and returns one weighted sum per token. With `transport = "per-expert"` every routed
(token, expert) pair that goes to a peer is its own call, all issued at once, so the
published system runs in the same daemons and the testbed can compare the two transports.
Failover, signing and the metrics are the wrapped executor's: each call counts as one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from edgemoe.daemon.config import TRANSPORTS
from edgemoe.daemon.remote import RemoteExecutor, Router
from edgemoe.model.executor import ExpertExecutor


class PerExpertExecutor:
    """Splits a peer's rows into one call per (token, expert) and sums the answers."""

    def __init__(self, remote: ExpertExecutor) -> None:
        self.remote = remote

    def submit(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> Future[torch.Tensor]:
        rows, slots = torch.nonzero(expert_ids >= 0, as_tuple=True)
        calls = [
            (n, self.remote.submit(
                layer, hidden[n : n + 1], expert_ids[n, k].view(1, 1), weights[n, k].view(1, 1)
            ))
            for n, k in zip(rows.tolist(), slots.tolist(), strict=True)
        ]  # fmt: skip
        return _summed(calls, hidden)


def _summed(calls: list[tuple[int, Future[torch.Tensor]]], like: torch.Tensor
            ) -> Future[torch.Tensor]:  # fmt: skip
    """A future of the [N, H] sum: row n gets every call made for token n."""
    out: Future[torch.Tensor] = Future()
    if not calls:
        out.set_result(torch.zeros_like(like))
        return out
    left = [len(calls)]
    lock = threading.Lock()

    def one_done(_: Future[torch.Tensor]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            total = torch.zeros_like(like)
            for n, call in calls:
                total[n] += call.result()[0].to(dtype=like.dtype, device=like.device)
        except BaseException as exc:  # the first failed call's error is the step's error
            out.set_exception(exc)
        else:
            out.set_result(total)

    for _, call in calls:
        call.add_done_callback(one_done)
    return out


def _per_expert(router: Router, node_id: str) -> ExpertExecutor:
    return PerExpertExecutor(RemoteExecutor(router, node_id))


def remote_executor_factory(transport: str) -> Callable[[Router, str], ExpertExecutor]:
    """What `Router` builds for each peer under the configured transport."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    return _per_expert if transport == "per-expert" else RemoteExecutor
