"""Who computes an expert: the executor interface the daemon implements over the network."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from concurrent.futures import Future
from typing import Protocol, runtime_checkable

import torch

# Up to this many (token, slot) ids, executors handle a layer's ids in Python: a decode step's
# few ids cost microseconds there, where torch's small-tensor ops cost tens of microseconds.
SMALL_IDS = 256


@runtime_checkable
class ExpertExecutor(Protocol):
    """Computes a weighted sum of experts for a batch of rows.

    hidden [N, H]; expert_ids int64 [N, K] global ids, -1 for slots not sent here; weights
    [N, K]. The future's result [N, H] = sum over k with ids >= 0 of
    weights[n, k] * expert_{ids[n, k]}(hidden[n]). Remote executors return pending futures.
    """

    def submit(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> Future[torch.Tensor]: ...


class InThreadExecutor:
    """An executor that computes in the caller's thread: `submit` is `forward` with its result
    (or its error) in an already completed future."""

    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def submit(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> Future[torch.Tensor]:
        future: Future[torch.Tensor] = Future()
        try:
            future.set_result(self.forward(layer, hidden, expert_ids, weights))
        except Exception as exc:
            future.set_exception(exc)
        return future


class ExpertDirectory(Protocol):
    """Maps (layer, expert) to the executor that runs it; executors are grouped by identity."""

    def executor_for(self, layer: int, expert: int) -> ExpertExecutor: ...


class StaticDirectory:
    """A fixed assignment: one default executor plus explicit (layer, expert) overrides."""

    def __init__(
        self,
        default: ExpertExecutor,
        overrides: Mapping[tuple[int, int], ExpertExecutor] | None = None,
    ) -> None:
        self._default = default
        self._overrides = dict(overrides or {})

    @classmethod
    def split(
        cls, executors: Iterable[ExpertExecutor], assignment: Mapping[tuple[int, int], int]
    ) -> StaticDirectory:
        """assignment (layer, expert) -> index into executors; unlisted go to the first."""
        pool = list(executors)
        return cls(pool[0], {key: pool[i] for key, i in assignment.items()})

    def executor_for(self, layer: int, expert: int) -> ExpertExecutor:
        return self._overrides.get((layer, expert), self._default)


def executor_key(executor: ExpertExecutor) -> Hashable:
    return id(executor)
