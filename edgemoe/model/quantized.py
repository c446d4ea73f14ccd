"""Quantized checkpoints as published: MXFP4 (GPT-OSS) and block-scaled FP8 experts.

The format code is transformers' own (`integrations/mxfp4.py`, `integrations/finegrained_fp8.py`,
read through the checkpoint's `quantization_config`): its quantized experts classes give the
fused layout an expert shard keeps (quantized tensors and scales, sliced per expert), and its
dequantize ops turn a held expert into the family's plain parameters on a CPU. The only format
code written here is an MXFP4 quantizer for the tiny demo checkpoints (the library's runs in
a hub kernel package), written from the OCP Microscaling definition.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from edgemoe.model.errors import ModelError

SUPPORTED = ("mxfp4", "fp8")
SUPPORTED_TEXT = "mxfp4 and fp8 (block-scaled, weight_block_size)"
EXPERT_DTYPES = {"native": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
FP8_BLOCK = 128  # the published FP8 checkpoints' weight_block_size
MX_BLOCK = 32  # values per MXFP4 scale: 16 bytes of packed E2M1 pairs (OCP MX v1.0)
_E2M1_EMAX = 2  # largest E2M1 magnitude is 1.5 * 2**2 = 6
log = logging.getLogger(__name__)


def quant_config(config: Any) -> dict[str, Any] | None:
    """The checkpoint's quantization_config as a plain dict, or None when not quantized."""
    raw = getattr(config, "quantization_config", None)
    if raw is None:
        return None
    return _plain(raw if isinstance(raw, dict) else raw.to_dict())


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Enum values (QuantizationMethod.FP8) as their strings, as config.json stores them."""
    return {k: (v.value if hasattr(v, "value") else v) for k, v in data.items()}


def quant_method(config: Any, where: str) -> str | None:
    """"mxfp4", "fp8" or None; any other method (gptq, awq, bitsandbytes, ...) is refused."""
    qc = quant_config(config)
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8" and not qc.get("weight_block_size"):
        raise ModelError(
            f"{where}: quantization_config method 'fp8' without weight_block_size (per-tensor "
            f"FP8) is not supported; supported: {SUPPORTED_TEXT}"
        )
    if method not in SUPPORTED:
        raise ModelError(
            f"{where}: quantization_config method {method or '(none)'!r} is not supported; "
            f"supported: {SUPPORTED_TEXT}"
        )
    return method


def hf_quantizer(config: Any) -> Any:
    """The library's quantizer for a pre-quantized checkpoint (never told to dequantize);
    `config` is a transformers config or a manifest's config dict."""
    from transformers.quantizers.auto import AutoHfQuantizer

    raw = config["quantization_config"] if isinstance(config, dict) else config.quantization_config
    return AutoHfQuantizer.from_config(raw, pre_quantized=True)


def quantize_meta_model(model: nn.Module, config: Any, method: str) -> nn.Module:
    """Swap a meta model's modules for the library's quantized ones (what from_pretrained
    builds on a device with kernels): FP8Experts / FP8Linear, or MXFP4 GPT-OSS experts."""
    quantizer = hf_quantizer(config)
    if method == "fp8":
        from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

        quantizer._normalize_modules_to_not_convert(model)
        skip = quantizer.get_modules_to_not_convert(
            model, quantizer.quantization_config.modules_to_not_convert,
            model._keep_in_fp32_modules,
        )  # fmt: skip
        return replace_with_fp8_linear(
            model, skip, quantization_config=quantizer.quantization_config, pre_quantized=True
        )
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts

    for name, module in list(model.named_modules()):
        if name.endswith(".experts") and type(module).__name__ == "GptOssExperts":
            with torch.device("meta"):
                model.set_submodule(name, _Mxfp4Serialized(Mxfp4GptOssExperts(config)))
    return model


