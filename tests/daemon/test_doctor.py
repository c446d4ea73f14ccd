"""`edgemoe doctor` against real daemons: each broken setup is named in one line with its fix,
and the exit code says whether anything failed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from edgemoe.cli.main import app
from edgemoe.daemon.config import load_config
from edgemoe.daemon.doctor import (
    FAIL,
    OK,
    WARN,
    Hello,
    accelerator_verdict,
    peer_verdicts,
)
from edgemoe.daemon.startup import LOCK_NAME

from .conftest import SECRET, SMALL_CLUSTER, TOKEN, Node, TinyModel, make_node

runner = CliRunner()


def config(tmp: Path, **keys: Any) -> Path:
    """A config file for this box: its own state dir, the given keys."""
    values = {"secret": SECRET, "api_token": TOKEN, "cluster_id": SMALL_CLUSTER,
              "state_dir": str(tmp / "state"), "port": 1, "device": "cpu", **keys}  # fmt: skip
    path = tmp / "edgemoe.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def doctor(path: Path) -> tuple[int, str, list[dict[str, str]]]:
    """Exit code, the human output, and the JSON checks of one doctor run each."""
    human = runner.invoke(app, ["doctor", "--config", str(path)], env={"NO_COLOR": "1"})
    scripted = runner.invoke(app, ["doctor", "--config", str(path), "--json"])
    assert human.exit_code == scripted.exit_code, human.output
    data = json.loads(scripted.stdout)
    assert data["ok"] == (scripted.exit_code == 0)
    return human.exit_code, human.stdout, data["checks"]


def failed(checks: list[dict[str, str]]) -> list[str]:
    return [f"{c['check']}: {c['message']}" for c in checks if c["level"] == FAIL]


def one_line(output: str, cause: str) -> str:
    lines = [line for line in output.splitlines() if cause in line]
    assert len(lines) == 1, (cause, output)
    assert lines[0].startswith("fail"), lines[0]
    return lines[0]


def test_wrong_secret_is_named(small: Node, tmp_path: Path) -> None:
    path = config(tmp_path, secret="another-secret-0123456789abcdef",
                  seed_peer=[f"127.0.0.1:{small.port}"])  # fmt: skip
    code, out, checks = doctor(path)
    assert code == 1
    line = one_line(out, "refuses our signature: the cluster secret differs")
    assert f"seed http://127.0.0.1:{small.port}" in line
    assert failed(checks) == [
        f"signature: seed http://127.0.0.1:{small.port} refuses our signature: "
        "the cluster secret differs"
    ]


def test_no_peers_and_no_model_is_named(tmp_path: Path) -> None:
    code, out, checks = doctor(config(tmp_path))
    assert code == 1
    one_line(out, "no peer found and no model here: nobody has the model")
    assert [c["check"] for c in checks if c["level"] == FAIL] == ["peers"]


def test_too_little_cluster_memory_is_named(small: Node, tmp_path: Path) -> None:
    path = config(tmp_path, seed_peer=[f"127.0.0.1:{small.port}"])
    code, out, checks = doctor(path)
    assert code == 1
    line = one_line(out, "7 experts over capacity")
    assert "cluster memory" in line and "below the model's experts" in line
    assert [c["check"] for c in checks if c["level"] == FAIL] == ["capacity"]
    signed = [c for c in checks if c["check"] == "signature"]
    assert [c["level"] for c in signed] == [OK]  # the same secret: accepted
    clock = [c for c in checks if c["check"] == "clock"]
    assert clock and clock[0]["level"] == OK  # same machine, same clock
    levels = {c["check"]: c["level"] for c in checks}
    for sound in ("config", "state_dir", "model_dir", "model", "api_token", "accelerator"):
        assert levels[sound] == OK, (sound, checks)
    assert "checks: 1 failed" in out


def test_model_dir_in_use_is_named(tiny: TinyModel, tmp_path: Path) -> None:
    node = make_node(tmp_path, "holder", shard_dir=tiny.shard_dir, cluster_id="doc-lock",
                     capacity="100%", mdns=False)  # fmt: skip
    node.start()
    try:
        node.wait_ready(180)
        code, out, checks = doctor(config(tmp_path, model_dir=str(node.model_dir)))
        pid = node.proc.pid
    finally:
        node.stop()
    assert code == 1
    line = one_line(out, "is in use")
    assert f"{node.model_dir} is in use: pid {pid} holds {node.model_dir / LOCK_NAME}" in line
    assert "model_dir" in [c["check"] for c in checks if c["level"] == FAIL]
    after = doctor(config(tmp_path, model_dir=str(node.model_dir)))[2]  # released: free again
    assert [c["level"] for c in after if c["check"] == "model_dir"] == [OK]


def test_clock_skew_against_the_signature_window() -> None:
    cfg = load_config(None, {"secret": SECRET, "state_dir": "/tmp", "cluster_id": "doc"}, {})
    info = {"node_id": "abcdef0123456789", "cluster_id": "doc", "fingerprint": "f" * 16}

    def level(skew: float) -> str:
        verdicts = peer_verdicts(cfg, [], [Hello("http://p:1", info, None, "", skew)], "", True)
        return next(v.level for v in verdicts if v.check == "clock")

    assert [level(s) for s in (0.4, -5.0, 12.0, -25.0, 31.0, -400.0)] == [
        OK, OK, WARN, WARN, FAIL, FAIL
    ]  # fmt: skip
    refused = Hello("http://p:1", None, 401, "HTTP 401: timestamp outside the 30s window", None)
    verdicts = peer_verdicts(cfg, [], [refused], "", True)
    assert [(v.check, v.level) for v in verdicts] == [("clock", FAIL)]


def test_accelerator_memory_against_capacity() -> None:
    gib = 2**30
    # figures a GPU would report (none here): free, total
    assert accelerator_verdict("cpu", None, None, 10 * gib).message == "no accelerator: cpu"
    assert accelerator_verdict("cuda", None, None, None).level == FAIL
    assert accelerator_verdict("cuda:0", 30 * gib, 40 * gib, 20 * gib).level == OK
    busy = accelerator_verdict("cuda:0", 10 * gib, 40 * gib, 20 * gib)
    assert busy.level == WARN and "10.0 GiB free of 40.0 GiB" in busy.message
    assert accelerator_verdict("cuda:0", 30 * gib, 40 * gib, 50 * gib).level == FAIL
