"""A start that cannot work exits 5 with one line naming the path (a state or model dir locked
by another daemon, a read-only state dir, exposed without tokens); a lock left by a dead daemon
blocks nothing; /healthz says ready only when the node can serve."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SECRET, TOKEN, Node, TinyModel, free_port, make_node


def daemon_args(state: Path, model: Path | None, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "edgemoe.cli", "daemon", "--state-dir", str(state),
            "--host", "127.0.0.1", "--port", str(free_port()), "--secret", SECRET,
            "--api-token", TOKEN, "--cluster-id", "lifecycle", "--device", "cpu",
            *extra]  # fmt: skip
    return args + (["--model-dir", str(model)] if model else [])


def run_to_exit(cmd: list[str], timeout: float = 60) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEMOE_")}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:  # it started serving: the old behaviour
        raise AssertionError(f"still running after {timeout}s: {exc.output!r}") from None
    return out.returncode, out.stdout + out.stderr


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert len(lines) == 1, output
    return lines[0]


def test_second_daemon_on_a_state_dir_exits_5_naming_it(solo: Node, tmp_path: Path) -> None:
    own_model = tmp_path / "model"
    assert solo.model_dir is not None
    shutil.copytree(solo.model_dir, own_model, ignore=shutil.ignore_patterns(".edgemoe.lock"))
    code, out = run_to_exit(daemon_args(solo.state_dir, own_model))
    assert code == 5, out
    line = one_error_line(out)
    assert str(solo.state_dir) in line and "in use by another edgemoe daemon" in line
    assert f"pid {solo.proc.pid}" in line  # type: ignore[union-attr]
    assert solo.request("GET", "/healthz", token=None)[1]["ready"]


def test_two_daemons_sharing_a_model_dir_the_second_exits_5(solo: Node, tmp_path: Path) -> None:
    code, out = run_to_exit(daemon_args(tmp_path / "state", solo.model_dir))
    assert code == 5, out
    line = one_error_line(out)
    assert f"model dir {solo.model_dir} is in use" in line


def test_read_only_state_dir_exits_5(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cmd = daemon_args(state, None)
    if os.geteuid() != 0:
        state.chmod(0o555)
    elif shutil.which("unshare"):  # root writes through modes: make it a read-only mount
        mount = f"mount --bind -o ro {state} {state} && exec \"$@\""
        cmd = ["unshare", "-m", "sh", "-c", mount, "sh", *cmd]
    else:
        pytest.skip("root without unshare: no way to make a read-only directory")
    code, out = run_to_exit(cmd)
    assert code == 5, out
    line = one_error_line(out)
    assert f"state dir {state} is not usable" in line, line
    assert "Read-only" in line or "Permission denied" in line, line


def test_daemon_beyond_loopback_without_tokens_exits_5(tmp_path: Path) -> None:
    cmd = daemon_args(tmp_path / "state", None)
    cmd[cmd.index("--host") + 1] = "0.0.0.0"
    code, out = run_to_exit(cmd)
    assert code == 5, out
    line = one_error_line(out)
    assert "host 0.0.0.0 listens beyond loopback but admin_token is not set" in line


def test_a_killed_daemon_leaves_no_lock_behind(tiny: TinyModel, tmp_path: Path) -> None:
    node = make_node(tmp_path, "k", shard_dir=tiny.shard_dir, cluster_id="lock", capacity="100%",
                     mdns=False)  # fmt: skip
    node.start()
    try:
        node.wait_ready(120)
        node.stop(signal.SIGKILL)
        assert (node.state_dir / ".edgemoe.lock").is_file()  # stale: its holder is dead
        node.start()
        node.wait_ready(120)
    finally:
        node.stop()


def test_healthz_is_not_ready_while_the_node_has_no_model(tmp_path: Path) -> None:
    node = make_node(tmp_path, "empty", shard_dir=None, cluster_id="nomodel", capacity="100%",
                     mdns=False)  # fmt: skip
    node.start()
    try:
        from .conftest import wait_for

        health = wait_for(
            lambda: (r := node.request("GET", "/healthz", token=None, timeout=2))[0] == 200
            and r[1],
            60,
            "/healthz to answer",
        )
        assert health["ready"] is False
        assert health["state"] == "no model here and no peer found yet"
    finally:
        node.stop()
