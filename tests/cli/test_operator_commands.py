"""Operator commands against a contract-shaped node over real HTTP: what they print, what
they send, and how they fail (one line, meaningful exit code)."""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgemoe.cli.client import ClientError, Node, normalise_url, resolve_node
from edgemoe.cli.main import app
from edgemoe.cli.ops_cmds import local_hit, ranges

runner = CliRunner()


def run(*args: str) -> Any:
    return runner.invoke(app, list(args), env={"EDGEMOE_CONFIG": "/nonexistent/edgemoe.toml"})


def node_args(fake: Any) -> list[str]:
    return ["--node", fake.url, "--api-token", fake.token]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_json_carries_cluster_and_probed_health(fake_node: Any) -> None:
    result = run("status", *node_args(fake_node), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["node"] == fake_node.url and data["via"] == "--node"
    assert data["cluster"]["epoch"] == 3
    assert data["health"] == {"node-a": "ok", "node-b": "no answer"}


def test_status_table_shows_members_states_capacity_and_holdings(fake_node: Any) -> None:
    result = run("status", *node_args(fake_node))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "node-a *" in out and "node-b" in out and "suspect" in out
    assert "20.0 KiB" in out  # capacity 5 experts x 4 KiB
    assert "5/8" in out  # experts held of layers x experts
    assert "1 pending" in out and "local share 85%" in out
    flat = " ".join(out.split())  # the console wraps long lines
    assert "epoch 3 (drift)" in flat and "statistics drift 0.07 of 0.15" in flat


def test_peers_json_lists_members(fake_node: Any) -> None:
    result = run("peers", *node_args(fake_node), "--json")
    assert result.exit_code == 0
    assert [m["incarnation"] for m in json.loads(result.stdout)] == [1, 4]


def test_placement_shows_expert_ranges_per_layer_and_node(fake_node: Any) -> None:
    result = run("placement", *node_args(fake_node))
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith("│")]
    assert any("0-1" in r and "1-3" in r for r in rows), result.stdout  # layer 0
    assert any("0-1,3" in r and "2-3" in r for r in rows), result.stdout  # layer 1


def test_placement_json_and_layer_filter(fake_node: Any) -> None:
    result = run("placement", *node_args(fake_node), "--json", "--layer", "1")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["held"] == {"node-a": {"1": [0, 1, 3]}, "node-b": {"1": [2, 3]}}
    assert data["local_hit"]["node-a"] == [0.9, 1.0]  # layer 0: expert 2 (1 of 10) is remote
    assert data["local_hit"]["node-b"] == [1.0, 1.0]


def test_placement_explain_shows_statistics_behind_it(fake_node: Any) -> None:
    result = run("placement", *node_args(fake_node), "--explain", "--layer", "0")
    assert result.exit_code == 0, result.output
    assert "entropy" in result.stdout and "bits" in result.stdout
    assert "0(60%)" in result.stdout  # node-a's top expert in layer 0
    assert "90%" in result.stdout  # node-a's local hit in layer 0


def test_placement_rejects_layer_outside_model(fake_node: Any) -> None:
    result = run("placement", *node_args(fake_node), "--layer", "9")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --layer 9: the model has MoE layers 0..1"


def test_node_without_model_yet(fake_node: Any) -> None:
    fake_node.no_model = True
    status = run("status", *node_args(fake_node))
    assert status.exit_code == 0 and "no model yet" in status.stdout
    result = run("placement", *node_args(fake_node))
    assert result.exit_code == 1
    assert (
        result.stderr.strip() == "error: node node-a has no model yet (still fetching its shards?)"
    )


def test_stats_draws_a_heatmap_per_node(fake_node: Any) -> None:
    coloured = runner.invoke(
        app, ["stats", *node_args(fake_node)],
        env={"EDGEMOE_CONFIG": "/nonexistent", "FORCE_COLOR": "1", "NO_COLOR": None},
    )  # fmt: skip
    assert coloured.exit_code == 0, coloured.output
    assert "node-a" in coloured.stdout and "node-b" in coloured.stdout
    assert coloured.stdout.count("█") >= 2 * 8 and "\x1b[" in coloured.stdout


