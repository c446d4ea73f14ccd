"""`edgemoe bench calibrate` measures constants the simulator and `bench placement` read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgemoe.sim.constants import load


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgemoe.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_calibrate_writes_measured_constants_that_bench_placement_accepts(tmp_path: Path
                                                                          ) -> None:
    out = tmp_path / "c.json"
    res = _cli("bench", "calibrate", "--json", str(out), "--hidden", "256",
               "--expert-width", "64", "--repeat", "1")
    assert res.returncode == 0, res.stderr
    c = load(out)
    assert c.source.startswith("edgemoe bench calibrate")
    # a forward pass, an expert and a loopback round trip take time; each is a fit of a fixed
    # and a per-row part, and on a loaded box either part alone may come out as 0
    assert c.dense_fixed_s + c.dense_token_s > 0 and c.expert_fixed_s + c.expert_row_s > 0
    assert min(c.dense_fixed_s, c.dense_token_s, c.expert_fixed_s, c.expert_row_s) >= 0
    assert c.message_s > 0 and c.caller_message_s == c.message_s  # the round trip, halved
    bad = tmp_path / "bad.json"
    bad.write_text('{"expert_s": 0.001}')
    res = _cli("bench", "placement", "--constants", str(bad))
    assert res.returncode == 2 and "unknown constants" in res.stderr


def test_calibrate_in_thread_cpu_seconds_measures_the_same_kinds_of_work() -> None:
    # the testbed's calibration: one torch thread, timed by that thread's CPU clock
    import time
    from dataclasses import replace

    import torch

    from edgemoe.bench.calibrate import LITE, measure_compute

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = measure_compute(replace(LITE, hidden_size=256, expert_width=64), repeat=1,
                              clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)
    assert set(got) == {"dense_fixed_s", "dense_token_s", "expert_fixed_s", "expert_row_s"}
    assert got["dense_fixed_s"] + got["dense_token_s"] > 0
    assert got["expert_fixed_s"] + got["expert_row_s"] > 0
    assert min(got.values()) >= 0
