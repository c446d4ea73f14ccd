"""A short chaos run on real daemons: 3 nodes in namespaces, a seeded nemesis, clients on
every node; the checker must find nothing, and nothing may be left behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.daemon import testbed

# Seed 95 at 60 s on 3 nodes: isolated node, bridge partition, kill -9, a join, then a lossy
# link on the joining node during its migration.
SEED = 95


def test_a_short_chaos_run_on_three_nodes_has_no_violations(tmp_path: Path) -> None:
    missing = testbed.missing_requirements(need_delay=False)
    if missing:
        pytest.skip("chaos needs: " + "; ".join(missing))
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, "-m", "edgemoe.cli", "bench", "chaos", "--nodes", "3", "--seed",
           str(SEED), "--duration", "60", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    prefix = re.search(r"chaos (emch-[0-9a-f]+-)\*", done.stdout)
    assert prefix is not None, done.stdout[-2000:] + done.stderr[-2000:]
    assert testbed.testbed_namespaces(prefix.group(1)) == []  # nothing left behind
    report = json.loads(out.read_text())
    assert report["violations"] == [], done.stdout[-3000:]
    assert done.returncode == 0
    kinds = {s["kind"] for s in report["schedule"]}
    assert {"bridge", "isolate", "kill", "join"} <= kinds
    assert report["succeeded"] > 0 and report["wrong"] == 0 and report["hung"] == 0
    assert report["epochs_decided"] >= 2  # the join and the kill re-place
