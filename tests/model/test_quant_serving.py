"""Quantized shards served: the same model as the library's own dequantized one, bytes held."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from edgemoe.model.executor import StaticDirectory
from edgemoe.model.local import LocalExperts
from edgemoe.model.quantized import quantize_mxfp4
from edgemoe.model.runtime import load_distributed_model

QUANTIZED = [("gpt_oss", "mxfp4"), ("deepseek_v3", "fp8"), ("qwen3_moe", "fp8")]
PROMPT = "The quick brown fox jumps over the lazy dog, again and again."


def _reference(ckpt):
    """from_pretrained on a CPU dequantizes with the library's own ops: the reference."""
    return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


@pytest.mark.parametrize(("arch", "method"), QUANTIZED)
def test_three_executors_serve_what_the_library_dequantized_model_computes(
    tiny_models, arch: str, method: str
) -> None:
    ckpt, shards = tiny_models.get(arch, quantize=method)
    executors = [LocalExperts(shards) for _ in range(3)]
    manifest = executors[0].manifest
    assert manifest.quantization == method
    assignment = {}
    for layer in range(manifest.num_layers):
        for expert in range(manifest.num_experts):
            i = (layer + 2 * expert) % 3
            executors[i].load(layer, expert)
            assignment[(layer, expert)] = i
    model, tokenizer = load_distributed_model(
        shards, StaticDirectory.split(executors, assignment)
    )
    reference = _reference(ckpt)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    greedy = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False}
    got = model.generate(ids, **greedy)
    assert got.shape[1] == ids.shape[1] + 20
    assert torch.equal(got, reference.generate(ids, **greedy))


@pytest.mark.parametrize(("arch", "method"), QUANTIZED)
def test_expert_dtype_decides_the_bytes_held_in_memory(tiny_models, arch: str, method: str) -> None:
    _, shards = tiny_models.get(arch, quantize=method)
    torch.manual_seed(0)
    hidden = torch.randn(6, 128 if method == "fp8" else 64)
    ids = torch.tensor([[0, 3], [1, -1], [4, 2], [3, 0], [2, 1], [-1, 4]])
    weights = torch.rand(6, 2)
    held, out = {}, {}
    for dtype in ("native", "float32", "bfloat16"):
        local = LocalExperts(shards, expert_dtype=dtype)
        for expert in range(5):
            local.load(0, expert)
        assert local.held_bytes() == 5 * local.expert_memory_bytes()
        held[dtype] = local.expert_memory_bytes()
        out[dtype] = local.forward(0, hidden, ids, weights)
        assert out[dtype].dtype == hidden.dtype  # answered in the caller's dtype
    # On a CPU "native" is dequantize-on-load to the compute dtype (float32 here).
    assert held["native"] == held["float32"] == 2 * held["bfloat16"]
    assert held["bfloat16"] > local.manifest.expert_bytes
    assert torch.equal(out["native"], out["float32"])
    torch.testing.assert_close(out["bfloat16"], out["float32"], rtol=0.05, atol=0.05)


def test_reference_mxfp4_quantizer_round_trips_through_the_library_dequantizer() -> None:
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (3, 8, 64))
    codes[..., ::32] = 7  # every block of 32 holds a +6: the block's scale is exactly 2**exp
    exps = torch.randint(-4, 4, (3, 8, 2))
    grid = torch.tensor(FP4_VALUES)[codes]
    weight = grid * torch.exp2(exps.float()).repeat_interleave(32, dim=-1)
    blocks, scales = quantize_mxfp4(weight)
    assert blocks.shape == (3, 8, 2, 16) and scales.shape == (3, 8, 2)
    # the library dequantizes [E, N, K/32, 16] blocks to the transposed [E, K, N] weight
    back = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(back.transpose(1, 2), weight)
    rough = torch.randn(2, 4, 64)
    approx = convert_moe_packed_tensors(*quantize_mxfp4(rough), dtype=torch.float32)
    # E2M1 steps are at most 2 at the block scale 2**(floor(log2 amax) - 2); values above 6
    # saturate (OCP MX): each value within half of its block's top power of two
    top = torch.exp2(torch.floor(torch.log2(rough.abs().unflatten(-1, (2, 32)).amax(-1))))
    bound = (top / 2).repeat_interleave(32, dim=-1) + 1e-6
    assert bool(((approx.transpose(1, 2) - rough).abs() <= bound).all())
