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
    # a forward pass and a loopback round trip take time; per-token parts may round to 0
    assert c.dense_fixed_s > 0 and c.expert_fixed_s > 0 and c.message_s > 0
    assert c.dense_token_s >= 0 and c.expert_row_s >= 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"expert_s": 0.001}')
    res = _cli("bench", "placement", "--constants", str(bad))
    assert res.returncode == 2 and "unknown constants" in res.stderr
