"""`edgemoe config init/check` as an operator uses them."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from edgemoe.cli.config_cmds import SCHEMA, known_keys, parse_capacity, read_config
from edgemoe.cli.main import app

runner = CliRunner()


def test_init_writes_commented_config_with_fresh_secret_that_check_accepts(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "edgemoe.toml", tmp_path / "b.toml"
    assert (
        runner.invoke(app, ["config", "init", str(first), "--interface", "127.0.0.1"]).exit_code
        == 0
    )
    assert runner.invoke(app, ["config", "init", "--config", str(second)]).exit_code == 0
    text = first.read_text()
    assert text.count("\n# ") >= len(SCHEMA)  # every key documented
    a, b = tomllib.loads(text), tomllib.loads(second.read_text())
    assert set(a) == {k.name for k in SCHEMA if k.default is not None}
    assert "# advertise_host = " in text  # optional keys are shown, commented out
    assert len(a["secret"]) == 64 and a["secret"] != b["secret"]
    assert a["api_token"] != b["api_token"]
    assert a["interface"] == ["127.0.0.1"]
    assert stat.S_IMODE(first.stat().st_mode) & 0o007 == 0  # not world-readable: holds the secret
    result = runner.invoke(app, ["config", "check", str(first)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")


def test_init_joins_existing_cluster_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    secret = "s" * 40
    args = [
        "config",
        "init",
        str(path),
        "--cluster-id",
        "lab",
        "--secret",
        secret,
        "--port",
        "7700",
    ]
    assert runner.invoke(app, args).exit_code == 0
    cfg = read_config(path)
    assert (cfg.cluster_id, cfg.secret, cfg.port) == ("lab", secret, 7700)
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert runner.invoke(app, [*args, "--force", "--port", "7701"]).exit_code == 0
    assert read_config(path).port == 7701


def test_init_rejects_bad_option_values_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    result = runner.invoke(app, ["config", "init", str(path), "--capacity", "lots"])
    assert result.exit_code == 2
    assert "capacity" in result.stderr
    assert not path.exists()


def test_check_explains_each_problem_in_one_line_and_exits_5(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    runner.invoke(app, ["config", "init", str(path)])
    text = path.read_text().replace("port = 7600", 'port = "abc"')
    text = text.replace('strategy = "edgemoe"', 'strategy = "fastest"') + "prot = 1\n"
    path.write_text(text)
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 5
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert any("unknown key 'prot'" in line for line in lines)
    assert any("port: " in line and "'abc'" in line for line in lines)
    assert any("strategy: must be one of" in line and "'fastest'" in line for line in lines)
    assert "Traceback" not in result.output


def test_check_json_gives_scripts_the_verdict_without_secrets(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    runner.invoke(app, ["config", "init", str(path), "--seed-peer", "10.0.0.2:7600"])
    result = runner.invoke(app, ["config", "check", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and data["problems"] == []
    assert data["config"]["seed_peer"] == ["10.0.0.2:7600"] and data["config"]["port"] == 7600
    secret = tomllib.loads(path.read_text())["secret"]
    assert secret not in result.stdout
    path.write_text(path.read_text().replace("port = 7600", 'port = "abc"'))
    bad = runner.invoke(app, ["config", "check", str(path), "--json"])
    assert bad.exit_code == 5
    data = json.loads(bad.stdout)
    assert not data["ok"] and data["config"] is None
    assert len(data["problems"]) == 1 and "port" in data["problems"][0]


def test_check_reports_syntax_missing_file_and_missing_secret(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("port = [\n")
    result = runner.invoke(app, ["config", "check", str(broken)])
    assert result.exit_code == 5 and "not valid TOML" in result.stderr
    result = runner.invoke(app, ["config", "check", str(tmp_path / "nope.toml")])
    assert result.exit_code == 5 and "no such config file" in result.stderr
    nosecret = tmp_path / "nosecret.toml"
    nosecret.write_text('api_token = "0123456789abcdef0123"\n')
    result = runner.invoke(app, ["config", "check", str(nosecret)])
    assert result.exit_code == 5 and "secret: missing" in result.stderr


def test_check_refuses_interface_address_this_machine_lacks(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    runner.invoke(app, ["config", "init", str(path), "--interface", "192.0.2.123"])
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 5
    assert "192.0.2.123 is not an address of this machine" in result.stderr


def test_check_refuses_model_dir_without_manifest(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    runner.invoke(app, ["config", "init", str(path), "--model-dir", str(tmp_path)])
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 5 and "no manifest.json" in result.stderr


def test_capacity_accepts_shares_and_sizes() -> None:
    assert parse_capacity("40%") == ("fraction", 0.4)
    assert parse_capacity("2GB") == ("bytes", 2e9)
    assert parse_capacity("512MiB") == ("bytes", 512 * 2**20)
    assert parse_capacity(1000) == ("bytes", 1000.0)
    for bad in ("0%", "150%", "lots", "-1GB", True):
        try:
            parse_capacity(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def test_template_documents_exactly_the_keys_the_daemon_reads() -> None:
    assert sorted(k.name for k in SCHEMA) == sorted(known_keys())
