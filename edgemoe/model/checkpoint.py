"""Reading an HF checkpoint directory tensor by tensor, through transformers' own conversion rules.

Checkpoint keys are mapped to the model's parameter names with the `WeightRenaming` and
`WeightConverter` list that `from_pretrained` applies (`get_model_conversion_mapping`). A key
that a converter folds into a fused `[E, ...]` expert parameter (e.g. Mixtral's
`experts.3.w1.weight`) is recorded per expert; building one expert's slice then runs the same
converter's operations on just that expert's tensors, so no per-family table is kept here.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgemoe.model.errors import ModelError
from edgemoe.model.families import (
    build_model,
    decoder_layer_index,
    experts_modules,
    fp32_kept,
    load_config,
    num_experts_of,
    top_k_of,
)
from edgemoe.model.quantized import quant_method, quantize_meta_model, weight_conversions

_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class TensorRef:
    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class ConvertedGroup:
    """Per-expert disk tensors that one transformers converter folds into fused parameters."""

    converter: Any
    parts: dict[str, dict[int, TensorRef]] = field(default_factory=dict)  # pattern -> expert -> ref


@dataclass
class ExpertLayerPlan:
    """Where each fused parameter of one MoE layer's experts module comes from on disk."""

    decoder_layer: int
    module: str  # e.g. model.layers.1.mlp.experts
    shapes: dict[str, tuple[int, ...]]  # param -> [E, ...] shape
    fused: dict[str, TensorRef] = field(default_factory=dict)  # param stored fused on disk
    groups: list[ConvertedGroup] = field(default_factory=list)


@dataclass
class CheckpointPlan:
    model_dir: Path
    config: Any
    dtype: torch.dtype
    num_experts: int
    top_k: int
    dense: dict[str, TensorRef]
    layers: list[ExpertLayerPlan]
    files: list[Path]
    quantization: str | None = None  # "mxfp4" | "fp8": experts kept as stored, with scales

    @property
    def dense_bytes(self) -> int:
        return sum(_nbytes(r) for r in self.dense.values())

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def largest_tensor_bytes(self) -> int:
        refs = list(self.dense.values())
        for layer in self.layers:
            refs += list(layer.fused.values())
            refs += [r for g in layer.groups for by_e in g.parts.values() for r in by_e.values()]
        return max(_nbytes(r) for r in refs)


def _nbytes(ref: TensorRef) -> int:
    n = 1
    for d in ref.shape:
        n *= d
    return n * torch.empty((), dtype=ref.dtype).element_size()


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise ModelError(f"{index}: unreadable index: {exc}") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors checkpoint files")
    return files


def _scan(files: list[Path]) -> Iterator[TensorRef]:
    from safetensors import safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    sl = fh.get_slice(key)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise ModelError(
                            f"{path}: tensor {key} has unsupported dtype {sl.get_dtype()}"
                        )
                    yield TensorRef(path, key, dtype, tuple(sl.get_shape()))
        except ModelError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelError(f"{path}: unreadable safetensors file ({exc})") from None


