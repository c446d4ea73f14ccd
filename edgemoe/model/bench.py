"""`edgemoe bench shard`: sharding throughput and peak memory on a tiny model scaled up.

The sharding runs in a child process so its peak RSS is its own; the child resets the
kernel's high-water mark (/proc/self/clear_refs) after importing torch and transformers, so
the growth reported excludes the interpreter's baseline (python, torch, transformers and
the family's modeling code, imported by a first header-only pass).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def scale_for_size(arch: str, target_bytes: int) -> int:
    """Smallest width multiplier whose float32 checkpoint reaches `target_bytes`."""
    from transformers import AutoConfig

    from edgemoe.model.families import build_model, tiny_config_kwargs

    def size(scale: int) -> int:
        kwargs = tiny_config_kwargs(arch)
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key]) * scale
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        model = build_model(AutoConfig.for_model(arch, **kwargs), meta=True)
        return sum(p.numel() * 4 for p in model.parameters())

    lo, hi = 1, 1
    while size(hi) < target_bytes:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if size(mid) < target_bytes:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _read_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child_main(model_dir: str, out_dir: str) -> None:
    """Run in the child: shard and print JSON figures."""
    from edgemoe.model.checkpoint import plan_checkpoint
    from edgemoe.model.shard import shard_checkpoint

    plan_checkpoint(model_dir)  # imports the family's modeling code: part of the baseline
    baseline = _read_status("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    start = time.perf_counter()
    shard_checkpoint(model_dir, out_dir)
    seconds = time.perf_counter() - start
    peak = _read_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {"seconds": seconds, "baseline_rss": baseline, "peak_rss": peak, "hwm_reset": reset}
        )
    )


@dataclass
class ShardBench:
    arch: str
    checkpoint_bytes: int
    largest_tensor_bytes: int
    dense_bytes: int
    seconds: float
    baseline_rss: int
    peak_rss: int
    hwm_reset: bool

    @property
    def mb_per_s(self) -> float:
        return self.checkpoint_bytes / 1e6 / self.seconds

    @property
    def goal_bytes(self) -> int:
        return 2 * self.largest_tensor_bytes + self.dense_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "mb_per_s": self.mb_per_s, "goal_bytes": self.goal_bytes}


def run_shard_bench(arch: str, target_bytes: int, workdir: Path) -> ShardBench:
    from edgemoe.model.checkpoint import plan_checkpoint
    from edgemoe.model.tiny import write_tiny_model

    scale = scale_for_size(arch, target_bytes)
    model_dir = write_tiny_model(arch, workdir / "model", seed=0, scale=scale)
    plan = plan_checkpoint(model_dir)
    code = "import sys; from edgemoe.model.bench import child_main; child_main(*sys.argv[1:])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), str(workdir / "shards")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sharding child failed: {proc.stderr.strip().splitlines()[-1:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return ShardBench(
        arch=arch,
        checkpoint_bytes=plan.total_bytes,
        largest_tensor_bytes=plan.largest_tensor_bytes(),
        dense_bytes=plan.dense_bytes,
        **figures,
    )
