"""Batched decoding measured side by side in one run, in one process (no network): plain
transformers `generate` of one request, our batch scheduler with 1 and with 8 requests at once
(every expert local), and transformers' own continuous batching (`generate_batch`) on the same
distributed model. Prints ratios and whether each path gave `generate`'s greedy tokens.

    python -m edgemoe.model.batch_bench [--hidden 512] [--tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from edgemoe.model.batching import BatchScheduler, GenerationParams, Request
from edgemoe.model.executor import StaticDirectory
from edgemoe.model.local import LocalExperts
from edgemoe.model.runtime import distributed_blocks, load_distributed_model
from edgemoe.model.shard import shard_checkpoint
from edgemoe.model.tiny import TinyShape, write_tiny_model

PROMPTS = ("The quick brown fox", "Edge servers share experts", "Hi there", "Batch me",
           "A mixture of experts routes", "One two three four", "Hello world",
           "The edge servers")  # fmt: skip


class _Calls:
    """Recorder that counts the experts module's calls (proves a path goes through it)."""

    def __init__(self) -> None:
        self.calls = 0

    def record(self, layer: int, ids: Any) -> None:
        self.calls += 1


def _generate(model: Any, ids: list[int], tokens: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False)  # fmt: skip
    return [int(t) for t in out[0, len(ids) :]]


def _scheduled(
    scheduler: BatchScheduler, prompts: list[list[int]], tokens: int
) -> tuple[float, list[list[int]]]:
    """(aggregate tokens/s, tokens per request) for all prompts submitted at once."""
    done = [threading.Event() for _ in prompts]
    results: list[list[int]] = [[] for _ in prompts]

    def finisher(i: int) -> Any:
        def on_done(req: Request, error: BaseException | None) -> None:
            results[i] = list(req.tokens)
            done[i].set()

        return on_done

    params = GenerationParams(max_tokens=tokens, min_tokens=tokens)
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        scheduler.submit(Request(ids, params, lambda _: None, finisher(i)))
    for event in done:
        event.wait()
    return sum(map(len, results)) / (time.perf_counter() - start), results


def run(hidden: int, tokens: int, rounds: int, workdir: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    shape = TinyShape(hidden_size=hidden) if hidden else None
    ckpt = write_tiny_model("mixtral", workdir / "ckpt", seed=7, shape=shape)
    shard_checkpoint(ckpt, workdir / "shards")
    calls = _Calls()
    local = LocalExperts(workdir / "shards").load_all()
    model, tok = load_distributed_model(workdir / "shards", StaticDirectory(local), recorder=calls)
    plain = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    prompts = [list(tok(p)["input_ids"]) for p in PROMPTS]
    want = [_generate(plain, ids, tokens) for ids in prompts]
    eos = model.generation_config.eos_token_id  # masked until min_tokens, as `generate` does
    eos_ids = {*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id} - {None}
    scheduler = BatchScheduler(model, [int(e) for e in eos_ids], max_batch=len(prompts))
    timing: dict[str, list[float]] = {"transformers_s_per_token": [], "one": [], "eight": []}
    try:
        _scheduled(scheduler, prompts[:2], 4)  # warm up
        for _ in range(rounds):
            start = time.perf_counter()
            _generate(plain, prompts[0], tokens)
            timing["transformers_s_per_token"].append((time.perf_counter() - start) / tokens)
            one, got_one = _scheduled(scheduler, prompts[:1], tokens)
            eight, got = _scheduled(scheduler, prompts, tokens)
            timing["one"].append(one)
            timing["eight"].append(eight)
    finally:
        scheduler.close()
    med = {k: statistics.median(v) for k, v in timing.items()}
    out: dict[str, Any] = {
        "hidden": hidden or "tiny default", "tokens": tokens, "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "batched_1_tokens_per_s": round(med["one"], 1),
        "batched_8_tokens_per_s": round(med["eight"], 1),
        "batched_8_over_single_tokens_per_s": round(med["eight"] / med["one"], 3),
        "all_local_over_transformers_per_token": round(
            (1 / med["one"]) / med["transformers_s_per_token"], 3),
        "batched_exact": got == want and got_one == want[:1],
    }  # fmt: skip
    gen = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           eos_token_id=sorted(eos_ids))  # fmt: skip
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=256, max_batch_tokens=512)
    with torch.inference_mode():
        model.generate_batch(prompts[:1], generation_config=gen, continuous_batching_config=cb)
        calls.calls = 0
        start = time.perf_counter()
        answers = model.generate_batch(prompts, generation_config=gen,
                                       continuous_batching_config=cb, warmup=False)  # fmt: skip
        seconds = time.perf_counter() - start
    order = sorted(answers, key=lambda k: int(k.rsplit("_", 1)[-1]))
    cb_tokens = [list(answers[k].generated_tokens) for k in order]
    out["library_generate_batch_8_tokens_per_s"] = round(len(prompts) * tokens / seconds, 1)
    out["library_over_ours_8"] = round(len(prompts) * tokens / seconds / med["eight"], 3)
    # same greedy tokens up to its EOS? It drops min_new_tokens, so some stop at EOS early
    cut = [a[: len(a) - (len(a) < tokens)] for a in cb_tokens]
    out["library_exact_prefix"] = all(a == b[: len(a)] for a, b in zip(cut, want, strict=True))
    out["library_stopped_at_eos_before_min_tokens"] = sum(len(a) < tokens for a in cb_tokens)
    # forward passes through our experts module (calls per MoE layer) for 8 x `tokens` tokens
    out["library_forward_passes_8"] = calls.calls / len(distributed_blocks(model))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size; 0: tiny default")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="edgemoe-batch-bench-") as tmp:
        print(json.dumps(run(args.hidden, args.tokens, args.rounds, Path(tmp)), indent=1))


if __name__ == "__main__":
    main()