def _split_conversions(model: torch.nn.Module) -> tuple[list[Any], list[Any]]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def plan_checkpoint(model_dir: str | Path) -> CheckpointPlan:
    """Map every tensor of the checkpoint to a dense parameter or an expert slice; check all.

    Refuses (ModelError naming the file) an unknown or non-MoE architecture, extra or missing
    tensors, wrong dtypes or shapes, and unreadable files. Reads headers only. A quantized
    checkpoint (MXFP4, block-scaled FP8) is planned against the library's quantized modules,
    so its experts keep their quantized tensors and scales; other methods are refused.
    """
    from transformers.core_model_loading import apply_renamings, rename_source_key

    root = Path(model_dir)
    config = load_config(root)
    method = quant_method(config, str(root / "config.json"))
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else None
    files = checkpoint_files(root)
    refs = list(_scan(files))
    if dtype is None:
        dtype = refs[0].dtype
    config.dtype = dtype
    meta = build_model(config, meta=True, dtype=dtype)
    if method is not None:
        meta = quantize_meta_model(meta, config, method)
    num_experts = num_experts_of(config)
    expected = {k: v for k, v in meta.state_dict().items()}
    experts = experts_modules(meta, num_experts)
    if not experts:
        raise ModelError(
            f"{root / 'config.json'}: {config.model_type!r} has no fused experts modules"
        )
    layers = [
        ExpertLayerPlan(
            decoder_layer_index(name),
            name,
            {p: tuple(t.shape) for p, t in mod.named_parameters(recurse=False)},
        )
        for name, mod in experts
    ]
    by_module = {plan.module: plan for plan in layers}
    renamings, converters = _split_conversions(meta)
    if method is not None:
        converters = weight_conversions(meta, config, converters)
    stored = _stored_dtypes(meta) if method is not None else {}
    # What the family keeps in float32 in some half dtype (float16 asks for both of its lists).
    kept_fp32 = fp32_kept(meta, torch.float16)
    dense: dict[str, TensorRef] = {}
    groups: dict[tuple[str, int], ConvertedGroup] = {}

    for ref in refs:
        renamed = apply_renamings(ref.key, renamings)
        target, pattern = rename_source_key(
            ref.key, renamings, converters, meta.base_model_prefix, expected
        )
        if (
            ref.dtype != dtype
            and not (ref.dtype == torch.float32 and kept_fp32(target))
            and ref.dtype != stored.get(target)
        ):
            raise ModelError(
                f"{ref.file}: tensor {ref.key} has dtype {ref.dtype}, expected {dtype}"
            )
        module, _, param = target.rpartition(".")
        plan = by_module.get(module)
        if plan is not None and param in plan.shapes:
            if pattern is None:
                if ref.shape != plan.shapes[param]:
                    raise ModelError(
                        f"{ref.file}: tensor {ref.key} has shape {list(ref.shape)}, "
                        f"expected {list(plan.shapes[param])}"
                    )
                plan.fused[param] = ref
                continue
            match = _EXPERT_INDEX.search(renamed)
            expert = int(match.group(1)) if match else -1
            if not 0 <= expert < num_experts:
                raise ModelError(f"{ref.file}: tensor {ref.key} names no valid expert index")
            converter = next(c for c in converters if pattern in c.source_patterns)
            group = groups.get((module, id(converter)))
            if group is None:
                group = groups[(module, id(converter))] = ConvertedGroup(converter)
                plan.groups.append(group)
            slot = group.parts.setdefault(pattern, {})
            if expert in slot:
                raise ModelError(f"{ref.file}: tensor {ref.key} duplicates expert {expert}")
            slot[expert] = ref
        elif target in expected and pattern is None:
            want = tuple(expected[target].shape)
            if ref.shape != want:
                raise ModelError(
                    f"{ref.file}: tensor {ref.key} has shape {list(ref.shape)}, "
                    f"expected {list(want)}"
                )
            if target in dense:
                raise ModelError(f"{ref.file}: tensor {ref.key} appears twice")
            dense[target] = ref
        else:
            raise ModelError(
                f"{ref.file}: unexpected tensor {ref.key} (not in {type(meta).__name__})"
            )

    tied = _tied_keys(meta)
    expert_keys = {f"{p.module}.{name}" for p in layers for name in p.shapes}
    for key in expected:
        if key not in dense and key not in expert_keys and key not in tied:
            raise ModelError(f"{_where(files)}: missing tensor {key}")
    for plan in layers:
        covered = set(plan.fused)
        for group in plan.groups:
            for pattern in group.converter.source_patterns:
                have = group.parts.get(pattern, {})
                lacking = sorted(set(range(num_experts)) - set(have))
                if lacking:
                    raise ModelError(
                        f"{_where(files)}: missing tensor for {plan.module} pattern {pattern!r} "
                        f"expert {lacking[0]}"
                    )
            _check_group_shapes(plan, group)
            covered |= set(_converted_params(plan, group))
        lacking_params = sorted(set(plan.shapes) - covered)
        if lacking_params:
            raise ModelError(f"{_where(files)}: missing tensor {plan.module}.{lacking_params[0]}")
    return CheckpointPlan(
        root, config, dtype, num_experts, top_k_of(config), dense, layers, files, method
    )


def _stored_dtypes(meta: torch.nn.Module) -> dict[str, torch.dtype]:
    """Dtypes a quantized checkpoint stores (FP8 weights, float32 or uint8 scales, packed
    FP4 blocks) by parameter name, as the library's quantized modules declare them."""
    quantized = {torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8}
    return {
        name: value.dtype
        for name, value in meta.state_dict().items()
        if value.dtype in quantized or name.endswith(("_scale_inv", ".activation_scale"))
    }


def _where(files: list[Path]) -> str:
    return (
        str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} safetensors files)"
    )


