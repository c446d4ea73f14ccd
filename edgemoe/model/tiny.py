"""`edgemoe model tiny`: a small random MoE checkpoint of a real architecture, seeded."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from edgemoe.model.errors import ModelError
from edgemoe.model.families import TINY_CONFIGS, tiny_config_kwargs
from edgemoe.model.tokenizer import save_byte_tokenizer

Layout = Literal["original", "fused"]
ARCHITECTURES = tuple(TINY_CONFIGS)


def write_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    layout: Layout = "original",
    scale: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write config.json, model.safetensors and a tokenizer to `out_dir`.

    layout "original" stores experts the way the family's hub checkpoints do (transformers'
    own reverse conversion: per-expert 2-D tensors for most families); "fused" stores the
    `[E, ...]` tensors of the transformers module. `scale` multiplies hidden and expert
    widths (for the sharding benchmark).
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    kwargs = tiny_config_kwargs(arch)
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
