"""`edgemoe config init/check` as an operator uses them."""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgemoe.cli.config_cmds import SCHEMA, known_keys, parse_capacity, read_config, validate
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
    assert '# advertise_host = "192.168.1.10"' in text  # optional keys: commented examples
    assert "model_dir" not in a  # the node uses state_dir/model unless told otherwise
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
    assert again.exit_code == 5  # a config problem, like every other one
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
    assert any("unknown key 'prot' (did you mean 'port'?)" in line for line in lines)
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


def test_every_commented_key_of_the_template_is_valid_once_uncommented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path.parent)  # relative *_file names: next to the config, not cwd
    for name in ("secret", "api_token", "admin_token"):
        (tmp_path / f"edgemoe.{name}").write_text("t" * 32)
    # the routing_trace example: a trace holding the routing_stream example
    np.savez(tmp_path / "esft.npz", law_expert_ids=np.zeros((2, 1, 1), np.int16),
             law_req_offsets=np.array([0, 2]))  # fmt: skip
    path = tmp_path / "e.toml"
    assert runner.invoke(app, ["config", "init", str(path)]).exit_code == 0
    commented = [
        line[2:]
        for line in path.read_text().splitlines()
        if line.startswith("# ") and " = " in line and line[2:].split(" = ")[0] in known_keys()
    ]
    assert {line.split(" = ")[0] for line in commented} == {
        k.name for k in SCHEMA if k.default is None
    }
    for line in commented:
        tomllib.loads(line)  # raises on `key = ` with nothing after it
    values = tomllib.loads(path.read_text() + "\n".join(commented))
    _, problems = validate(values, "uncommented", tmp_path)
    assert problems == []


def test_template_documents_exactly_the_keys_the_daemon_reads() -> None:
    assert sorted(k.name for k in SCHEMA) == sorted(known_keys())


def test_check_says_mdns_off_or_on_which_address(tmp_path: Path) -> None:
    off, on = tmp_path / "off.toml", tmp_path / "on.toml"
    assert runner.invoke(app, ["config", "init", str(off)]).exit_code == 0
    made = runner.invoke(app, ["config", "init", str(on), "--interface", "127.0.0.1"])
    assert made.exit_code == 0
    assert "mDNS off," in runner.invoke(app, ["config", "check", str(off)]).stdout
    assert "mDNS on 127.0.0.1," in runner.invoke(app, ["config", "check", str(on)]).stdout


def test_init_binds_the_interface_address_never_every_interface(tmp_path: Path) -> None:
    by_name, bare = tmp_path / "name.toml", tmp_path / "bare.toml"
    made = runner.invoke(app, ["config", "init", str(by_name), "--interface", "lo"])
    assert made.exit_code == 0, made.output
    values = tomllib.loads(by_name.read_text())
    assert values["interface"] == ["lo"] and values["host"] == "127.0.0.1"
    result = runner.invoke(app, ["config", "init", str(bare)])
    assert tomllib.loads(bare.read_text())["host"] == "127.0.0.1"
    assert "listens on 127.0.0.1 only" in result.stdout
    assert all("0.0.0.0" not in line for line in bare.read_text().splitlines()
               if not line.startswith("#"))  # fmt: skip


def test_interface_by_name_resolves_and_a_wrong_one_names_the_accepted_forms(
    tmp_path: Path,
) -> None:
    from edgemoe.daemon.config import ConfigError, load_config

    path = tmp_path / "e.toml"
    path.write_text(f'secret = "{"s" * 32}"\nstate_dir = "{tmp_path}"\ninterface = ["lo"]\n')
    assert load_config(path, env={}).interface == ("127.0.0.1",)
    path.write_text(path.read_text().replace('["lo"]', '["nosuch9"]'))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "'nosuch9' is no interface of this machine" in str(err.value)
    assert 'IPv4 address of this machine ("192.168.1.10")' in str(err.value)
    assert "lo" in str(err.value).rsplit("(", 1)[1]  # the names it could have been


def test_daemon_loader_suggests_the_nearest_key(tmp_path: Path) -> None:
    from edgemoe.daemon.config import ConfigError, load_config

    path = tmp_path / "e.toml"
    path.write_text(f'secret = "{"s" * 32}"\nstate_dir = "{tmp_path}"\ncapacty = "50%"\n')
    with pytest.raises(ConfigError, match=r"unknown key 'capacty' \(did you mean 'capacity'\?\)"):
        load_config(path, env={})
    path.write_text(path.read_text().replace("capacty", "zzzzzz"))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value).endswith("unknown key 'zzzzzz'")  # nothing near: no guess


def test_init_never_writes_through_a_planted_temporary_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    path = tmp_path / "e.toml"
    (tmp_path / "e.toml.tmp").symlink_to(victim)  # the name the old writer reused
    result = runner.invoke(app, ["config", "init", str(path)])
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "untouched\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and not path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.toml", "e.toml.tmp", "victim"]


def test_init_onto_a_symlink_is_refused_without_force(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    link = tmp_path / "e.toml"
    link.symlink_to(target)
    result = runner.invoke(app, ["config", "init", str(link)])
    assert result.exit_code == 5 and "already exists" in result.stderr
    assert target.read_text() == "keep\n"


def test_secrets_in_files_keeps_them_out_of_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgemoe.daemon.config import load_config

    path = tmp_path / "edgemoe.toml"
    result = runner.invoke(app, ["config", "init", str(path), "--secrets-in-files"])
    assert result.exit_code == 0, result.output
    values = tomllib.loads(path.read_text())
    assert not {"secret", "api_token", "admin_token"} & set(values)
    secret_file, token_file = tmp_path / "edgemoe.secret", tmp_path / "edgemoe.api_token"
    assert values["secret_file"] == "edgemoe.secret"  # by name: a file next to it, or a
    assert values["api_token_file"] == "edgemoe.api_token"  # systemd credential of that name
    assert values["admin_token_file"] == "edgemoe.admin_token"
    for file in (secret_file, token_file):
        assert stat.S_IMODE(file.stat().st_mode) == 0o640
    monkeypatch.chdir("/")  # found next to the config, wherever the command runs
    cfg = read_config(path)  # the daemon's loader reads them back
    assert cfg.secret == secret_file.read_text().strip() and len(cfg.secret) == 64
    assert cfg.api_token == token_file.read_text().strip()
    assert cfg.secret not in path.read_text()
    assert load_config(path, env={}).secret == cfg.secret  # the daemon, started by hand
    creds = tmp_path / "credentials"  # the daemon under systemd's LoadCredential=
    creds.mkdir()
    (creds / "edgemoe.secret").write_text("c" * 40)
    (creds / "edgemoe.api_token").write_text("token-from-credentials")
    (creds / "edgemoe.admin_token").write_text("admin-from-credentials")
    under_systemd = load_config(path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert (under_systemd.secret, under_systemd.api_token) == ("c" * 40, "token-from-credentials")
    assert under_systemd.admin_token == "admin-from-credentials"
    again = runner.invoke(app, ["config", "init", str(path), "--secrets-in-files"])
    assert again.exit_code == 5 and secret_file.read_text().strip() == cfg.secret
