"""What edgemoe needs to know about an MoE family: found from the transformers model itself.

Any causal LM whose sparse blocks call a fused `experts(hidden, top_k_index, top_k_weights)`
module with `[E, ...]` parameters is supported; nothing here is a per-family table except the
tiny test configurations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgemoe.model.errors import ModelError

_NUM_EXPERTS_KEYS = ("num_local_experts", "n_routed_experts", "num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk")

# Tiny shapes, fast on two CPU cores. Keys are HF model_type names.
_COMMON: dict[str, Any] = dict(
    vocab_size=272,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        norm_topk_prob=True,
    ),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
    ),
    "deepseek_v3": dict(
        intermediate_size=64,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=2,
        topk_group=1,
    ),
    "gpt_oss": dict(
        intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),
}


def tiny_config_kwargs(arch: str) -> dict[str, Any]:
    if arch not in TINY_CONFIGS:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(TINY_CONFIGS)}")
    return {**_COMMON, **TINY_CONFIGS[arch]}


def _first_attr(config: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_config(model_dir: str | Path) -> Any:
    """The transformers config of a checkpoint dir; unknown or non-MoE families are refused."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except FileNotFoundError:
        raise ModelError(f"{path}: missing (not a Hugging Face checkpoint directory?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable: {exc}") from None
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(
            f"{path}: unknown architecture {model_type!r} for the installed transformers ({exc})"
        ) from None
    if _first_attr(config, _NUM_EXPERTS_KEYS) is None:
        raise ModelError(f"{path}: architecture {model_type!r} is not a Mixture-of-Experts model")
    return config


def num_experts_of(config: Any) -> int:
    value = _first_attr(config, _NUM_EXPERTS_KEYS)
    if value is None:
        raise ModelError(f"config of {config.model_type!r} names no routed expert count")
    return value


def top_k_of(config: Any) -> int:
    value = _first_attr(config, _TOP_K_KEYS)
    if value is None:
        raise ModelError(f"config of {config.model_type!r} names no experts-per-token")
    return value


def build_model(config: Any, *, meta: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM of this config without random initialisation (weights come from files)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, **kwargs)


def experts_modules(model: nn.Module, num_experts: int) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of each fused routed-experts module, in decoder order."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name.endswith(".experts"):
            continue
        params = list(module.named_parameters(recurse=False))
        if params and all(p.dim() >= 1 and p.shape[0] == num_experts for _, p in params):
            found.append((name, module))
    return found


def decoder_layer_index(module_name: str) -> int:
    """`model.layers.5.mlp.experts` -> 5."""
    parts = module_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    raise ModelError(f"cannot tell the decoder layer of {module_name!r}")


def fp32_kept(model: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Which parameter names the family keeps in float32 when loaded in `dtype`.

    Asks the library the way `from_pretrained` does (`_get_dtype_plan`, matched with its own
    glob alternation), so a pattern such as DeepSeek-V3's `gate.weight` (transformers 5.24)
    is honoured without a copied list.
    """
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    kept = [pattern for pattern, want in plan.items() if want == torch.float32]
    if not kept:
        return lambda name: False
    alternation = build_glob_alternation(kept)[0]
    return lambda name: alternation.search(name) is not None
