"""`LocalExperts`: an in-process executor over any subset of experts, loaded from shard files.

Held experts of a layer run through a copy of the family's own fused experts module whose
`[E, ...]` parameters are restricted to the held subset, so the family's math (activation,
biases, clamping, experts implementation) is reused as is. Each (token, slot) pair sent here
becomes one row routed top-1 to its expert; rows are summed back per token with index_add_.

Quantized shards (MXFP4, FP8) are dequantized on load with the library's ops to the compute
dtype (or `expert_dtype`), so the family's own module runs them; only on a CUDA device with
the library's kernels does `expert_dtype="native"` keep them quantized (see `quantized.py`).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from edgemoe.model.errors import ModelError
from edgemoe.model.executor import SMALL_IDS, InThreadExecutor
from edgemoe.model.families import build_model, experts_modules
from edgemoe.model.manifest import Manifest
from edgemoe.model.quantized import EXPERT_DTYPES, NativeExperts, dequantize_expert
from edgemoe.model.shard import file_problem

_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def template_experts(shard_dir: Path, manifest: Manifest) -> nn.Module:
    """A meta-device instance of the family's experts module (no memory), used as a template."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(shard_dir), local_files_only=True)
    meta = build_model(config, meta=True)
    found = experts_modules(meta, manifest.num_experts)
    if not found:
        raise ModelError(f"{shard_dir / 'config.json'}: no fused experts module found")
    return found[0][1]


def restricted_module(
    template: nn.Module, params: dict[str, torch.Tensor], count: int
) -> nn.Module:
    """A shallow copy of `template` with `params` ([count, ...] each) as its parameters."""
    module = copy.copy(template)
    module._parameters = {name: nn.Parameter(t, requires_grad=False) for name, t in params.items()}
    module._buffers = dict(template._buffers)
    module._modules = dict(template._modules)
    for attr in ("num_experts", "num_local_experts"):
        if hasattr(module, attr):
            setattr(module, attr, count)
    return module


class _LayerCache:
    def __init__(self, experts: list[int], module: nn.Module, device: torch.device) -> None:
        self.experts = experts
        self.module = module
        self.index = {e: i for i, e in enumerate(experts)}  # global id -> row of the module
        # experts 0..n-1 all held: a global id is its own row (no table lookup, no new tensor)
        self.identity = experts == list(range(len(experts)))
        self.lookup = torch.full((max(experts) + 1,), -1, dtype=torch.long, device=device)
        self.lookup[torch.tensor(experts, device=device)] = torch.arange(
            len(experts), device=device
        )


