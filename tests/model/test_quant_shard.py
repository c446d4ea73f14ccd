"""Sharding quantized checkpoints as published: every byte and scale kept; others refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgemoe.cli.main import app
from edgemoe.model.manifest import Manifest
from edgemoe.model.shard import verify_shards
from edgemoe.model.tiny import write_tiny_model


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _experts(shards: Path, manifest: Manifest, layer: int) -> list[dict[str, torch.Tensor]]:
    return [
        load_file(str(shards / Manifest.expert_path(layer, e))) for e in range(manifest.num_experts)
    ]


def _check_dense(shards: Path, checkpoint: dict[str, torch.Tensor]) -> set[str]:
    dense = load_file(str(shards / "dense.safetensors"))
    for key, tensor in dense.items():
        assert _bytes(tensor) == _bytes(checkpoint[key]), key
    return set(dense)


def test_mxfp4_expert_shards_keep_every_block_and_scale_byte(tiny_models) -> None:
    ckpt, shards = tiny_models.get("gpt_oss", quantize="mxfp4")
    manifest = verify_shards(shards)
    assert manifest.quantization == "mxfp4"
    checkpoint = load_file(str(ckpt / "model.safetensors"))
    seen = _check_dense(shards, checkpoint)
    for li, decoder_layer in enumerate(manifest.moe_layers):
        module = f"model.layers.{decoder_layer}.mlp.experts"
        for e, tensors in enumerate(_experts(shards, manifest, li)):
            assert set(tensors) == {
                "gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                "down_proj_blocks", "down_proj_scales", "down_proj_bias",
            }  # fmt: skip
            for name, tensor in tensors.items():
                stored = checkpoint[f"{module}.{name}"]
                assert tensor.dtype == stored.dtype
                assert _bytes(tensor) == _bytes(stored[e]), (module, e, name)
                seen.add(f"{module}.{name}")
    assert seen == set(checkpoint)
    assert manifest.expert_bytes == sum(
        t.numel() * t.element_size() for t in _experts(shards, manifest, 0)[0].values()
    )


def test_fp8_expert_shards_keep_every_weight_and_scale_byte_in_the_fused_layout(
    tiny_models,
) -> None:
    ckpt, shards = tiny_models.get("deepseek_v3", quantize="fp8")
    manifest = verify_shards(shards)
    assert manifest.quantization == "fp8"
    assert manifest.config["quantization_config"]["weight_block_size"] == [128, 128]
    checkpoint = load_file(str(ckpt / "model.safetensors"))
    seen = _check_dense(shards, checkpoint)
    for li, decoder_layer in enumerate(manifest.moe_layers):
        prefix = f"model.layers.{decoder_layer}.mlp.experts"
        for e, tensors in enumerate(_experts(shards, manifest, li)):
            # FP8Experts' layout: gate and up stacked into gate_up_proj, scales alike.
            disk = {
                name: checkpoint[f"{prefix}.{e}.{name}"]
                for name in (
                    "gate_proj.weight", "up_proj.weight", "down_proj.weight",
                    "gate_proj.weight_scale_inv", "up_proj.weight_scale_inv",
                    "down_proj.weight_scale_inv",
                )
            }  # fmt: skip
            seen |= {f"{prefix}.{e}.{name}" for name in disk}
            assert tensors["gate_up_proj"].dtype == torch.float8_e4m3fn
            want = {
                "gate_up_proj": _bytes(disk["gate_proj.weight"]) + _bytes(disk["up_proj.weight"]),
                "gate_up_proj_scale_inv": _bytes(disk["gate_proj.weight_scale_inv"])
                + _bytes(disk["up_proj.weight_scale_inv"]),
                "down_proj": _bytes(disk["down_proj.weight"]),
                "down_proj_scale_inv": _bytes(disk["down_proj.weight_scale_inv"]),
            }
            assert {name: _bytes(t) for name, t in tensors.items()} == want
    assert seen == set(checkpoint)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_an_unsupported_quantization_is_refused_in_one_line(tmp_path: Path, method: str) -> None:
    ckpt = write_tiny_model("qwen3_moe", tmp_path / "ckpt", seed=1)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (ckpt / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["shard", str(ckpt), str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"'{method}' is not supported" in lines[0] and "mxfp4" in lines[0] and "fp8" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_writes_and_shards_a_quantized_tiny_model(tmp_path: Path) -> None:
    runner = CliRunner()
    ckpt, out = tmp_path / "gpt", tmp_path / "gpt-shards"
    made = runner.invoke(
        app, ["model", "tiny", str(ckpt), "--arch", "gpt_oss", "--quantize", "mxfp4"]
    )
    assert made.exit_code == 0, made.output
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    sharded = runner.invoke(app, ["shard", str(ckpt), str(out)])
    assert sharded.exit_code == 0, sharded.output
    checked = runner.invoke(app, ["shard", "verify", str(out)])
    assert checked.exit_code == 0 and checked.stdout.startswith("ok:")
    wrong = runner.invoke(app, ["model", "tiny", str(tmp_path / "m"), "--arch", "mixtral",
                                "--quantize", "mxfp4"])  # fmt: skip
    assert wrong.exit_code == 2 and "GPT-OSS" in wrong.stderr
