"""Continuous batching over the model's own forward: one forward pass per decode step for every
active request, so a step sends one message per expert holder per layer whatever the number of
requests (the distributed experts module groups all rows of a pass by executor).

Each request is prefilled alone (its prompt's forward is exactly what `generate` runs), then its
KV cache is left-padded into the running batch; a decode step feeds every row its last token
with its own position and the padding masked out. Finished or cancelled requests leave at once
(their rows are dropped from the cache), and new ones join between steps. The cache holds every
layer in full (no sliding-window truncation): the model's masks still apply any sliding window,
and padded rows keep the same distances between positions, so each row computes what it would
alone. Sampling is per row (temperature, top-k, top-p, its own seeded generator), min_tokens
masks end-of-sequence as `generate` does.

Why not transformers' own manager (`generate_batch`, paged attention `paged|eager`): measured
side by side on the distributed model (`python -m edgemoe.model.batch_bench`: tiny Mixtral, 8
requests x 32 tokens, CPU), it does go through our experts module (one call per layer per step)
and its greedy tokens match `generate` as far as they go, but it ran 0.19-0.33x this
scheduler's tokens/s, dropped min_new_tokens (3 of 8 requests stopped at EOS where `generate`
went on), and has no per-request seed or routing replay.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from edgemoe.model.generation import GenerationParams


@dataclass(eq=False)
class Request:
    """One generation in the scheduler. Callbacks run on the scheduler's thread."""

    prompt_ids: list[int]
    params: GenerationParams
    on_token: Callable[[int], None]
    on_done: Callable[[Request, BaseException | None], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    started: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None
    cursor: Any = None  # its rows of a replayed trace, when the model replays one


class Sampler:
    """Next token per row, with `generate`'s processors: min-new-tokens EOS mask, then
    temperature, top-k, top-p and a multinomial draw from the request's generator."""

    def __init__(self, eos_ids: Sequence[int], top_k: int = 0) -> None:
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
        self.top_k = top_k

    def choose(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        """logits float [B, V], one row per request (in order)."""
        logits = logits.float()
        eos = self.eos_ids.to(logits.device)
        for row, req in enumerate(requests):
            if len(req.tokens) < req.params.min_tokens and len(eos):
                logits[row, eos] = float("-inf")
        out = logits.argmax(dim=-1).tolist()
        for row, req in enumerate(requests):
            if req.params.temperature > 0:
                out[row] = self._draw(logits[row].cpu(), req)  # the request's CPU generator
        return [int(t) for t in out]

    def _draw(self, logits: torch.Tensor, req: Request) -> int:
        scores = logits / req.params.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if req.params.top_p < 1.0:
            ordered, index = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - req.params.top_p
            drop[-1] = False  # keep at least the most likely token
            scores = scores.masked_fill(drop.scatter(0, index, drop), float("-inf"))
        probs = scores.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=req.generator).item())


class Batch:
    """The running rows: a left-padded KV cache, its padding mask, each row's next position."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.padded = False  # some row has padding columns (the mask has a zero)

    def __len__(self) -> int:
        return len(self.requests)

    def join(self, req: Request, cache: DynamicCache, length: int) -> None:
        """Add a prefilled request (its own batch-1 cache of `length` positions)."""
        mine = [(layer.keys, layer.values) for layer in cache.layers]
        width = max(self.mask.shape[1], length)
        if self.cache is None:
            merged = [(_pad(k, width), _pad(v, width)) for k, v in mine]
        else:
            merged = [
                (torch.cat([_pad(kb.keys, width), _pad(k, width)]),
                 torch.cat([_pad(kb.values, width), _pad(v, width)]))
                for kb, (k, v) in zip(self.cache.layers, mine, strict=True)
            ]  # fmt: skip
        self.cache = DynamicCache(ddp_cache_data=merged)
        row = torch.zeros((1, width), dtype=torch.long)
        row[0, width - length :] = 1
        self.mask = torch.cat([_pad(self.mask, width, dim=1), row])
        self.padded = not bool(self.mask.all())
        self.positions = torch.cat([self.positions, torch.tensor([length])])
        self.requests.append(req)

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows`, and the padding columns no remaining row needs."""
        if len(rows) == len(self.requests):
            return
        self.requests = [self.requests[i] for i in rows]
        if not rows:
            self.cache, self.mask = None, torch.zeros((0, 0), dtype=torch.long)
            self.positions = torch.zeros(0, dtype=torch.long)
            self.padded = False
            return
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask[index]
        first = int(mask.any(dim=0).to(torch.int8).argmax())
        assert self.cache is not None
        self.cache = DynamicCache(
            ddp_cache_data=[
                (layer.keys[index, :, first:], layer.values[index, :, first:])
                for layer in self.cache.layers
            ]
        )
        self.mask = mask[:, first:]
        self.padded = not bool(self.mask.all())
        self.positions = self.positions[index]

    def step(self, model: Any, last: list[int]) -> torch.Tensor:
        """One decode forward for every row; logits [B, V] of the next token."""
        device = model.device
        width = self.mask.shape[1]
        self.mask = torch.cat([self.mask, torch.ones((len(self), 1), dtype=torch.long)], dim=1)
        out = model(
            input_ids=torch.tensor(last, dtype=torch.long, device=device)[:, None],
            # no row padded (a lone request, or rows of one length): no mask to build and
            # check on every step, as for a lone request in `generate`
            attention_mask=self.mask.to(device) if self.padded else None,
            position_ids=self.positions[:, None].to(device),
            cache=self.cache,
            cache_position=torch.tensor([width], device=device),
            use_cache=True,
            logits_to_keep=1,
        )
        self.positions = self.positions + 1
        return out.logits[:, -1, :]