def _without_grad() -> contextlib.AbstractContextManager[object]:
    """no_grad where gradients are on; nothing under inference_mode (the model thread, the RPC
    service): entering no_grad inside inference_mode cost ~30 us a call on this CPU, a tenth of
    a tiny model's expert layer at one token."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


class LocalExperts(InThreadExecutor):
    """Holds any subset of (layer, expert) in memory; thread-safe load/drop while serving."""

    is_local = True

    def __init__(
        self,
        shard_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        verify: bool = True,
        template: nn.Module | None = None,
        expert_dtype: str = "native",
    ) -> None:
        self.shard_dir = Path(shard_dir)
        self.manifest = Manifest.load(self.shard_dir)
        self.device = torch.device(device)
        self.verify = verify
        if expert_dtype not in EXPERT_DTYPES:
            raise ModelError(f"expert_dtype must be one of {', '.join(EXPERT_DTYPES)}")
        self._template = template or template_experts(self.shard_dir, self.manifest)
        compute = _COMPUTE_DTYPES.get(self.manifest.dtype, torch.float32)
        # The dtype held experts compute in; None: as stored (plain shards, "native").
        self.expert_dtype = EXPERT_DTYPES[expert_dtype]
        if self.expert_dtype is None and self.manifest.quantization:
            self.expert_dtype = compute
        self._native = (
            NativeExperts.create(self.shard_dir, self.manifest, self.device)
            if expert_dtype == "native" and self.manifest.quantization
            else None
        )
        if self._native is not None:
            self.expert_dtype = None
        self._weights: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._cache: dict[int, _LayerCache] = {}
        self._lock = threading.RLock()
        self._pins: Counter[tuple[int, int]] = Counter()

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def load(self, layer: int, expert: int) -> None:
        """Read one expert's shard (checking size and sha256 against the manifest)."""
        from safetensors.torch import load_file

        if not (0 <= layer < self.manifest.num_layers and 0 <= expert < self.manifest.num_experts):
            raise ModelError(f"{self.shard_dir}: no expert ({layer}, {expert}) in this model")
        rel = Manifest.expert_path(layer, expert)
        path = self.shard_dir / rel
        info = self.manifest.files.get(rel)
        if info is None or not path.is_file():
            raise ModelError(f"{path}: missing expert shard")
        problem = file_problem(path, info) if self.verify else None
        if problem:
            raise ModelError(f"{problem}; the expert shard differs from the manifest")
        try:
            tensors = self._prepare(load_file(str(path), device=str(self.device)))
        except Exception as exc:
            raise ModelError(f"{path}: unreadable expert shard ({exc})") from None
        with self._lock:
            self._weights[(layer, expert)] = tensors
            self._cache.pop(layer, None)

    def load_tensors(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """Hold an expert given as tensors (e.g. received from a peer)."""
        prepared = self._prepare({k: v.to(self.device) for k, v in tensors.items()})
        with self._lock:
            self._weights[(layer, expert)] = prepared
            self._cache.pop(layer, None)

    def _prepare(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Shard tensors -> what is held: dequantized (the library's ops) or cast to
        `expert_dtype`, or kept as stored for the library's quantized kernels."""
        if self._native is not None or self.expert_dtype is None:
            return tensors
        if self.manifest.quantization:
            return dequantize_expert(
                self.manifest.quantization, tensors, self.expert_dtype, self.manifest.config
            )
        return {k: v.to(self.expert_dtype) if v.is_floating_point() else v
                for k, v in tensors.items()}  # fmt: skip

    def expert_memory_bytes(self) -> int:
        """Bytes one expert takes once held: what capacity counts (a dequantized MXFP4
        expert holds about 4x (bfloat16) or 8x (float32) its shard's bytes)."""
        if self.expert_dtype is None:
            return self.manifest.expert_bytes
        size = torch.empty((), dtype=self.expert_dtype).element_size()
        return sum(p[0].numel() * size for p in self._template.parameters(recurse=False))

    def load_all(self) -> LocalExperts:
        for layer in range(self.manifest.num_layers):
            for expert in range(self.manifest.num_experts):
                self.load(layer, expert)
        return self

    def drop(self, layer: int, expert: int) -> bool:
        """Free an expert; False (kept) while a call has it pinned: whoever dropped it no
        longer counts on it, and the daemon frees such strays later."""
        with self._lock:
            if self._pins[(layer, expert)]:
                return False
            self._weights.pop((layer, expert), None)
            self._cache.pop(layer, None)
            return True

    @contextlib.contextmanager
    def pinned(self, keys: Iterable[tuple[int, int]]) -> Iterator[None]:
        """While inside, `drop` leaves these experts held: a call that loaded an expert to
        compute it here cannot lose it to a concurrent migration before it runs."""
        keys = list(keys)
        with self._lock:
            self._pins.update(keys)
        try:
            yield
        finally:
            with self._lock:
                self._pins.subtract(keys)
                self._pins = +self._pins

    def holds(self, layer: int, expert: int) -> bool:
        with self._lock:
            return (layer, expert) in self._weights

    def held(self) -> set[tuple[int, int]]:
        with self._lock:
            return set(self._weights)

    def count_held(self, layer: int, experts: Iterable[int]) -> int:
        """How many of `experts` (one layer's routed ids, repeats counted) are held here: a
        lookup each, for the per-step local share, where copying `held()` (every layer's
        experts: 1664 pairs for DeepSeek-V2-Lite) once per layer and step would cost more."""
        with self._lock:
            return sum((layer, e) in self._weights for e in experts)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(
                t.numel() * t.element_size() for w in self._weights.values() for t in w.values()
            )

    def _layer(self, layer: int) -> _LayerCache | None:
        with self._lock:
            cached = self._cache.get(layer)
            if cached is not None:
                return cached
            experts = sorted(e for (l, e) in self._weights if l == layer)
            if not experts:
                return None
            names = self._weights[(layer, experts[0])].keys()
            params = {
                n: torch.stack([self._weights[(layer, e)][n] for e in experts]) for n in names
            }
            # Keep one copy only: the per-expert entries become views of the stacked tensors.
            for i, e in enumerate(experts):
                self._weights[(layer, e)] = {n: params[n][i] for n in names}
            module = (
                self._native.restricted(params, len(experts))
                if self._native is not None
                else restricted_module(self._template, params, len(experts))
            )
            cached = _LayerCache(experts, module, self.device)
            self._cache[layer] = cached
            return cached

    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Sum over slots with ids >= 0 of weights * expert(hidden); [N, H] like hidden.

        Inputs may live on another device than the held weights (an RPC request arrives on
        the CPU while the experts sit on a GPU): they are moved here, the result moved back.
        """
        caller = hidden.device
        hidden, expert_ids = hidden.to(self.device), expert_ids.to(self.device)
        weights = weights.to(self.device)
        with _without_grad():
            return self._forward(layer, hidden, expert_ids, weights).to(caller)

    def _forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        cached = self._layer(layer)
        whole = self._whole_rows(cached, expert_ids)
        if whole is not None:
            # every slot is a held expert (a node holding all it was routed, an RPC of whole
            # rows): the family's module takes the top-k as the library calls it, without the
            # flatten/index_add_ round (~0.2 ms of a 0.8 ms layer at one token, hidden 512)
            assert cached is not None
            if self.expert_dtype is None:
                return cached.module(hidden, whole, weights)
            result = cached.module(
                hidden.to(self.expert_dtype), whole, weights.to(self.expert_dtype)
            )
            return result.to(hidden.dtype)
        out = torch.zeros_like(hidden)
        rows, slots = torch.nonzero(expert_ids >= 0, as_tuple=True)
        if rows.numel() == 0:
            return out
        ids = expert_ids[rows, slots]
        local = cached.lookup[ids.clamp(max=cached.lookup.numel() - 1)] if cached else None
        if cached is None or bool((ids >= cached.lookup.numel()).any()) or bool((local < 0).any()):
            missing = sorted({int(i) for i in ids} - set(cached.experts if cached else []))
            raise ModelError(f"{self.shard_dir}: layer {layer} experts {missing} are not held here")
        rows_in, row_weights = hidden[rows], weights[rows, slots]
        if self.expert_dtype is not None:
            rows_in, row_weights = rows_in.to(self.expert_dtype), row_weights.to(self.expert_dtype)
        result = cached.module(rows_in, local[:, None], row_weights[:, None])
        out.index_add_(0, rows, result.to(out.dtype))
        return out

    @staticmethod
    def _whole_rows(cached: _LayerCache | None, ids: torch.Tensor) -> torch.Tensor | None:
        """`ids` as rows of the layer's module when every slot names a held expert, else None
        (masked slots or experts not held: the row-by-row path sorts them out)."""
        if cached is None or ids.numel() == 0:
            return None
        n = cached.lookup.numel()
        if ids.numel() <= SMALL_IDS:  # a decode step's few ids: Python beats tensor ops
            flat = ids.reshape(-1).tolist()
            if cached.identity:
                return ids if min(flat) >= 0 and max(flat) < n else None
            local = [cached.index.get(i, -1) for i in flat]
            return None if -1 in local else torch.tensor(local, device=ids.device).view(ids.shape)
        if cached.identity:
            return ids if bool(((ids >= 0) & (ids < n)).all()) else None
        local = cached.lookup[ids.clamp(0, n - 1)]
        return local if bool(((ids >= 0) & (ids < n) & (local >= 0)).all()) else None