def _tied_keys(model: torch.nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(tied) if isinstance(tied, dict | list | set) else set()


def _converted_params(plan: ExpertLayerPlan, group: ConvertedGroup) -> list[str]:
    return [
        t.rpartition(".")[2]
        for t in group.converter.target_patterns
        if t.rpartition(".")[2] in plan.shapes
    ]


def read_expert(
    plan: ExpertLayerPlan, expert: int, handles: FileHandles
) -> dict[str, torch.Tensor]:
    """One expert's slice of every fused parameter of a layer, via the family's converter ops."""
    out: dict[str, torch.Tensor] = {}
    for param, ref in plan.fused.items():
        out[param] = handles.row(ref, expert)
    for group in plan.groups:
        sources = {pattern: handles.read(by_e[expert]) for pattern, by_e in group.parts.items()}
        out.update(_convert(plan, group, sources))  # empties `sources`
    for param, shape in plan.shapes.items():
        if tuple(out[param].shape) != shape[1:]:
            raise ModelError(
                f"{plan.module}.{param}: expert {expert} slice has shape {list(out[param].shape)}, "
                f"expected {list(shape[1:])}"
            )
    return out


def _convert(
    plan: ExpertLayerPlan, group: ConvertedGroup, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One expert's disk tensors (pattern -> tensor) through the family's converter ops.

    `tensors` is emptied: the ops drop each input once used, so a source tensor is freed as
    soon as its converted result exists (peak: sources plus one result, not all of them).
    """
    conv = group.converter
    state: dict[str, Any] = {pattern: [tensors.pop(pattern)] for pattern in list(tensors)}
    for op in conv.operations:
        state = op.convert(
            state, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        param = key.rpartition(".")[2]
        if param not in plan.shapes:
            raise ModelError(f"{plan.module}: converter produced unknown parameter {key!r}")
        out[param] = value.squeeze(0).contiguous() if value.shape[0] == 1 else value
    return out


def _check_group_shapes(plan: ExpertLayerPlan, group: ConvertedGroup) -> None:
    """Every expert's disk tensors have one shape per pattern, and convert to the slice shape.

    Checked on meta tensors from the headers, so a bad shape is refused (naming the file)
    before anything is written, not halfway through sharding.
    """
    for by_e in group.parts.values():
        shapes = Counter(ref.shape for ref in by_e.values())
        common = shapes.most_common(1)[0][0]
        for ref in by_e.values():
            if ref.shape != common:
                raise ModelError(
                    f"{ref.file}: tensor {ref.key} has shape {list(ref.shape)}, expected "
                    f"{list(common)} like the other experts"
                )
    refs = {pattern: by_e[min(by_e)] for pattern, by_e in group.parts.items()}
    where = next(iter(refs.values())).file
    keys = ", ".join(ref.key for ref in refs.values())
    try:
        converted = _convert(
            plan,
            group,
            {p: torch.empty(r.shape, dtype=r.dtype, device="meta") for p, r in refs.items()},
        )
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ModelError(
            f"{where}: tensors {keys} do not combine into {plan.module} ({exc})"
        ) from None
    for param, value in converted.items():
        want = plan.shapes[param][1:]
        if tuple(value.shape) != want:
            raise ModelError(
                f"{where}: tensors {keys} give {plan.module}.{param} of shape "
                f"{list(value.shape)}, expected {list(want)}"
            )


class SafetensorsReader:
    """Reads tensors of one safetensors file with pread, not mmap.

    safe_open maps the file, and every page touched stays in the process's RSS until the
    file is closed; reading into fresh buffers keeps the sharder's memory to what it holds.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            (length,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, length, 8))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            os.close(self._fd)
            raise ModelError(f"{path}: unreadable safetensors header ({exc})") from None
        header.pop("__metadata__", None)
        self._base = 8 + length
        self._entries: dict[str, dict[str, Any]] = header

    def _read(self, key: str, start: int, stop: int, shape: list[int]) -> torch.Tensor:
        entry = self._entries[key]
        dtype = _DTYPES[entry["dtype"]]
        size = stop - start
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        # An anonymous mapping, not a bytearray: it goes back to the kernel as soon as the
        # tensor is dropped, where malloc would keep freed heap pages in the RSS.
        buf = mmap.mmap(-1, size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = os.preadv(self._fd, [view[got:]], self._base + start + got)
            if n <= 0:
                raise ModelError(f"{self.path}: truncated while reading tensor {key}")
            got += n
        view.release()
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def tensor(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        start, stop = entry["data_offsets"]
        return self._read(key, start, stop, entry["shape"])

    def row(self, key: str, index: int) -> torch.Tensor:
        """tensor[index] of a tensor, reading only that slice's bytes."""
        entry = self._entries[key]
        start, stop = entry["data_offsets"]
        shape = entry["shape"]
        step = (stop - start) // shape[0]
        return self._read(key, start + index * step, start + (index + 1) * step, shape[1:])

    def close(self) -> None:
        os.close(self._fd)


class FileHandles:
    """Open checkpoint files once each and read tensors from them."""

    def __init__(self) -> None:
        self._open: dict[Path, SafetensorsReader] = {}

    def get(self, path: Path) -> SafetensorsReader:
        reader = self._open.get(path)
        if reader is None:
            try:
                reader = SafetensorsReader(path)
            except OSError as exc:
                raise ModelError(f"{path}: unreadable safetensors file ({exc})") from None
            self._open[path] = reader
        return reader

    def read(self, ref: TensorRef) -> torch.Tensor:
        return self.get(ref.file).tensor(ref.key)

    def row(self, ref: TensorRef, index: int) -> torch.Tensor:
        return self.get(ref.file).row(ref.key, index)

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()

    def __enter__(self) -> FileHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
