"""`edgemoe bench testbed` end to end, small: 2 namespaces, 2 strategies, a few tokens."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.stats.traces import default_trace_path

from .conftest import leftovers, root_state

FIELDS = {"tokens_per_s", "decode_latency_p50_s", "decode_latency_p99_s",
          "request_latency_mean_s", "bytes_between_nodes_per_token", "remote_calls_per_token",
          "local_share", "simulated_request_latency_mean_s", "measured_over_simulated"}  # fmt: skip


def test_bench_testbed_smoke_reports_each_strategy_and_leaves_nothing(
    testbed_ok: None, tmp_path: Path
) -> None:
    if not default_trace_path().is_file():
        pytest.skip(f"routing trace not found at {default_trace_path()}")
    before = root_state()
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "edgemoe.cli", "bench", "testbed", "--streams", "intent,law",
           "--capacities", "1,1", "--strategies", "edgemoe,layers+per-expert", "--shape", "tiny",
           "--profile-requests", "1", "--requests", "2", "--tokens", "3",
           "--bandwidth-mbps", "100", "--delay-ms", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["setting"]["nodes"] == 2
    assert set(report["strategies"]) == {"edgemoe", "layers+per-expert"}
    for name, r in report["strategies"].items():
        assert set(r) >= FIELDS, name
        assert r["tokens"] == 2 * 2 * 3  # requests x nodes x tokens: EOS ignored
        assert r["tokens_per_s"] > 0 and 0 < r["decode_latency_p50_s"] <= r["decode_latency_p99_s"]
        assert r["bytes_between_nodes_per_token"] > 0  # 2 nodes, neither holds everything
        assert 0 < r["local_share"] < 1
        assert r["simulated_request_latency_mean_s"] > 0  # edgemoe.sim beside the measurement
    ratio = report["ratios"]["edgemoe_over"]["layers+per-expert"]
    assert ratio["sim_over_measured"] > 0
    assert 80 < report["link"]["mbps"] < 110
    assert "edgemoe / layers+per-expert: tokens/s" in done.stdout
    prefix = re.search(r"testbed (emtb-[0-9a-f]+-)\*", done.stdout)
    assert prefix is not None, done.stdout
    assert leftovers(prefix.group(1), []) == []
    assert root_state() == before


def test_bench_testbed_refuses_unknown_strategy_before_building_anything() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "bench", "testbed", "--strategies", "edgemoe,magic"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "unknown strategy magic" in done.stderr