def test_stats_piped_or_without_colour_shows_levels_as_characters(fake_node: Any) -> None:
    # node-a's layer 0 counts 6, 3, 1, 0: shares 100%, 50%, 17%, 0 of the busiest
    for env in ({}, {"FORCE_COLOR": "1", "NO_COLOR": "1"}):
        result = runner.invoke(app, ["stats", *node_args(fake_node)],
                               env={"EDGEMOE_CONFIG": "/nonexistent", **env})  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "█" not in result.stdout  # NO_COLOR on a terminal keeps bold/dim, no colour
        plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
        rows = [line.strip("│ ") for line in plain.splitlines()]
        assert "0  @*-." in rows and "1  @@.." in rows  # node-a
        assert "0  .+@@" in rows  # node-b: 0, 1, 4, 5
        assert ". 0 - ≤20% + ≤40% * ≤60% # ≤80% @ ≤100%" in plain  # the legend


def test_stats_selects_a_node_and_refuses_an_unknown_one(fake_node: Any) -> None:
    only = run("stats", *node_args(fake_node), "--json", "--node-id", "node-b")
    assert list(json.loads(only.stdout)) == ["node-b"]
    missing = run("stats", *node_args(fake_node), "--node-id", "zzz")
    assert missing.exit_code == 1 and "no statistics" in missing.stderr


def test_migrate_dry_run_sends_request_and_shows_plan(fake_node: Any) -> None:
    result = run("migrate", *node_args(fake_node), "--dry-run")
    assert result.exit_code == 0, result.output
    assert fake_node.requests[-1] == (
        "POST", "/v1/cluster/migrate", {"dry_run": True, "members": None}
    )  # fmt: skip
    assert "1 moves" in result.stdout and "4.0 KiB" in result.stdout
    assert "dry run" in result.stdout


