"""`edgemoe model tiny`: a small random MoE checkpoint of a real architecture, seeded."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from edgemoe.model.errors import ModelError
from edgemoe.model.families import (
    _NUM_EXPERTS_KEYS,
    _TOP_K_KEYS,
    TINY_CONFIGS,
    tiny_config_kwargs,
)
from edgemoe.model.quantized import FP8_BLOCK, quantize_state
from edgemoe.model.tokenizer import save_byte_tokenizer

Layout = Literal["original", "fused"]
ARCHITECTURES = tuple(TINY_CONFIGS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Attention head width once the hidden size is overridden: the family default (hidden / heads)
# would make attention grow with it, and a shaped model exists to move real-sized hidden
# states while computing little.
SHAPED_HEAD_DIM = 16
QUANTIZATIONS = ("mxfp4", "fp8")


@dataclass(frozen=True)
class TinyShape:
    """Overrides of a tiny model's shape; None keeps the family's tiny default.

    `layers` counts MoE layers (a family's leading dense layers are added on top);
    `shared_experts` is DeepSeek's shared expert count or, for Qwen2-MoE, the width of its one
    shared expert in units of `expert_width`; `expert_width` is each routed expert's
    intermediate size (keep it a multiple of 8: the grouped_mm experts kernel wants 16-byte
    strides, so width 4 in bf16 fails at run time)."""

    layers: int | None = None
    experts: int | None = None
    top_k: int | None = None
    shared_experts: int | None = None
    hidden_size: int | None = None
    expert_width: int | None = None

    @classmethod
    def deepseek_v2_lite(cls, expert_width: int = 8) -> TinyShape:
        """DeepSeek-V2-Lite's routing shape and hidden size (26 MoE layers x 64 experts,
        top-6, 2 shared, hidden 2048) with tiny experts: real-sized hidden states on the
        wire, little compute. Use with arch deepseek_v2 and bfloat16."""
        return cls(layers=26, experts=64, top_k=6, shared_experts=2, hidden_size=2048,
                   expert_width=expert_width)  # fmt: skip


def shaped_config_kwargs(arch: str, shape: TinyShape | None = None) -> dict[str, Any]:
    """The tiny config of `arch` with `shape`'s overrides applied to the family's own keys."""
    kwargs = tiny_config_kwargs(arch)
    if shape is None:
        return kwargs
    for name in ("layers", "experts", "top_k", "hidden_size", "expert_width"):
        value = getattr(shape, name)
        if value is not None and value < 1:
            raise ModelError(f"{name.replace('_', '-')} must be >= 1, got {value}")
    if shape.shared_experts is not None and shape.shared_experts < 0:
        raise ModelError(f"shared-experts must be >= 0, got {shape.shared_experts}")
    experts_key = next(k for k in _NUM_EXPERTS_KEYS if k in kwargs)
    top_k_key = next(k for k in _TOP_K_KEYS if k in kwargs)
    width_key = "moe_intermediate_size" if "moe_intermediate_size" in kwargs else (
        "intermediate_size")  # fmt: skip
    if shape.layers is not None:
        kwargs["num_hidden_layers"] = shape.layers + int(kwargs.get("first_k_dense_replace", 0))
    if shape.experts is not None:
        kwargs[experts_key] = shape.experts
    if shape.top_k is not None:
        kwargs[top_k_key] = shape.top_k
    if kwargs[top_k_key] > kwargs[experts_key]:
        raise ModelError(f"top-k {kwargs[top_k_key]} exceeds {kwargs[experts_key]} experts")
    if shape.expert_width is not None:
        kwargs[width_key] = shape.expert_width
    if shape.hidden_size is not None:
        kwargs["hidden_size"] = shape.hidden_size
        if "kv_lora_rank" not in kwargs:  # DeepSeek's MLA sets its head widths itself
            kwargs["head_dim"] = SHAPED_HEAD_DIM
    if shape.shared_experts is not None:
        if "n_shared_experts" in kwargs:
            kwargs["n_shared_experts"] = shape.shared_experts
        elif "shared_expert_intermediate_size" in kwargs:
            kwargs["shared_expert_intermediate_size"] = shape.shared_experts * kwargs[width_key]
        elif shape.shared_experts:
            raise ModelError(f"architecture {arch!r} has no shared experts")
    return kwargs


def write_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    layout: Layout = "original",
    scale: int = 1,
    dtype: torch.dtype = torch.float32,
    shape: TinyShape | None = None,
    quantize: str | None = None,
) -> Path:
    """Write config.json, model.safetensors and a tokenizer to `out_dir`.

    layout "original" stores experts the way the family's hub checkpoints do (transformers'
    own reverse conversion: per-expert 2-D tensors for most families); "fused" stores the
    `[E, ...]` tensors of the transformers module. `scale` multiplies hidden and expert
    widths (for the sharding benchmark); `shape` overrides layers, experts, top-k, shared
    experts, hidden size and expert width; `quantize` ("mxfp4": GPT-OSS, "fp8": 128x128
    blocks) stores the routed experts quantized as those families are published.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    if quantize == "fp8" and layout != "original":  # only this layout does the library load
        raise ModelError("--quantize fp8 writes the published per-expert layout: --layout original")
    if quantize == "fp8":  # whole 128x128 scale blocks, as the published FP8 checkpoints use
        shape = replace(
            shape or TinyShape(),
            hidden_size=(shape and shape.hidden_size) or FP8_BLOCK,
            expert_width=(shape and shape.expert_width) or FP8_BLOCK,
        )
    kwargs = shaped_config_kwargs(arch, shape)
    if scale > 1:
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key]) * scale
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    config = AutoConfig.for_model(arch, **kwargs)
    config.dtype = dtype
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "original":
        state = revert_weight_conversion(model, state)
    elif layout != "fused":
        raise ModelError(f"unknown layout {layout!r} (original or fused)")
    state = {k: v.contiguous() for k, v in state.items()}
    if quantize is not None:
        state, config.quantization_config = quantize_state(model, state, quantize)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        config.save_pretrained(str(staging))
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        save_byte_tokenizer(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