class _Mxfp4Serialized(nn.Module):
    """Meta-only: the serialized tensors of the library's `Mxfp4GptOssExperts`.

    The library keeps each projection as packed FP4 bytes plus a kernel precision config and
    saves them as `{proj}_blocks` / `{proj}_scales` (`Mxfp4ReverseDeserialize`: the blocks
    reshaped to the scales' shape plus 16 bytes); the expert shards keep exactly those.
    """

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        for name, param in experts.named_parameters(recurse=False):
            if param.dtype == torch.uint8:
                *rows, packed = param.shape
                scales = (*rows, packed * 2 // MX_BLOCK)
                self.register_parameter(f"{name}_blocks", _meta((*scales, MX_BLOCK // 2)))
                self.register_parameter(f"{name}_scales", _meta(scales))
            else:
                self.register_parameter(name, nn.Parameter(param, requires_grad=False))


def _meta(shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=torch.uint8, device="meta"), requires_grad=False)


def weight_conversions(model: nn.Module, config: Any, converters: list[Any]) -> list[Any]:
    """The family's converters made to carry the serialized companions too (the library's
    own `update_weight_conversions`: e.g. `experts.*.gate_proj.weight_scale_inv` merged into
    `experts.gate_up_proj_scale_inv` like the weights), without its load-time ops."""
    quantizer = hf_quantizer(config)
    extra = len(quantizer.get_weight_conversions())
    updated = quantizer.update_weight_conversions(converters, model)
    return updated[: len(updated) - extra] if extra else updated


def dequantize_expert(
    method: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype, config: Any
) -> dict[str, torch.Tensor]:
    """One expert's shard tensors -> the family's plain parameters (the library's ops)."""
    out: dict[str, torch.Tensor] = {}
    if method == "mxfp4":
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        for name, value in tensors.items():
            if name.endswith("_scales"):
                continue
            if name.endswith("_blocks"):
                proj = name.removesuffix("_blocks")
                plain = convert_moe_packed_tensors(
                    value[None], tensors[f"{proj}_scales"][None], dtype=dtype
                )
                out[proj] = plain[0]
            else:
                out[name] = value.to(dtype)
        return out
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    op = Fp8Dequantize(hf_quantizer(config))
    for name, value in tensors.items():
        if name.endswith("_scale_inv") or name.endswith("_activation_scale"):
            continue
        scale = tensors.get(f"{name}_scale_inv")
        out[name] = value.to(dtype) if scale is None else op._dequantize_one(value, scale, dtype)
    return out


def dequantize_dense(
    state: dict[str, torch.Tensor], dtype: torch.dtype, config: Any
) -> dict[str, torch.Tensor]:
    """Dense FP8 linears (`X.weight` + `X.weight_scale_inv`) -> plain weights of `dtype`."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    op = Fp8Dequantize(hf_quantizer(config))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".weight_scale_inv") or key.endswith(".activation_scale"):
            continue
        scale = state.get(key.removesuffix("weight") + "weight_scale_inv")
        out[key] = value if scale is None else op._dequantize_one(value, scale, dtype)
    return out


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] -> (blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32]).

    OCP MX: per block of 32 values along K, a shared power of two 2**(floor(log2 amax) - 2)
    (stored E8M0: exponent + 127) and E2M1 elements rounded to the nearest representable
    value; two elements per byte, the even one in the low nibble (the library's unpacking).
    """
    from transformers.integrations.mxfp4 import FP4_VALUES

    if weight.shape[-1] % MX_BLOCK:
        raise ModelError(f"MXFP4 needs the contracted width to be a multiple of {MX_BLOCK}")
    x = weight.float().unflatten(-1, (-1, MX_BLOCK))
    amax = x.abs().amax(dim=-1, keepdim=True)
    exp = (torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - _E2M1_EMAX).clamp(-127, 127)
    scaled = x / torch.exp2(exp)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    code = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)
    code = code + 8 * (scaled < 0)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed.to(torch.uint8), (exp.squeeze(-1) + 127).to(torch.uint8)


def quantize_state(
    model: nn.Module, state: dict[str, torch.Tensor], method: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A tiny model's checkpoint state with its routed experts quantized as published, and
    the quantization_config that says so (GPT-OSS MXFP4; FP8 with 128x128 blocks)."""
    arch = model.config.model_type
    linears = sorted(
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".experts" not in name
    )  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    if method == "mxfp4":
        if arch != "gpt_oss":
            raise ModelError(f"--quantize mxfp4 is GPT-OSS's format; got architecture {arch!r}")
        for key, value in state.items():
            if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                # The library's blocks hold the transposed weight: K (contracted) last.
                blocks, scales = quantize_mxfp4(value.transpose(-1, -2))
                out[f"{key}_blocks"], out[f"{key}_scales"] = blocks, scales
            else:
                out[key] = value
        return out, {"quant_method": "mxfp4", "modules_to_not_convert": linears}
    if method != "fp8":
        raise ModelError(f"unknown quantization {method!r}; choose mxfp4 or fp8")
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.auto import AutoHfQuantizer
    from transformers.utils.quantization_config import FineGrainedFP8Config

    # As published (DeepSeek-V3): every linear in whole 128x128 blocks is FP8 (routed and
    # shared experts here); the others are listed in modules_to_not_convert.
    whole = {
        name for name in linears
        if not any(d % FP8_BLOCK for d in state[f"{name}.weight"].shape)
    }  # fmt: skip
    qc = FineGrainedFP8Config(
        weight_block_size=[FP8_BLOCK, FP8_BLOCK],
        modules_to_not_convert=[name for name in linears if name not in whole],
    )
    op = Fp8Quantize(AutoHfQuantizer.from_config(qc))
    for key, value in state.items():
        if ".experts." in key and key.endswith(".weight") and value.dim() == 2:
            if any(d % FP8_BLOCK for d in value.shape):
                raise ModelError(
                    f"--quantize fp8 needs expert weights in whole 128x128 blocks; {key} is "
                    f"{list(value.shape)} (use --hidden-size 128 --expert-width 128)"
                )
            out.update(op._quantize_one(key, value))
        elif key.removesuffix(".weight") in whole:
            out.update(op._quantize_one(key, value))
        else:
            out[key] = value
    return out, {**_plain(qc.to_dict()), "fmt": "e4m3"}


class NativeExperts:
    """The library's quantized experts class restricted to the held subset, on a CUDA device
    with the library's kernels (FP8: `FP8Experts` over its finegrained-fp8/DeepGEMM kernels;
    MXFP4: `Mxfp4GptOssExperts` over the GPT-OSS triton kernels, swizzled by its own code).

    Not exercised on the development box (no GPU); `create` returns None anywhere else, and
    the experts are then dequantized on load.
    """

    def __init__(self, template: nn.Module, method: str, hub: Any) -> None:
        self.template = template
        self.method = method
        self.hub = hub

    @classmethod
    def create(cls, shard_dir: Any, manifest: Any, device: torch.device) -> NativeExperts | None:
        if device.type != "cuda":
            return None
        from transformers import AutoConfig

        from edgemoe.model.families import build_model, experts_modules

        method = manifest.quantization
        try:
            hub = _load_kernels(method)
        except Exception as exc:  # kernels package or hub download missing: dequantize instead
            log.warning("%s kernels unavailable (%s); experts are dequantized on load", method, exc)
            return None
        config = AutoConfig.from_pretrained(str(shard_dir), local_files_only=True)
        if method == "fp8":
            meta = quantize_meta_model(build_model(config, meta=True), config, method)
            template = experts_modules(meta, manifest.num_experts)[0][1]
        else:
            from transformers.integrations.mxfp4 import Mxfp4GptOssExperts

            with torch.device("meta"):
                template = Mxfp4GptOssExperts(config)
        return cls(template, method, hub)

    def restricted(self, params: dict[str, torch.Tensor], count: int) -> nn.Module:
        from edgemoe.model.local import restricted_module

        if self.method == "fp8":
            return restricted_module(self.template, params, count)
        from transformers.integrations.mxfp4 import swizzle_mxfp4_convertops

        plain = {k: v.float() for k, v in params.items() if k.endswith("_bias")}
        module = restricted_module(self.template, plain, count)
        for proj in ("gate_up_proj", "down_proj"):
            blocks, scales = params[f"{proj}_blocks"], params[f"{proj}_scales"]
            swizzle_mxfp4_convertops(blocks, scales, module, proj, blocks.device, self.hub)
        return module


def _load_kernels(method: str) -> Any:
    if method == "fp8":
        from transformers.integrations.finegrained_fp8 import load_finegrained_fp8_kernel

        return load_finegrained_fp8_kernel()
    import transformers.integrations.mxfp4 as mxfp4
    from transformers.integrations.hub_kernels import get_kernel

    hub = get_kernel("kernels-community/gpt-oss-triton-kernels", version=1)
    mxfp4.triton_kernels_hub = hub  # what replace_with_mxfp4_linear sets for its module
    return hub
