"""`edgemoe shard`: split a checkpoint into a dense file and one file per routed expert.

Streams tensor by tensor (only the dense part and one expert are in memory at once), writes
into a staging directory beside OUT_DIR and swaps it in only when everything is written, so
an error leaves nothing partial; a second run on an up-to-date OUT_DIR does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any

from edgemoe.model.checkpoint import CheckpointPlan, FileHandles, plan_checkpoint, read_expert
from edgemoe.model.errors import ModelError
from edgemoe.model.manifest import DENSE_NAME, MANIFEST_NAME, FileCheck, Manifest, describe_file
from edgemoe.model.safetensors_io import PendingTensor, in_memory, write_streaming

Progress = Callable[[int, int], None]  # (units done, units total)
_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def _source_record(plan: CheckpointPlan) -> dict[str, Any]:
    """Identifies the input cheaply (names, sizes, mtimes, config text) for idempotent reruns."""
    record: dict[str, Any] = {
        f.name: {"bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in plan.files
    }
    record["config.json"] = hashlib.sha256(
        (plan.model_dir / "config.json").read_bytes()
    ).hexdigest()
    return record


def shard_checkpoint(
    model_dir: str | Path, out_dir: str | Path, *, progress: Progress | None = None
) -> tuple[Manifest, bool]:
    """Shard `model_dir` into `out_dir`; returns (manifest, written) (False: already up to date)."""
    plan = plan_checkpoint(model_dir)
    out = Path(out_dir)
    source = _source_record(plan)
    if (out / MANIFEST_NAME).exists():
        try:
            old = verify_shards(out)
        except ModelError:
            old = None
        if old is not None and old.source == source:
            return old, False
    elif out.exists() and any(out.iterdir()):
        raise ModelError(f"{out}: exists, is not empty and is not a shard directory; refusing")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    total = 1 + len(plan.layers) * plan.num_experts
    done = 0
    try:
        files: dict[str, dict[str, Any]] = {}
        with FileHandles() as handles:
            pending = [
                PendingTensor(name, ref.dtype, ref.shape, partial(handles.read, ref))
                for name, ref in plan.dense.items()
            ]
            files[DENSE_NAME] = write_streaming(staging / DENSE_NAME, pending)
            done += 1
            if progress:
                progress(done, total)
            expert_bytes = 0
            for li, layer in enumerate(plan.layers):
                (staging / f"experts/L{li}").mkdir(parents=True)
                for e in range(plan.num_experts):
                    tensors = read_expert(layer, e, handles)
                    rel = Manifest.expert_path(li, e)
                    expert_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
                    files[rel] = write_streaming(staging / rel, in_memory(tensors))
                    del tensors
                    _return_freed_memory()
                    done += 1
                    if progress:
                        progress(done, total)
        for name in _SIDE_FILES:
            src = plan.model_dir / name
            if src.exists():
                shutil.copyfile(src, staging / name)
                files[name] = describe_file(staging / name)
        config = json.loads((plan.model_dir / "config.json").read_text())
        manifest = Manifest(
            architecture=plan.config.model_type,
            config=config,
            dtype=str(plan.dtype).removeprefix("torch."),
            moe_layers=[layer.decoder_layer for layer in plan.layers],
            num_experts=plan.num_experts,
            top_k=plan.top_k,
            hidden_size=int(plan.config.hidden_size),
            expert_bytes=expert_bytes,
            files=files,
            fingerprint=_fingerprint(plan.config.model_type, config, files),
            expert_params=sorted(plan.layers[0].shapes),
            source=source,
            quantization=plan.quantization,
        )
        manifest.save(staging)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest, True


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the kernel (glibc `malloc_trim`; elsewhere a no-op).

    The converter ops allocate each expert's intermediate tensors with malloc; below glibc's
    (adaptive) mmap threshold they come from the heap, whose freed pages stay in the RSS and
    fragment, so without this the RSS crept up by about one expert per expert written.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _fingerprint(arch: str, config: dict[str, Any], files: dict[str, dict[str, Any]]) -> str:
    digest = hashlib.sha256(arch.encode())
    digest.update(json.dumps(config, sort_keys=True).encode())
    for rel in sorted(files):
        digest.update(f"{rel}:{files[rel]['sha256']}".encode())
    return digest.hexdigest()


def _swap_in(staging: Path, out: Path) -> None:
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        out.rename(trash)
        staging.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out)


def file_problem(path: Path, info: dict[str, Any]) -> str | None:
    """What is wrong with one shard file against its manifest entry, or None."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != info["bytes"]:
        return f"{path}: {size} bytes, expected {info['bytes']} (truncated?)"
    check = FileCheck.of(info)
    if not check.file_matches(path):
        return f"{path}: {check.name} mismatch (corrupt)"
    return None


def verify_shards(shard_dir: str | Path) -> Manifest:
    """Check every file of the manifest (present, size, digest) and that no expert is missing."""
    root = Path(shard_dir)
    manifest = Manifest.load(root)
    problems: list[str] = []
    wanted = {DENSE_NAME} | {
        Manifest.expert_path(li, e)
        for li in range(manifest.num_layers)
        for e in range(manifest.num_experts)
    }
    problems += [
        f"{root / rel}: not listed in the manifest" for rel in sorted(wanted - set(manifest.files))
    ]
    for rel, info in sorted(manifest.files.items()):
        problem = file_problem(root / rel, info)
        if problem:
            problems.append(problem)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelError(problems[0] + more)
    return manifest
