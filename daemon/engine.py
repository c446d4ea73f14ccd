"""Generation for this node's clients: the transformers model with distributed experts.

Generation runs on worker threads (the model thread blocks on remote futures that the event
loop completes); tokens are handed back to the loop one at a time for streaming. Every
generation carries a cancel flag checked after each token (its client went away), and a node
admits at most `MAX_ADMITTED` generations at once (running or waiting for a worker): past that a
client is told to come back (`Busy`, HTTP 429) instead of queueing behind work it cannot see.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from edgemoe.model.executor import ExpertDirectory
from edgemoe.model.runtime import load_distributed_model

# Worker threads generating at once: each holds a model forward; more only splits the CPU/GPU.
WORKERS = 4
# Generations that may wait for a free worker. A waiting request's latency is the work ahead of
# it, so this bounds the wait a new client can be put behind (about MAX_WAITING / WORKERS
# generations' time); beyond it the node answers 429 with Retry-After.
MAX_WAITING = 8
MAX_ADMITTED = WORKERS + MAX_WAITING
# Seconds a refused client is asked to wait (Retry-After) before trying again.
RETRY_AFTER_S = 2


class Busy(Exception):
    """The node already admitted `MAX_ADMITTED` generations."""

    def __init__(self, admitted: int) -> None:
        super().__init__(
            f"this node is busy ({admitted} generations running or waiting); "
            f"retry in {RETRY_AFTER_S} s"
        )
        self.retry_after = RETRY_AFTER_S


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # End-of-sequence is ignored until this many tokens (vLLM's min_tokens); replayed
    # requests set it to max_tokens so they run their recorded length.
    min_tokens: int = 0


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str
    seconds: float


class _Streamer:
    """transformers streamer: forwards new token ids to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]) -> None:
        self.loop = loop
        self.queue = queue
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        for tok in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(tok))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class _Cancelled(StoppingCriteria):
    """Stops a generation whose client went away (checked after every token)."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool,
                          device=input_ids.device)  # fmt: skip


class InferenceEngine:
    """Holds the model and tokenizer; `generate` and `stream` run on worker threads."""

    def __init__(
        self, model: Any, tokenizer: Any, *, workers: int = WORKERS, limit: int = MAX_ADMITTED
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate")
        self._seed_lock = threading.Lock()
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.replay: Any | None = None  # a RequestReplay when the node replays a trace
        self.limit = limit
        self.admitted = 0  # generations running or waiting for a worker (event loop only)

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
        self._pool.shutdown(wait=False, cancel_futures=True)

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

    def _run(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        streamer: _Streamer | None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        start = time.perf_counter()
        if cancel is not None and cancel.is_set():  # its client left while it waited
            return GenerationResult([], "", len(prompt_ids), "cancelled", 0.0)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.model.device)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_tokens,
            attention_mask=torch.ones_like(input_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
        )
        if cancel is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        if params.min_tokens > 0:
            kwargs["min_new_tokens"] = min(params.min_tokens, params.max_tokens)
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode(), self._replay_scope():
            if params.seed is not None and params.temperature > 0:
                with self._seed_lock:
                    torch.manual_seed(params.seed)
                    out = self.model.generate(input_ids, **kwargs)
            else:
                out = self.model.generate(input_ids, **kwargs)
        new = [int(t) for t in out[0, len(prompt_ids) :].tolist()]
        finish = "stop" if new and new[-1] == self.eos_token_id else "length"
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
        return GenerationResult(
            new, self.decode(new), len(prompt_ids), finish, time.perf_counter() - start
        )

    def _replay_scope(self) -> contextlib.AbstractContextManager[Any]:
        """Binds this generation to its own request of the replayed trace, if any."""
        return self.replay.request() if self.replay is not None else contextlib.nullcontext()

    async def generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """The whole answer; setting `cancel` stops it after its current token."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run, prompt_ids, params, None, cancel)

    async def stream(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        on_done: Callable[[GenerationResult], None] | None = None,
        on_cancel: Callable[[], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> AsyncGenerator[int, None]:
        """Yield new token ids as they are generated. Closing the iterator early or setting
        `cancel` (the client went away) stops the generation after its current token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        cancel = cancel or threading.Event()
        fut = loop.run_in_executor(
            self._pool, self._run, prompt_ids, params, _Streamer(loop, queue), cancel
        )
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