def test_migrate_members_by_hand_and_server_refusal(fake_node: Any) -> None:
    result = run("migrate", *node_args(fake_node), "--members", "node-a", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["decided"] is True
    assert fake_node.requests[-1][2] == {"dry_run": False, "members": ["node-a"]}
    short = run("migrate", *node_args(fake_node), "--members", "node-b", "--members", "node-a")
    assert short.exit_code == 0 and fake_node.requests[-1][2]["members"] == ["node-b", "node-a"]
    ambiguous = run("migrate", *node_args(fake_node), "--members", "node")
    assert ambiguous.exit_code == 2 and "matches node-a, node-b" in ambiguous.stderr
    refused = run("migrate", *node_args(fake_node), "--members", "ghost")
    assert refused.exit_code == 1
    assert refused.stderr.strip().endswith("HTTP 400: unknown member ghost")


def test_chat_streams_answers_and_keeps_history(fake_node: Any) -> None:
    result = runner.invoke(app, ["chat", *node_args(fake_node)], input="hello\nagain\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "edgemoe> echo: hello" in result.stdout and "echo: again" in result.stdout
    last = fake_node.requests[-1][2]
    assert [m["role"] for m in last["messages"]] == ["user", "assistant", "user"]
    assert last["messages"][1]["content"] == "echo: hello" and last["stream"] is True


def test_wrong_token_is_exit_4_one_line(fake_node: Any) -> None:
    result = run("status", "--node", fake_node.url, "--api-token", "nope")
    assert result.exit_code == 4
    assert len(result.stderr.strip().splitlines()) == 1 and "refused the API token" in result.stderr


@pytest.mark.parametrize("command", ["status", "peers", "placement", "stats", "migrate"])
def test_dead_daemon_is_exit_3_one_line(command: str) -> None:
    result = run(command, "--node", f"127.0.0.1:{free_port()}")
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "connection refused" in lines[0], lines


def test_node_url_of_something_else_is_one_line_exit_1(tmp_path: Path) -> None:
    """--node pointing at an HTTP server that is not an edgemoe node."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tmp_path))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = run("status", "--node", url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {url}/v1/cluster: HTTP 404: File not found "
        f"(is {url} an edgemoe node? check --node)"
    ]


def test_malformed_node_url_is_usage_error() -> None:
    result = run("status", "--node", "ftp://x")
    assert result.exit_code == 2 and "is not a URL" in result.stderr


def test_local_node_comes_from_config(fake_node: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "e.toml"
    port = fake_node.server_address[1]
    init = runner.invoke(
        app, ["config", "init", str(cfg), "--api-token", fake_node.token, "--port", str(port)]
    )
    assert init.exit_code == 0
    result = runner.invoke(app, ["status", "--config", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["via"] == "config"


def test_bad_config_is_exit_5_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "e.toml"
    cfg.write_text('port = "x"\n')
    result = runner.invoke(app, ["status", "--config", str(cfg)])
    assert result.exit_code == 5
    assert (
        len(result.stderr.strip().splitlines()) == 1
        and "more: edgemoe config check" in result.stderr
    )


@contextmanager
def announced(fake: Any) -> Iterator[None]:
    """The fake node announced by mDNS on 127.0.0.1 in cluster "lab", under a name of its own:
    every test process on the box shares 127.0.0.1's multicast group, and a name some other
    responder still claims makes the registration fail (NonUniqueNameException, once in CI)."""
    from zeroconf import ServiceInfo, Zeroconf

    name = f"node-a-{uuid.uuid4().hex[:8]}"
    zc = Zeroconf(interfaces=["127.0.0.1"])
    info = ServiceInfo(
        "_edgemoe._tcp.local.", f"{name}._edgemoe._tcp.local.",
        addresses=[socket.inet_aton("127.0.0.1")], port=fake.server_address[1],
        properties={"node_id": name, "cluster_id": "lab"}, server=f"{name}.local.",
    )  # fmt: skip
    zc.register_service(info)
    try:
        yield
    finally:
        zc.unregister_service(info)
        zc.close()


def down_config(tmp_path: Path) -> Path:
    """A config whose local daemon is not running, with mDNS on 127.0.0.1."""
    cfg = tmp_path / "e.toml"
    args = ["config", "init", str(cfg), "--port", str(free_port()), "--cluster-id", "lab"]
    assert runner.invoke(app, [*args, "--interface", "127.0.0.1"]).exit_code == 0
    return cfg


def test_node_found_by_mdns_when_the_default_config_daemon_is_down(
    fake_node: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("EDGEMOE_CONFIG", str(down_config(tmp_path)))  # the box's default config
    with announced(fake_node):
        node = resolve_node(None, None, fake_node.token, mdns_timeout=5.0)
    assert (node.url, node.how) == (fake_node.url, "mdns")
    said = capsys.readouterr().err
    assert f"does not answer; using {fake_node.url} found by mDNS" in said


def test_named_config_with_its_daemon_down_fails_instead_of_asking_another_node(
    fake_node: Any, tmp_path: Path
) -> None:
    cfg = down_config(tmp_path)
    with announced(fake_node):
        result = run("generate", "hello", "--config", str(cfg))
    assert result.exit_code == 3, result.output
    line = result.stderr.strip()
    assert "connection refused" in line and f"the daemon of {cfg}" in line
    assert len(result.stderr.strip().splitlines()) == 1
    assert not fake_node.requests  # nobody else was asked


def test_helpers() -> None:
    assert ranges([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8" and ranges([]) == "-"
    assert local_hit([[3.0, 1.0], [0.0, 0.0]], {0: [0]}) == [0.75, None]
    assert normalise_url("10.0.0.2:7600/") == "http://10.0.0.2:7600"
    with pytest.raises(ClientError):
        Node("http://127.0.0.1:1", None, "test").get("/healthz", timeout=1)
