"""Operator commands against a real `edgemoe daemon` process (tiny model, 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemoe.cli.demo_cmds import LocalCluster, build_model, placement_decided
from edgemoe.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    work = tmp_path_factory.mktemp("daemon")
    shards = build_model(work, "mixtral", lambda _: None)
    cluster = LocalCluster(work, shards, 1, capacity_bytes=10**9)
    cluster.start()
    try:
        cluster.wait_healthy(120, lambda _: None)
        cluster.wait_until("placement", placement_decided(1), 60, lambda _: None)
        cluster.wait_ready(60, lambda _: None)
        yield cluster
    finally:
        assert cluster.stop() == []


def args(cluster: LocalCluster) -> list[str]:
    return ["--node", cluster.nodes[0].url, "--api-token", cluster.token]


def test_status_reports_the_running_node(node: LocalCluster) -> None:
    result = runner.invoke(app, ["status", *args(node), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cluster"]["node_id"] == node.nodes[0].node_id
    assert data["health"] == {node.nodes[0].node_id: "ok"}
    human = runner.invoke(app, ["status", *args(node)])
    assert human.exit_code == 0 and "alive" in human.stdout


def test_placement_of_a_single_node_holds_every_expert(node: LocalCluster) -> None:
    result = runner.invoke(app, ["placement", *args(node), "--json"])
    assert result.exit_code == 0, result.output
    held = json.loads(result.stdout)["held"][node.nodes[0].node_id]
    assert {layer: sorted(experts) for layer, experts in held.items()} == {
        "0": list(range(8)), "1": list(range(8))
    }  # fmt: skip
    table = runner.invoke(app, ["placement", *args(node), "--explain"])
    assert table.exit_code == 0 and "0-7" in table.stdout


def test_generate_streams_tokens(node: LocalCluster) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "generate", "--node", node.nodes[0].url,
         "--max-tokens", "4", "--temperature", "0", "--stream", "def f(x):"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "EDGEMOE_API_TOKEN": node.token},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() != ""


def test_migrate_dry_run_then_by_hand_with_a_short_member_id(node: LocalCluster) -> None:
    me = node.nodes[0].node_id
    epoch = json.loads(runner.invoke(app, ["status", *args(node), "--json"]).stdout)["cluster"][
        "epoch"
    ]
    dry = runner.invoke(app, ["migrate", *args(node), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout) == {"epoch": epoch + 1, "plan": [], "decided": False}
    # the member set by hand, as an operator types it from a table (8 characters of the id)
    done = runner.invoke(app, ["migrate", *args(node), "--members", me[:8]])
    assert done.exit_code == 0, done.output
    assert f"migration plan for epoch {epoch + 1} (decided)" in done.stdout
    ghost = runner.invoke(app, ["migrate", *args(node), "--members", "ghost"])
    assert ghost.exit_code == 1
    assert "unknown members ['ghost']" in ghost.stderr and len(ghost.stderr.splitlines()) == 1


def test_generate_finds_the_local_daemon_and_token_in_its_config(node: LocalCluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEMOE_")}
    out = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "generate", "--config",
         str(node.workdir / "node0.toml"), "--max-tokens", "3", "--json", "1 + 1 ="],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["node"] == node.nodes[0].node_id


def test_chat_answers_and_stats_show_the_routing_it_caused(node: LocalCluster) -> None:
    chat = runner.invoke(
        app, ["chat", *args(node), "--max-tokens", "4", "--temperature", "0"],
        input="sum 1 2 3\n/exit\n",
    )  # fmt: skip
    assert chat.exit_code == 0, chat.output
    assert chat.stdout.startswith("edgemoe> ") and len(chat.stdout.strip()) > len("edgemoe>")
    me = node.nodes[0].node_id
    deadline = time.monotonic() + 30  # statistics are published every few seconds
    counts: list[list[float]] = []
    while time.monotonic() < deadline and not sum(map(sum, counts)):
        stats = runner.invoke(app, ["stats", *args(node), "--json"])
        assert stats.exit_code == 0, stats.output
        counts = json.loads(stats.stdout).get(me, {}).get("counts", [])
        time.sleep(0.5)
    assert len(counts) == 2 and all(len(row) == 8 for row in counts)
    assert sum(map(sum, counts)) > 0
    heat = runner.invoke(app, ["stats", *args(node), "--node-id", me[:8]])
    assert heat.exit_code == 0 and "req/s" in heat.stdout


def test_wrong_token_is_refused_in_one_line(node: LocalCluster) -> None:
    result = runner.invoke(app, ["status", "--node", node.nodes[0].url, "--api-token", "wrong"])
    assert result.exit_code == 4
    assert len(result.stderr.strip().splitlines()) == 1


def test_dead_daemon_is_one_line_exit_3(tmp_path: Path) -> None:
    shards = tmp_path / "none"
    cluster = LocalCluster(tmp_path, shards, 1, capacity_bytes=10**9)
    cluster.start()
    cluster.stop()
    result = runner.invoke(app, ["status", *args(cluster)])
    assert result.exit_code == 3
    assert "connection refused" in result.stderr


def test_daemon_with_a_bad_config_refuses_in_one_line_exit_5(tmp_path: Path) -> None:
    bad = tmp_path / "edgemoe.toml"
    bad.write_text('secret = "0123456789abcdef0123"\nport = "x"\n')
    for config in (bad, tmp_path / "missing.toml"):
        out = subprocess.run(
            [sys.executable, "-m", "edgemoe.cli", "daemon", "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 5, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: ")
