"""Bad checkpoints are refused with one clear error naming the file; nothing partial is left."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgemoe.model.errors import ModelError
from edgemoe.model.shard import shard_checkpoint

Mutation = Callable[[dict[str, torch.Tensor]], None]


def _expert_key(state: dict[str, torch.Tensor]) -> str:
    """One expert tensor: expert 3's first on disk, or a fused [E, ...] one."""
    per_expert = [k for k in state if ".experts.3." in k]
    return (per_expert or [k for k in state if ".experts." in k])[0]


def _dense_key(state: dict[str, torch.Tensor]) -> str:
    return next(k for k in state if "self_attn.o_proj" in k)


def _missing_expert(state: dict[str, torch.Tensor]) -> None:
    del state[_expert_key(state)]


def _missing_dense(state: dict[str, torch.Tensor]) -> None:
    del state[_dense_key(state)]


def _extra(state: dict[str, torch.Tensor]) -> None:
    state["model.layers.0.surprise.weight"] = torch.zeros(4)


def _misnamed(state: dict[str, torch.Tensor]) -> None:
    key = _dense_key(state)
    state[key.replace("o_proj", "out_proj")] = state.pop(key)


def _misnamed_expert(state: dict[str, torch.Tensor]) -> None:
    key = _expert_key(state)
    head, _, tail = key.rpartition(".experts.")
    state[f"{head}.expert.{tail}"] = state.pop(key)


def _wrong_expert_shape(state: dict[str, torch.Tensor]) -> None:
    key = _expert_key(state)
    state[key] = state[key][..., :-1].contiguous()


def _wrong_dtype(state: dict[str, torch.Tensor]) -> None:
    key = _expert_key(state)
    state[key] = state[key].to(torch.float16)


def _wrong_shape(state: dict[str, torch.Tensor]) -> None:
    key = _dense_key(state)
    state[key] = state[key][:, :-1].contiguous()


CASES: dict[str, tuple[Mutation, str]] = {
    "missing-expert-tensor": (_missing_expert, "missing tensor"),
    "missing-dense-tensor": (_missing_dense, "missing tensor .*o_proj"),
    "extra-tensor": (_extra, "unexpected tensor model.layers.0.surprise.weight"),
    "misnamed-tensor": (_misnamed, "unexpected tensor .*out_proj"),
    "misnamed-expert-tensor": (_misnamed_expert, r"unexpected tensor .*\.expert\."),
    "wrong-expert-shape": (_wrong_expert_shape, "has shape"),
    "wrong-dtype": (_wrong_dtype, "dtype torch.float16, expected torch.float32"),
    "wrong-shape": (_wrong_shape, "has shape"),
}


def _assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    ("arch", "layout"), [("mixtral", "original"), ("qwen2_moe", "original"), ("olmoe", "fused")]
)
def test_bad_tensors_are_refused(
    tiny_models, tmp_path: Path, arch: str, layout: str, case: str
) -> None:
    ckpt, _ = tiny_models.get(arch, layout)
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    state = load_file(str(bad / "model.safetensors"))
    mutate, message = CASES[case]
    mutate(state)
    save_file(state, str(bad / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=message) as info:
        shard_checkpoint(bad, out)
    assert str(bad / "model.safetensors") in str(info.value)
    _assert_nothing_written(tmp_path, out)


def test_truncated_checkpoint_is_refused(tiny_models, tmp_path: Path) -> None:
    ckpt, _ = tiny_models.get("olmoe")
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=f"{path}: unreadable safetensors"):
        shard_checkpoint(bad, out)
    _assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    ("model_type", "message"),
    [("not_a_model_family", "unknown architecture"), ("llama", "not a Mixture-of-Experts")],
)
def test_unknown_or_dense_architecture_is_refused(
    tiny_models, tmp_path: Path, model_type: str, message: str
) -> None:
    ckpt, _ = tiny_models.get("mixtral")
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = model_type
    for key in ("num_local_experts", "num_experts_per_tok"):
        config.pop(key)
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=message) as info:
        shard_checkpoint(bad, out)
    assert str(bad / "config.json") in str(info.value)
    _assert_nothing_written(tmp_path, out)


def test_error_midway_leaves_an_existing_shard_dir_untouched(
    tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgemoe.model.shard as shard_mod

    original, _ = tiny_models.get("mixtral")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(original, ckpt)
    out = tmp_path / "out"
    shard_checkpoint(ckpt, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real = shard_mod.read_expert

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise ModelError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_mod, "read_expert", failing)
    os.utime(ckpt / "model.safetensors", ns=(1, 1))  # looks changed: forces a rewrite
    with pytest.raises(ModelError, match="simulated"):
        shard_checkpoint(ckpt, out)
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_refuses_to_overwrite_a_foreign_directory(tiny_models, tmp_path: Path) -> None:
    ckpt, _ = tiny_models.get("mixtral")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not a shard directory"):
        shard_checkpoint(ckpt, out)
    assert (out / "notes.txt").read_text() == "keep me"
