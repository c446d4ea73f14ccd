"""`edgemoe bench quant`: what a quantized checkpoint costs and buys, side by side in one run.

Per format (MXFP4 GPT-OSS, FP8 DeepSeek-V3, tiny and seeded): the shard bytes of one expert
against the same model's bfloat16 shards, the bytes one expert takes once held for each
`expert_dtype`, and greedy decoding tokens/s with every expert held locally, the expert
dtypes interleaved round by round so the box's load falls on all of them alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgemoe.model.executor import StaticDirectory
from edgemoe.model.local import LocalExperts
from edgemoe.model.runtime import load_distributed_model
from edgemoe.model.shard import shard_checkpoint
from edgemoe.model.tiny import TinyShape, write_tiny_model

FORMATS = {"mxfp4": "gpt_oss", "fp8": "deepseek_v3"}
EXPERT_DTYPES = ("native", "float32", "bfloat16")
PROMPT = "The edge servers share their experts"


@dataclass
class FormatResult:
    method: str
    arch: str
    shard_bytes: int  # one expert's shard, quantized
    bf16_bytes: int  # one expert's shard of the same model stored in bfloat16
    held_bytes: dict[str, int] = field(default_factory=dict)  # expert_dtype -> bytes in memory
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # expert_dtype -> median


def run_quant_bench(
    root: Path, *, tokens: int = 32, rounds: int = 3, shape: TinyShape | None = None
) -> list[FormatResult]:
    """Write, shard and serve each format under `root`; median tokens/s over `rounds`."""
    results = []
    for method, arch in FORMATS.items():
        ckpt = write_tiny_model(arch, root / method, seed=0, quantize=method, shape=shape)
        manifest, _ = shard_checkpoint(ckpt, root / f"{method}-shards")
        plain = write_tiny_model(arch, root / f"{method}-bf16", seed=0, dtype=torch.bfloat16,
                                 shape=_plain_shape(method, shape))  # fmt: skip
        bf16, _ = shard_checkpoint(plain, root / f"{method}-bf16-shards")
        result = FormatResult(method, arch, manifest.expert_bytes, bf16.expert_bytes)
        models = {}
        for dtype in EXPERT_DTYPES:
            local = LocalExperts(root / f"{method}-shards", expert_dtype=dtype).load_all()
            result.held_bytes[dtype] = local.expert_memory_bytes()
            models[dtype] = load_distributed_model(root / f"{method}-shards",
                                                   StaticDirectory(local))  # fmt: skip
        times: dict[str, list[float]] = {d: [] for d in EXPERT_DTYPES}
        for _ in range(rounds):
            for dtype, (model, tokenizer) in models.items():
                times[dtype].append(_tokens_per_s(model, tokenizer, tokens))
        result.tokens_per_s = {d: sorted(v)[len(v) // 2] for d, v in times.items()}
        results.append(result)
    return results


def published_expert_bytes(method: str) -> tuple[int, int]:
    """(quantized, bfloat16) bytes of one expert at the family's published size (the
    library's default config: GPT-OSS 2880 x 2880, DeepSeek-V3 7168 x 2048), read off the
    library's quantized experts module built on the meta device (no memory)."""
    from transformers import AutoConfig

    from edgemoe.model.families import build_model, experts_modules, num_experts_of
    from edgemoe.model.quantized import FP8_BLOCK, quantize_meta_model

    config = AutoConfig.for_model(FORMATS[method], num_hidden_layers=4)
    config.quantization_config = (
        {"quant_method": "mxfp4"} if method == "mxfp4"
        else {"quant_method": "fp8", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    )  # fmt: skip
    experts = num_experts_of(config)

    def one_expert(quantize: bool) -> int:
        model = build_model(config, meta=True, dtype=torch.bfloat16)
        if quantize:
            model = quantize_meta_model(model, config, method)
        module = experts_modules(model, experts)[0][1]
        total = 0
        for name, p in module.named_parameters(recurse=False):
            # biases are stored bfloat16 as published (the quantized module keeps float32)
            plain = p.is_floating_point() and p.element_size() > 1 and "scale" not in name
            total += p.numel() // experts * (2 if plain else p.element_size())
        return total

    return one_expert(True), one_expert(False)


def _plain_shape(method: str, shape: TinyShape | None) -> TinyShape | None:
    """The quantized model's shape for its bfloat16 twin (FP8's 128-wide defaults included)."""
    if method != "fp8":
        return shape
    base = shape or TinyShape()
    return TinyShape(base.layers, base.experts, base.top_k, base.shared_experts,
                     base.hidden_size or 128, base.expert_width or 128)  # fmt: skip


def _tokens_per_s(model: torch.nn.Module, tokenizer: object, tokens: int) -> float:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]  # type: ignore[operator]
    greedy = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, **greedy)
    return tokens / (time.perf_counter() - start)
