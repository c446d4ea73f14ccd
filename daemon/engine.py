"""Generation for this node's clients: the transformers model with distributed experts,
decoded in batches (edgemoe.model.batching: one forward pass per step for every active request,
requests join between steps and leave as soon as they finish or their client goes away).

The model runs on the scheduler's own thread (it blocks on remote futures that the event loop
completes); tokens are handed back to the loop one at a time for streaming. Every generation
carries a cancel flag checked after each step, and a node admits at most `MAX_ADMITTED`
generations at once (decoding or waiting for a row): past that a client is told to come back
(`Busy`, HTTP 429) instead of queueing behind work it cannot see.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from edgemoe.model.batching import BatchScheduler, Request
from edgemoe.model.executor import ExpertDirectory
from edgemoe.model.generation import Busy, GenerationParams, GenerationResult
from edgemoe.model.runtime import load_distributed_model

# Rows decoded together in one forward pass. A step's cost grows slowly with its rows (the
# weights are read once per step, remote experts get one message per holder per layer), so
# this is well above the 4 threads the per-request engine had; each row still waits for the
# whole step.
MAX_BATCH = 16
# Generations that may wait for a free row. A waiting request's latency is the work ahead of
# it, so this bounds the wait a new client can be put behind; beyond it the node answers 429
# with Retry-After.
MAX_WAITING = 8
MAX_ADMITTED = MAX_BATCH + MAX_WAITING
__all__ = ["MAX_ADMITTED", "Busy", "GenerationParams", "GenerationResult", "InferenceEngine"]


class InferenceEngine:
    """Holds the model and tokenizer; `generate` and `stream` go through one batch scheduler."""

    def __init__(
        self, model: Any, tokenizer: Any, *, max_batch: int = MAX_BATCH, limit: int = MAX_ADMITTED
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        eos_ids = {*(eos if isinstance(eos, list) else [eos]), self.eos_token_id} - {None}
        # sampling follows the model's generation config's top-k, as `generate` did
        self.scheduler = BatchScheduler(
            model, [int(e) for e in eos_ids], max_batch=max_batch,
            top_k=int(getattr(config, "top_k", None) or 0),
        )  # fmt: skip
        self.limit = limit
        self.admitted = 0  # generations running or waiting for a row (event loop only)

    @property
    def replay(self) -> Any | None:
        """A RequestReplay when the node replays a trace (each request its own rows)."""
        return self.scheduler.replay

    @replay.setter
    def replay(self, value: Any | None) -> None:
        self.scheduler.replay = value

    def admit(self) -> contextlib.ExitStack:
        """One of the node's generation slots, held until the returned context exits; raises
        `Busy` at once when none is free (before any answer is started)."""
        if self.admitted >= self.limit:
            raise Busy(self.admitted)
        self.admitted += 1
        slot = contextlib.ExitStack()
        slot.callback(self._release)
        return slot

    def _release(self) -> None:
        self.admitted -= 1

    @classmethod
    async def load(
        cls, shard_dir: Path, directory: ExpertDirectory, *, recorder: Any, device: str
    ) -> InferenceEngine:
        model, tokenizer = await asyncio.to_thread(
            load_distributed_model, shard_dir, directory, recorder=recorder, device=device
        )
        return cls(model, tokenizer)

    def close(self) -> None:
        self.scheduler.close(timeout=0.0)  # never wait on the loop: the model thread may need it

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat: the tokenizer's template if it has one, else plain turns."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)

    def _submit(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        cancel: threading.Event,
        on_token: Callable[[int], None],
    ) -> asyncio.Future[GenerationResult]:
        """Queue a generation; the future resolves on the loop when it finishes."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[GenerationResult] = loop.create_future()

        def settle(req: Request, error: BaseException | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
                return
            seconds = time.perf_counter() - req.started
            text = self.decode(req.tokens)
            done.set_result(
                GenerationResult(req.tokens, text, len(prompt_ids), req.finish_reason, seconds)
            )

        def on_done(req: Request, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, req, error)

        self.scheduler.submit(Request(prompt_ids, params, on_token, on_done, cancel))
        return done

    async def generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        cancel: threading.Event | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """The whole answer; setting `cancel` stops it after its current step. `on_token`
        runs on the model's thread for each new token (no hop to the event loop)."""
        return await self._submit(prompt_ids, params, cancel or threading.Event(),
                                  on_token or (lambda _: None))  # fmt: skip

    async def stream(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        on_done: Callable[[GenerationResult], None] | None = None,
        on_cancel: Callable[[], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> AsyncGenerator[int, None]:
        """Yield new token ids as they are generated. Closing the iterator early or setting
        `cancel` (the client went away) stops the generation after its current step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        cancel = cancel or threading.Event()

        def on_token(tok: int) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, tok)

        fut = self._submit(prompt_ids, params, cancel, on_token)
        fut.add_done_callback(lambda _: queue.put_nowait(None))  # ends the loop on errors too
        finished = False
        try:
            while (tok := await queue.get()) is not None:
                yield tok
            finished = True
        finally:
            if not finished:
                cancel.set()
                if on_cancel is not None:
                    on_cancel()
        result = await fut
        if on_done is not None:
            on_done(result)
