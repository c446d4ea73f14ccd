"""An operator's first hour: the chat's own commands and keys, a bare `edgemoe daemon` reading
the box's config, `shard` failing in one line with a bar that knows its total."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgemoe.cli import config_cmds
from edgemoe.cli.main import app
from edgemoe.cli.ops_cmds import CHAT_HELP

runner = CliRunner()
ENV = {"EDGEMOE_CONFIG": "/nonexistent/edgemoe.toml"}


def chat_argv(fake: Any) -> list[str]:
    return [sys.executable, "-m", "edgemoe.cli", "chat", "--node", fake.url,
            "--api-token", fake.token]  # fmt: skip


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEMOE_")}
    return {**env, **ENV, "PYTHONUNBUFFERED": "1"}


def test_chat_handles_slash_commands_itself(fake_node: Any) -> None:
    said = "/help\n/bogus\nhello\n/reset\n//etc/motd\n/quit\n"
    result = runner.invoke(app, ["chat", "--node", fake_node.url, "--api-token", fake_node.token],
                           input=said, env=ENV)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert CHAT_HELP in result.stdout
    assert "unknown command /bogus; /help lists them" in result.stdout
    sent = [body["messages"] for method, path, body in fake_node.requests if method == "POST"]
    assert [m[-1]["content"] for m in sent] == ["hello", "/etc/motd"]  # nothing else reached it
    assert len(sent[1]) == 1  # /reset forgot "hello" and its answer


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(
    fake_node: Any, terminal_signals: Callable[[], None]
) -> None:
    proc = subprocess.Popen(chat_argv(fake_node), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env(),
                            preexec_fn=terminal_signals)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    out = bytearray()

    def read() -> None:  # the answer as it streams, so Ctrl-C is sent while it does
        while piece := proc.stdout.read1(4096):  # type: ignore[union-attr]
            out.extend(piece)

    reader = threading.Thread(target=read, daemon=True)
    try:
        proc.stdin.write(b"slow\n")
        proc.stdin.flush()
        reader.start()
        deadline = time.monotonic() + 30
        while out.count(b"tick") < 3:  # the answer is streaming: Ctrl-C lands inside it
            assert time.monotonic() < deadline, f"no answer streamed: {bytes(out)!r}"
            time.sleep(0.02)
        interrupted_at = out.count(b"tick")
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        proc.stdin.write(b"hello\n/exit\n")
        proc.stdin.close()
        proc.wait(timeout=30)
        reader.join(timeout=10)
        err = proc.stderr.read() if proc.stderr else b""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "[stopped]" in text and "echo: hello" in text, (interrupted_at, text)
    assert text.count("tick") < 100  # the answer did not run to its end
    assert "Traceback" not in err.decode()
    deadline = time.monotonic() + 10
    while fake_node.abandoned == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fake_node.abandoned == 1  # the connection was closed: the node stops generating


def test_ctrl_d_at_the_prompt_ends_the_chat_on_a_new_line(fake_node: Any) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(chat_argv(fake_node), stdin=slave, stdout=slave, stderr=slave,
                            env=child_env())  # fmt: skip
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"you> " not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 1024)
        assert b"you> " in seen, seen
        os.write(master, b"\x04")  # Ctrl-D: end of input at the start of a line
        assert proc.wait(30) == 0
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # the child closed its side
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert seen.rstrip(b"\x04").endswith(b"you> \r\n"), seen  # the shell prompt starts afresh


def test_bare_daemon_reads_the_box_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = tmp_path / "edgemoe.toml"
    box.write_text('secret = "0123456789abcdef0123"\nstate_dir = "/tmp/x"\nprot = 7600\n')
    monkeypatch.setattr(config_cmds, "DEFAULT_CONFIG_PATH", box)
    monkeypatch.delenv("EDGEMOE_CONFIG", raising=False)
    result = runner.invoke(app, ["daemon"])
    # the file was read: its error names it (without it: "secret: missing")
    assert result.exit_code == 5
    assert result.stderr.strip() == (
        f"error: {box}: unknown key 'prot' (did you mean 'port'?)"
    )
    other = tmp_path / "other.toml"
    other.write_text('secret = "0123456789abcdef0123"\nstate_dir = "/tmp/x"\nportt = 1\n')
    named = runner.invoke(app, ["daemon", "--config", str(other)])
    assert named.exit_code == 5 and str(other) in named.stderr  # --config wins
    by_env = runner.invoke(app, ["daemon"], env={"EDGEMOE_CONFIG": str(other)})
    assert by_env.exit_code == 5 and str(other) in by_env.stderr  # so does EDGEMOE_CONFIG
    box.unlink()
    absent = runner.invoke(app, ["daemon"])
    assert absent.exit_code == 5 and "secret: missing" in absent.stderr


def test_failing_shard_says_one_clean_line(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    result = runner.invoke(app, ["shard", str(tmp_path / "model"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "llama" in result.output  # the cause, not an empty line


def test_shard_progress_knows_its_total_from_the_start(tmp_path: Path) -> None:
    from edgemoe.cli import model_cmds
    from edgemoe.model.tiny import write_tiny_model

    model = write_tiny_model("mixtral", tmp_path / "model", seed=1)
    totals: list[float | None] = []

    from rich.progress import Progress

    original = Progress.add_task

    def spy(self: Progress, *args: Any, **kwargs: Any) -> Any:
        totals.append(kwargs.get("total"))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Progress, "add_task", spy)
        model_cmds._do_shard(model, tmp_path / "out")
    assert totals == [1 + 2 * 8]  # dense part + 2 MoE layers x 8 experts