def prefill(model: Any, prompt_ids: list[int]) -> tuple[torch.Tensor, DynamicCache]:
    """The prompt's forward alone: (logits [1, V] of the first new token, its cache)."""
    device = model.device
    n = len(prompt_ids)
    cache = DynamicCache()
    out = model(
        input_ids=torch.tensor([prompt_ids], dtype=torch.long, device=device),
        position_ids=torch.arange(n, device=device)[None],
        cache=cache,
        cache_position=torch.arange(n, device=device),
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :], cache


def _pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Left-pad `t` with zeros to `width` along `dim`."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchScheduler:
    """Runs every admitted generation on one model thread, one forward pass per step.

    `max_batch` rows decode together; requests beyond it wait (in arrival order) and join as
    rows leave. `replay` (a RequestReplay or None) is read when a request joins.
    """

    def __init__(
        self, model: Any, eos_ids: Sequence[int], *, max_batch: int, top_k: int = 0
    ) -> None:
        self.model = model
        self.sampler = Sampler(eos_ids, top_k)
        self.eos_ids = set(eos_ids)
        self.max_batch = max_batch
        self.replay: Any | None = None
        self.steps = 0  # decode forwards run (for tests and benchmarks)
        self._incoming: queue.Queue[Request | None] = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._batch = Batch()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="batch-decode", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        if req.params.seed is not None and req.params.temperature > 0:
            req.generator = torch.Generator().manual_seed(req.params.seed)
        elif req.params.temperature > 0:
            req.generator = torch.Generator()
            req.generator.seed()
        self._incoming.put(req)

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._incoming.put(None)
        self._thread.join(timeout)

    @property
    def active(self) -> int:
        return len(self._batch)

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._closed:
                if not self._take(block=not self._batch and not self._waiting):
                    break
                self._admit()
                if self._batch:
                    self._step()
        for req in [*self._batch.requests, *self._waiting]:
            self._finish(req, RuntimeError("the engine was closed"))

    def _take(self, block: bool) -> bool:
        """Move submitted requests to the waiting line; False once closed."""
        try:
            item = self._incoming.get(block=block)
            while True:
                if item is None:
                    return False
                self._waiting.append(item)
                item = self._incoming.get_nowait()
        except queue.Empty:
            return True

    def _admit(self) -> None:
        while self._waiting and len(self._batch) < self.max_batch:
            req = self._waiting.popleft()
            if req.cancel.is_set():  # its client left while it waited
                req.finish_reason = "cancelled"
                self._finish(req, None)
                continue
            try:
                if self.replay is not None:
                    req.cursor = self.replay.open()
                with self._bound([req]):
                    logits, cache = prefill(self.model, req.prompt_ids)
                if self._advance(req, self.sampler.choose(logits, [req])[0]):
                    self._batch.join(req, cache, len(req.prompt_ids))
            except Exception as exc:  # this request fails, the batch goes on
                self._finish(req, exc)

    def _step(self) -> None:
        batch = self._batch
        try:
            with self._bound(batch.requests):
                logits = batch.step(self.model, [req.tokens[-1] for req in batch.requests])
            chosen = self.sampler.choose(logits, batch.requests)
        except Exception as exc:  # a failed forward fails every row in it
            for req in batch.requests:
                self._finish(req, exc)
            batch.keep([])
            return
        self.steps += 1
        batch.keep([i for i, (req, tok) in enumerate(zip(batch.requests, chosen, strict=True))
                    if self._advance(req, tok)])  # fmt: skip

    def _advance(self, req: Request, token: int) -> bool:
        """Hand `token` to its request; False when the request has finished (and is told)."""
        req.tokens.append(token)
        req.on_token(token)
        if req.cancel.is_set():
            req.finish_reason = "cancelled"
        elif token in self.eos_ids and len(req.tokens) >= req.params.min_tokens:
            req.finish_reason = "stop"
        elif len(req.tokens) >= req.params.max_tokens:
            req.finish_reason = "length"
        else:
            return True
        self._finish(req, None)
        return False

    def _finish(self, req: Request, error: BaseException | None) -> None:
        req.on_done(req, error)

    def _bound(self, requests: Sequence[Request]) -> contextlib.AbstractContextManager[Any]:
        if self.replay is None or any(r.cursor is None for r in requests):
            return contextlib.nullcontext()
        return self.replay.bind([r.cursor for r in requests])
