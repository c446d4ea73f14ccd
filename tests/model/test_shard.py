"""Sharding: round trip to the checkpoint's tensors, idempotence, verification, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from edgemoe.cli.main import app
from edgemoe.model.errors import ModelError
from edgemoe.model.manifest import Manifest
from edgemoe.model.shard import shard_checkpoint, verify_shards


@pytest.mark.parametrize("layout", ["original", "fused"])
def test_reassembled_shards_equal_the_checkpoint_tensors(
    tiny_models, arch: str, layout: str
) -> None:
    ckpt, shards = tiny_models.get(arch, layout)
    manifest = Manifest.load(shards)
    reference = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    want = reference.state_dict()
    dense = load_file(str(shards / "dense.safetensors"))
    experts_names = set()
    for li, decoder_layer in enumerate(manifest.moe_layers):
        parts = [
            load_file(str(shards / Manifest.expert_path(li, e)))
            for e in range(manifest.num_experts)
        ]
        prefix = next(k for k in want if f"layers.{decoder_layer}." in k and ".experts." in k)
        module = prefix.rpartition(".")[0]
        for name in parts[0]:
            stacked = torch.stack([p[name] for p in parts])
            assert torch.equal(stacked, want[f"{module}.{name}"]), f"{module}.{name}"
            experts_names.add(f"{module}.{name}")
    for key, tensor in dense.items():
        assert torch.equal(tensor, want[key]), key
    assert set(dense) | experts_names == set(want)
    assert manifest.architecture == arch
    assert manifest.top_k == 2 and manifest.num_experts == 8


def test_second_run_is_idempotent_and_rewrites_nothing(tiny_models, tmp_path: Path) -> None:
    ckpt, _ = tiny_models.get("olmoe")
    out = tmp_path / "shards"
    reports: list[tuple[int, int]] = []
    first, written = shard_checkpoint(ckpt, out, progress=lambda *r: reports.append(r))
    assert written
    total = 1 + first.num_layers * first.num_experts  # dense part, then each expert
    assert reports == [(i, total) for i in range(1, total + 1)]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    second, written_again = shard_checkpoint(ckpt, out)
    assert not written_again
    assert second.fingerprint == first.fingerprint
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert sorted(os.listdir(tmp_path)) == ["shards"]


def test_fingerprint_is_deterministic_and_depends_on_weights(tmp_path: Path) -> None:
    from edgemoe.model.tiny import write_tiny_model

    prints = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        ckpt = write_tiny_model("qwen2_moe", tmp_path / name, seed=seed)
        prints.append(shard_checkpoint(ckpt, tmp_path / f"{name}-shards")[0].fingerprint)
    assert prints[0] == prints[1] != prints[2]


def _copy_shards(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_detects_truncated_and_corrupt_shards(tiny_models, tmp_path: Path) -> None:
    _, shards = tiny_models.get("mixtral")
    assert verify_shards(shards).num_layers == 2
    bad = _copy_shards(shards, tmp_path / "trunc")
    victim = bad / Manifest.expert_path(1, 5)
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ModelError, match=r"E5\.safetensors.*truncated"):
        verify_shards(bad)
    bad = _copy_shards(shards, tmp_path / "flip")
    victim = bad / Manifest.expert_path(0, 2)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"L0/E2\.safetensors: blake3 mismatch"):
        verify_shards(bad)
    bad = _copy_shards(shards, tmp_path / "gone")
    (bad / "dense.safetensors").unlink()
    with pytest.raises(ModelError, match=r"dense\.safetensors: missing"):
        verify_shards(bad)


def test_files_are_checked_by_blake3_and_by_sha256_in_older_manifests(tiny_models, tmp_path: Path
                                                                      ) -> None:  # fmt: skip
    import hashlib

    import blake3

    _, shards = tiny_models.get("mixtral")
    manifest = Manifest.load(shards)
    for rel, info in manifest.files.items():  # both digests of the bytes on disk
        data = (shards / rel).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert info["blake3"] == blake3.blake3(data).hexdigest()
    old = _copy_shards(shards, tmp_path / "old")
    raw = json.loads((old / "manifest.json").read_text())
    for info in raw["files"].values():
        del info["blake3"]  # a manifest written before BLAKE3 was recorded
    (old / "manifest.json").write_text(json.dumps(raw))
    assert verify_shards(old).num_layers == 2
    victim = old / Manifest.expert_path(1, 0)
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x04
    victim.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"L1/E0\.safetensors: sha256 mismatch"):
        verify_shards(old)


def test_a_corrupt_shard_is_refused_when_loaded(tiny_models, tmp_path: Path) -> None:
    from edgemoe.model.local import LocalExperts

    _, shards = tiny_models.get("mixtral")
    bad = _copy_shards(shards, tmp_path / "bad")
    victim = bad / Manifest.expert_path(0, 1)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    local = LocalExperts(bad)
    local.load(0, 0)
    with pytest.raises(ModelError, match=r"E1\.safetensors"):
        local.load(0, 1)
    assert local.held() == {(0, 0)}


def test_a_corrupt_dense_part_is_refused_when_the_model_loads(tiny_models, tmp_path: Path) -> None:
    from edgemoe.model.executor import StaticDirectory
    from edgemoe.model.local import LocalExperts
    from edgemoe.model.runtime import load_distributed_model

    _, shards = tiny_models.get("qwen2_moe")
    bad = _copy_shards(shards, tmp_path / "bad")
    victim = bad / "dense.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # a flipped bit in a weight: still a valid safetensors file
    victim.write_bytes(bytes(data))
    local = LocalExperts(bad).load_all()
    with pytest.raises(ModelError, match=rf"{victim}: blake3 mismatch"):
        load_distributed_model(bad, StaticDirectory(local))


def test_cli_tiny_shard_verify_in_process(tmp_path: Path) -> None:
    runner = CliRunner()
    ckpt = tmp_path / "ck"
    result = runner.invoke(app, ["model", "tiny", "--arch", "qwen3_moe", str(ckpt), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen3_moe"
    result = runner.invoke(app, ["shard", str(ckpt), str(tmp_path / "sh")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    result = runner.invoke(app, ["shard", "verify", str(tmp_path / "sh")])
    assert result.exit_code == 0 and "ok: " in result.output
    result = runner.invoke(app, ["shard", "verify", str(tmp_path / "nothing")])
    assert result.exit_code != 0


def test_cli_as_a_subprocess_reports_errors_on_one_line(tiny_models, tmp_path: Path) -> None:
    _, shards = tiny_models.get("mixtral")
    bad = _copy_shards(shards, tmp_path / "bad")
    victim = bad / Manifest.expert_path(0, 0)
    victim.write_bytes(victim.read_bytes()[:100])
    cmd = [sys.executable, "-m", "edgemoe.cli", "shard", "verify"]
    ok = subprocess.run([*cmd, str(shards)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "ok:" in ok.stdout
    broken = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, timeout=120)
    assert broken.returncode != 0
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1 and "L0/E0.safetensors" in lines[0]
    assert "Traceback" not in broken.stderr


def test_bench_shard_prints_throughput_and_memory_figures() -> None:
    result = CliRunner().invoke(app, ["bench", "shard", "--size-mb", "8", "--arch", "olmoe"])
    assert result.exit_code == 0, result.output
    figures = {}
    for line in result.output.splitlines():
        name, _, rest = line.partition("  ")
        figures[name.strip()] = rest.strip()
    checkpoint_mb = float(figures["checkpoint"].split()[0])
    assert 8 <= checkpoint_mb < 16
    assert "MB/s" in figures["shard time"]
    assert float(figures["peak RSS while sharding"].split()[0]) > 0


def test_multi_file_bf16_tied_checkpoint_shards_and_serves(tmp_path: Path) -> None:
    from edgemoe.model.executor import StaticDirectory
    from edgemoe.model.local import LocalExperts
    from edgemoe.model.runtime import load_distributed_model
    from edgemoe.model.tiny import write_tiny_model

    ckpt = write_tiny_model("qwen2_moe", tmp_path / "ck", dtype=torch.bfloat16, seed=5)
    config = json.loads((ckpt / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    state = load_file(str(ckpt / "model.safetensors"))
    del state["lm_head.weight"]
    (ckpt / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(ckpt / name))
        weight_map |= dict.fromkeys(part, name)
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    manifest, _ = shard_checkpoint(ckpt, tmp_path / "sh")
    assert manifest.dtype == "bfloat16"
    local = LocalExperts(tmp_path / "sh").load_all()
    model, tokenizer = load_distributed_model(tmp_path / "sh", StaticDirectory(local))
    reference = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    ids = tokenizer("tied and split across files", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-2)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    gen = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(ids, **gen), reference.generate(ids, **gen))


def test_float32_tensors_the_family_keeps_in_fp32_are_accepted(tmp_path: Path) -> None:
    from edgemoe.model.executor import StaticDirectory
    from edgemoe.model.local import LocalExperts
    from edgemoe.model.runtime import load_distributed_model
    from edgemoe.model.tiny import write_tiny_model

    ckpt = write_tiny_model("deepseek_v3", tmp_path / "ck", dtype=torch.bfloat16)
    state = load_file(str(ckpt / "model.safetensors"))
    biases = [k for k in state if k.endswith("e_score_correction_bias")]
    assert biases
    for key in biases:
        state[key] = torch.randn(state[key].shape) * 0.01
    save_file(state, str(ckpt / "model.safetensors"))
    shard_checkpoint(ckpt, tmp_path / "sh")
    local = LocalExperts(tmp_path / "sh").load_all()
    model, tokenizer = load_distributed_model(tmp_path / "sh", StaticDirectory(local))
    loaded = model.get_buffer(biases[0])
    assert loaded.dtype == torch.float32 and torch.equal(loaded, state[biases[0]])
    reference = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    ids = tokenizer("kept in float32", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-2)
