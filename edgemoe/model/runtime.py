"""Loading a sharded model: the dense part through transformers, experts via a directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgemoe.model.distributed import DistributedExperts
from edgemoe.model.errors import ModelError
from edgemoe.model.executor import ExpertDirectory
from edgemoe.model.families import build_model, experts_modules, fp32_kept
from edgemoe.model.manifest import Manifest
from edgemoe.model.quantized import dequantize_dense
from edgemoe.model.routing import RoutingTrace
from edgemoe.model.shard import DENSE_NAME, file_problem

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_distributed_model(
    shard_dir: str | Path,
    directory: ExpertDirectory,
    *,
    recorder: Any | None = None,
    device: str = "cpu",
    routing: RoutingTrace | None = None,
    verify: bool = True,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) with every MoE block's `experts` child a `DistributedExperts`.

    With `verify`, the dense part, config and tokenizer files are checked against the
    manifest's sizes and sha256 first (experts are checked when an executor loads them).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    root = Path(shard_dir)
    manifest = Manifest.load(root)
    dtype = _DTYPES.get(manifest.dtype)
    if dtype is None:
        raise ModelError(f"{root / 'manifest.json'}: unsupported dtype {manifest.dtype!r}")
    if verify:
        for rel, info in sorted(manifest.files.items()):
            problem = None if rel.startswith("experts/") else file_problem(root / rel, info)
            if problem:
                raise ModelError(problem)
    config = AutoConfig.from_pretrained(str(root), local_files_only=True)
    model = build_model(config, dtype=dtype)
    found = experts_modules(model, manifest.num_experts)
    if len(found) != manifest.num_layers:
        raise ModelError(
            f"{root / 'manifest.json'}: {manifest.num_layers} MoE layers, model {len(found)}"
        )
    for li, (name, _) in enumerate(found):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(
            parent,
            child,
            DistributedExperts(
                li, manifest.num_experts, directory, recorder=recorder, routing=routing
            ),
        )
    dense_path = root / DENSE_NAME
    try:
        dense = load_file(str(dense_path))
    except Exception as exc:
        raise ModelError(f"{dense_path}: unreadable dense part ({exc})") from None
    if manifest.quantization == "fp8":  # FP8 linears outside the experts, dequantized
        dense = dequantize_dense(dense, dtype, manifest.config)
    _keep_fp32_params(model, dtype)
    result = model.load_state_dict(dense, strict=False)
    if result.unexpected_keys:
        raise ModelError(f"{dense_path}: unexpected tensor {result.unexpected_keys[0]}")
    tied = (
        set(getattr(model, "_tied_weights_keys", None) or {})
        if config.tie_word_embeddings
        else set()
    )
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ModelError(f"{dense_path}: missing tensor {missing[0]}")
    if tied:
        model.tie_weights()
    _fix_latent_attention_groups(model)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    return model, tokenizer


def _fix_latent_attention_groups(model: nn.Module) -> None:
    """Multi-head latent attention (DeepSeek-V2/V3) expands its cached latents to every query
    head, but transformers still repeats them by heads / num_key_value_heads whenever a mask is
    passed (padded batches): with num_key_value_heads below the head count (our tiny configs;
    the published ones set them equal) a batched forward fails. One group is what it computes."""
    for module in model.modules():
        if hasattr(module, "kv_b_proj") and getattr(module, "num_key_value_groups", 1) != 1:
            module.num_key_value_groups = 1


def _keep_fp32_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Follow from_pretrained: the family's keep-in-fp32 parameters stay float32 in half dtypes."""
    kept = fp32_kept(model, dtype)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and kept(name):
            tensor.data = tensor.data.float()


def distributed_blocks(model: nn.Module) -> list[DistributedExperts]:
    """The model's DistributedExperts modules, by MoE layer index."""
    return sorted(
        (m for m in model.modules() if isinstance(m, DistributedExperts)), key=lambda m: m.layer
    )


def set_routing(model: nn.Module, routing: RoutingTrace | None) -> None:
    """Install (or remove, with None) a routing trace override on every MoE layer."""
    for block in distributed_blocks(model):
        block.routing = routing


def set_recorder(model: nn.Module, recorder: Any | None) -> None:
    for block in distributed_blocks(model):
        block.recorder = recorder


__all__ = ["experts_modules", "load_distributed_model"]
