"""LocalExperts holds any subset of experts and can load/drop them while serving."""

from __future__ import annotations

import threading

import pytest
import torch

from edgemoe.model.errors import ModelError
from edgemoe.model.local import LocalExperts


def _expert_output(local: LocalExperts, layer: int, hidden: torch.Tensor, expert: int):
    ids = torch.full((hidden.shape[0], 1), expert, dtype=torch.long)
    return local.forward(layer, hidden, ids, torch.ones(hidden.shape[0], 1))


def test_weighted_sum_matches_single_expert_calls(tiny_models) -> None:
    _, shards = tiny_models.get("olmoe")
    local = LocalExperts(shards)
    for e in (1, 4, 6):
        local.load(1, e)
    assert local.held() == {(1, 1), (1, 4), (1, 6)} and local.holds(1, 4)
    assert not local.holds(0, 4)
    torch.manual_seed(0)
    hidden = torch.randn(5, local.manifest.hidden_size)
    ids = torch.tensor([[1, 4], [6, -1], [-1, -1], [4, 1], [6, 4]])
    weights = torch.rand(5, 2)
    got = local.submit(1, hidden, ids, weights).result()
    single = {e: _expert_output(local, 1, hidden, e) for e in (1, 4, 6)}
    want = torch.zeros_like(hidden)
    for n in range(5):
        for k in range(2):
            if ids[n, k] >= 0:
                want[n] += weights[n, k] * single[int(ids[n, k])][n]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(got[2]) == 0
    assert local.held_bytes() == 3 * local.manifest.expert_bytes


def test_asking_for_an_expert_not_held_fails_in_the_future(tiny_models) -> None:
    _, shards = tiny_models.get("olmoe")
    local = LocalExperts(shards)
    local.load(0, 0)
    hidden = torch.randn(2, local.manifest.hidden_size)
    future = local.submit(0, hidden, torch.tensor([[0, 5], [0, 0]]), torch.ones(2, 2))
    with pytest.raises(ModelError, match=r"\[5\] are not held"):
        future.result()
    with pytest.raises(ModelError, match="no expert"):
        local.load(9, 0)


def test_load_and_drop_while_serving(tiny_models) -> None:
    _, shards = tiny_models.get("olmoe")
    local = LocalExperts(shards)
    for e in range(8):
        local.load(0, e)
    hidden = torch.randn(16, local.manifest.hidden_size)
    ids = torch.tensor([[0, 1]] * 16)
    weights = torch.full((16, 2), 0.5)
    want = local.forward(0, hidden, ids, weights)
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(30):
                for e in range(2, 8):
                    local.drop(0, e)
                for e in range(2, 8):
                    local.load(0, e)
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=churn)
    thread.start()
    rounds = 0
    while not stop.is_set() or rounds == 0:
        torch.testing.assert_close(local.forward(0, hidden, ids, weights), want)
        rounds += 1
    thread.join()
    assert not errors and rounds > 0
    assert len(local.held()) == 8
