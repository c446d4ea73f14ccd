"""The daemon's engine over the batch scheduler, in process: concurrent streams and whole answers
share decode passes and each gets plain transformers' greedy tokens; a stream its client closes
leaves the batch at once while the others go on."""

from __future__ import annotations

import asyncio

from edgemoe.daemon.engine import GenerationParams, InferenceEngine
from edgemoe.model.executor import StaticDirectory
from edgemoe.model.local import LocalExperts
from edgemoe.model.runtime import load_distributed_model

from .conftest import MAX_NEW, PROMPTS, TinyModel


def _engine(tiny: TinyModel) -> InferenceEngine:
    local = LocalExperts(tiny.shard_dir).load_all()
    return InferenceEngine(*load_distributed_model(tiny.shard_dir, StaticDirectory(local)))


async def test_concurrent_streams_and_answers_get_their_own_greedy_tokens(
    tiny: TinyModel,
) -> None:
    engine = _engine(tiny)
    greedy = GenerationParams(max_tokens=MAX_NEW, temperature=0.0)

    async def streamed(prompt: str) -> list[int]:
        return [tok async for tok in engine.stream(engine.encode(prompt), greedy)]

    try:
        got = await asyncio.gather(
            streamed(PROMPTS[0]), engine.generate(engine.encode(PROMPTS[1]), greedy),
            streamed(PROMPTS[1]), engine.generate(engine.encode(PROMPTS[0]), greedy),
        )  # fmt: skip
    finally:
        engine.close()
    assert got[0] == tiny.reference[PROMPTS[0]] and got[2] == tiny.reference[PROMPTS[1]]
    assert got[1].token_ids == tiny.reference[PROMPTS[1]]
    assert got[3].token_ids == tiny.reference[PROMPTS[0]]
    assert got[3].finish_reason in ("stop", "length")
    assert engine.scheduler.steps < 4 * (MAX_NEW - 1)  # the four shared decode passes


async def test_a_stream_closed_by_its_client_leaves_the_batch_and_the_others_finish(
    tiny: TinyModel,
) -> None:
    engine = _engine(tiny)
    endless = GenerationParams(max_tokens=2000, min_tokens=2000)
    cancelled: list[bool] = []
    try:
        stream = engine.stream(engine.encode(PROMPTS[1]), endless,
                               on_cancel=lambda: cancelled.append(True))  # fmt: skip
        other = asyncio.ensure_future(
            engine.generate(engine.encode(PROMPTS[0]), GenerationParams(max_tokens=MAX_NEW))
        )
        first = [await anext(stream), await anext(stream)]
        await stream.aclose()  # the client went away after two tokens
        answer = await other
        for _ in range(200):  # bounded: the row leaves after its current step
            if engine.scheduler.active == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.scheduler.active == 0
    finally:
        engine.close()
    assert first == tiny.long_reference[:2] and cancelled == [True]
    assert answer.token_ids == tiny.reference[PROMPTS[0]]
