"""`edgemoe bench cluster` end to end through the real typer application."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from edgemoe.cli.main import app


def test_bench_cluster_prints_and_writes_the_figures(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    args = ["bench", "cluster", "--nodes", "6", "--loss", "0.1", "--partition-s", "4"]
    res = CliRunner().invoke(app, [*args, "--crash", "1", "--seed", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "epochs decided" in res.output and "violations: last_copy" in res.output
    doc = json.loads(out.read_text())
    assert doc["scenario"]["nodes"] == 6 and doc["scenario"]["loss"] == 0.1
    assert doc["violations_total"] == 0
    assert doc["epochs_decided"] >= 2  # genesis, then at least the crash's re-placement
    assert doc["replace_s"] is not None and doc["replace_s"] > 0
    assert doc["msgs_per_node_s"] > 0 and doc["membership_rounds"] is not None
    again = CliRunner().invoke(app, [*args, "--crash", "1", "--seed", "3", "--json", str(out)])
    assert again.exit_code == 0
    assert json.loads(out.read_text())["trace_digest"] == doc["trace_digest"]  # same seed


def test_bench_cluster_sweep_small(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    res = CliRunner().invoke(
        app, ["bench", "cluster", "--sweep", "--max-nodes", "8", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert [r["nodes"] for r in doc["membership"]] == [8]
    assert [r["loss"] for r in doc["consensus"]] == [0.0, 0.1, 0.3]
    assert all(r["violations_total"] == 0 for r in doc["consensus"])
