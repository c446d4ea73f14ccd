"""A whole (not streamed) answer is held to the same progress deadline as a streamed one:
it fails 504 only when no token came for `STALL_S`, however long the generation runs, and the
generation is told to stop. The model's thread only stamps token times (no event-loop hop per
token), so the deadline logic is driven here by a generator that ticks on a schedule."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from edgemoe.daemon import client_api
from edgemoe.model.generation import GenerationParams, GenerationResult


class _Ticking:
    """A daemon whose generation yields `tokens` tokens `every` seconds apart, then either
    finishes or (with `stall`) goes silent until cancelled."""

    def __init__(self, tokens: int, every: float, *, stall: bool = False) -> None:
        self.tokens, self.every, self.stall = tokens, every, stall

    async def generate(self, ids: list[int], params: GenerationParams, cancel: threading.Event,
                       on_token: Callable[[int], None]) -> GenerationResult:  # fmt: skip
        out: list[int] = []
        for i in range(self.tokens):
            await asyncio.sleep(self.every)
            on_token(i)
            out.append(i)
        while self.stall and not cancel.is_set():
            await asyncio.sleep(0.01)
        return GenerationResult(out, "", len(ids), "cancelled" if self.stall else "length", 0.0)


@pytest.fixture(autouse=True)
def _short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_api, "STALL_S", 0.3)
    monkeypatch.setattr(client_api, "STALL_CHECK_S", 0.02)


async def test_a_slow_but_steady_answer_is_not_cut() -> None:
    # 12 tokens 0.1 s apart: 1.2 s in all, four times the deadline, never 0.3 s without one
    cancel = threading.Event()
    result = await client_api._generate(_Ticking(12, 0.1), [7], GenerationParams(), cancel)  # type: ignore[arg-type]
    assert result.token_ids == list(range(12)) and not cancel.is_set()


async def test_an_answer_that_stops_progressing_ends_504_and_stops_its_generation() -> None:
    cancel = threading.Event()
    with pytest.raises(client_api.BadRequest) as err:
        await client_api._generate(_Ticking(3, 0.05, stall=True), [7], GenerationParams(),  # type: ignore[arg-type]
                                   cancel)  # fmt: skip
    assert err.value.status == 504 and "no progress" in str(err.value)
    assert cancel.is_set()
