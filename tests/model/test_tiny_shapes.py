"""`edgemoe model tiny` shape options: a DeepSeek-V2-Lite-shaped model with tiny experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgemoe.cli.main import app
from edgemoe.model.errors import ModelError
from edgemoe.model.shard import shard_checkpoint
from edgemoe.model.tiny import TinyShape, shaped_config_kwargs, write_tiny_model

LITE = ["--layers", "26", "--experts", "64", "--top-k", "6", "--shared-experts", "2",
        "--hidden-size", "2048", "--expert-width", "8", "--dtype", "bfloat16"]  # fmt: skip


def test_cli_writes_a_deepseek_v2_lite_shaped_model_that_shards_and_runs(tmp_path: Path) -> None:
    ckpt = tmp_path / "lite"
    result = CliRunner().invoke(app, ["model", "tiny", "--arch", "deepseek_v2", str(ckpt), *LITE])
    assert result.exit_code == 0, result.output
    config = json.loads((ckpt / "config.json").read_text())
    assert config["num_hidden_layers"] == 27  # 26 MoE layers after the one dense layer
    assert (config["n_routed_experts"], config["num_experts_per_tok"]) == (64, 6)
    assert (config["n_shared_experts"], config["hidden_size"]) == (2, 2048)
    assert (config["moe_intermediate_size"], config["dtype"]) == (8, "bfloat16")
    manifest, _ = shard_checkpoint(ckpt, tmp_path / "shards")
    assert (manifest.num_layers, manifest.num_experts, manifest.top_k) == (26, 64, 6)
    assert manifest.dtype == "bfloat16"
    assert manifest.hidden_size == 2048
    assert manifest.expert_bytes == 3 * 8 * 2048 * 2  # gate, up, down of width 8 in bf16

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    with torch.inference_mode():
        out = model(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    assert out.hidden_states[-1].shape == (1, 3, 2048)
    assert out.hidden_states[-1].dtype == torch.bfloat16


def test_shape_options_map_onto_each_familys_own_keys() -> None:
    shape = TinyShape(layers=3, experts=16, top_k=4, hidden_size=128, expert_width=12)
    mixtral = shaped_config_kwargs("mixtral", shape)
    assert (mixtral["num_hidden_layers"], mixtral["num_local_experts"]) == (3, 16)
    assert (mixtral["num_experts_per_tok"], mixtral["intermediate_size"]) == (4, 12)
    assert mixtral["head_dim"] == 16  # attention stays small as the hidden size grows
    qwen2 = shaped_config_kwargs("qwen2_moe", TinyShape(experts=16, shared_experts=2,
                                                        expert_width=12))  # fmt: skip
    assert (qwen2["num_experts"], qwen2["moe_intermediate_size"]) == (16, 12)
    assert qwen2["shared_expert_intermediate_size"] == 24
    assert shaped_config_kwargs("olmoe") == shaped_config_kwargs("olmoe", TinyShape())


@pytest.mark.parametrize(
    ("arch", "shape", "message"),
    [
        ("mixtral", TinyShape(shared_experts=1), "no shared experts"),
        ("olmoe", TinyShape(experts=4, top_k=6), "top-k 6 exceeds 4 experts"),
        ("qwen3_moe", TinyShape(layers=0), "layers must be >= 1"),
    ],
)
def test_impossible_shapes_are_refused_clearly(arch: str, shape: TinyShape, message: str,
                                               tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(ModelError, match=message):
        write_tiny_model(arch, tmp_path / "x", shape=shape)
    assert not (tmp_path / "x").exists()


def test_cli_refuses_an_unknown_dtype(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["model", "tiny", "--arch", "mixtral", str(tmp_path / "x"), "--dtype", "int3"]
    )
    assert result.exit_code == 2 and "unknown dtype 'int3'" in result.output
