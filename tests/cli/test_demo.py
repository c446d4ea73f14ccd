"""`edgemoe demo`: the helpers it decides with, that it stops everything it starts, and the
whole demo as a user runs it (real daemons, subprocess)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgemoe.cli.demo_cmds import (
    DOMAINS,
    LocalCluster,
    demo_capacity,
    holdings_settled,
    migration_done,
    placement_moves,
    port_is_free,
    shifted_domain,
)

# A stand-in daemon for the process-handling test: binds the port of its config, starts a
# grandchild, ignores SIGTERM (so only SIGKILL of the whole group ends it).
STUBBORN = textwrap.dedent(
    """
    import signal, socket, subprocess, sys, time, tomllib
    cfg = tomllib.load(open(sys.argv[sys.argv.index("--config") + 1], "rb"))
    s = socket.socket(); s.bind(("127.0.0.1", cfg["port"])); s.listen()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print(child.pid, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(300)
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_stop_kills_whole_process_groups_and_frees_ports(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    cluster = LocalCluster(tmp_path, tmp_path, 2, 1000, daemon_argv=(sys.executable, str(script)))
    cluster.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(
            n.log_path.read_text().strip() for n in cluster.nodes
        ):
            time.sleep(0.1)
        grandchildren = [int(n.log_path.read_text().split()[0]) for n in cluster.nodes]
        assert not any(port_is_free(n.port) for n in cluster.nodes)
    finally:
        t0 = time.monotonic()
        busy = cluster.stop(grace=1.0)
    assert busy == []
    assert time.monotonic() - t0 < 10
    assert all(port_is_free(n.port) for n in cluster.nodes)
    assert not any(n.proc is not None and n.proc.poll() is None for n in cluster.nodes)
    time.sleep(0.2)
    assert not any(alive(pid) for pid in grandchildren)


def test_capacity_covers_the_model_with_room_for_replicas() -> None:
    for nodes in (1, 2, 3, 5):
        cap = demo_capacity(nodes, 2, 8, 100)
        assert nodes * cap >= 2 * 8 * 100  # every expert fits somewhere
        assert cap <= 2 * 8 * 100
    assert 3 * demo_capacity(3, 2, 8, 100) > 1.5 * 2 * 8 * 100  # replicas possible


def test_shifted_domain_is_new_to_node0() -> None:
    assert shifted_domain({0: "code", 1: "math"}) == "cooking"
    every = {i: d for i, d in enumerate(DOMAINS)}
    assert shifted_domain(every) != every[0]


def test_placement_moves_lists_copies_each_node_gained() -> None:
    old = {"placement": {"holders": {"0/0": ["a"], "0/1": ["b"]}}}
    new = {"placement": {"holders": {"0/0": ["a", "b"], "0/1": ["a"]}}}
    assert placement_moves(old, new, 10) == [
        {"layer": 0, "expert": 0, "from": "a", "to": "b", "bytes": 10},
        {"layer": 0, "expert": 1, "from": "b", "to": "a", "bytes": 10},
    ]


def test_migration_done_needs_announced_holdings_to_cover_the_placement() -> None:
    state = {
        "placement": {"holders": {"0/0": ["a"], "0/1": ["b"]}},
        "holdings": {"a": ["0/0"], "b": []},
        "migration": {"pending": 0},
    }
    assert not migration_done(state)
    state["holdings"]["b"] = ["0/1", "0/0"]
    assert migration_done(state)
    assert not holdings_settled(state)  # b still announces 0/0, which a alone holds now
    state["holdings"]["b"] = ["0/1"]
    assert holdings_settled(state)
    state["migration"]["pending"] = 1
    assert not migration_done(state) and not holdings_settled(state)


def _listening_ports() -> set[int]:
    out: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                out.add(int(fields[1].rsplit(":", 1)[1], 16))
    return out


def _daemons_using(path: str) -> set[int]:
    """Processes whose command line names ``path`` (the demo's daemons get their config
    from its work dir; other tests on this machine may run daemons of their own)."""
    pids: set[int] = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if path in cmd:
                pids.add(int(proc.name))
    return pids


@pytest.mark.timeout(240)
def test_demo_with_two_nodes_shows_placement_and_migration_and_cleans_up() -> None:
    before_ports = _listening_ports()
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "demo", "--nodes", "2", "--rounds", "3"],
        capture_output=True, text=True, timeout=230, env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = out.stdout
    assert "experts held per node and layer" in text
    assert re.search(r"migration after the shift: epoch \d+ -> \d+", text), text[-3000:]
    copies = [int(n) for n in re.findall(r"; (\d+) expert cop(?:y|ies)", text)]
    assert len(copies) == 2 and sum(copies) > 0, text[-3000:]  # experts did move
    assert re.search(r"│ node1 .*│ +\d+/16 │", text)  # per node: held experts per layer
    assert "requests: latency and bytes" in text
    ports = [int(p) for p in re.findall(r"ports ([\d, ]+) \(", text)[0].split(", ")]
    assert len(ports) == 2
    assert all(port_is_free(p) for p in ports)
    workdir = re.findall(r"logs in\s+(/\S+)", text)[0]
    assert _daemons_using(workdir) == set()
    assert not Path(workdir).exists()  # the temp dir is removed without --keep
    assert not (set(ports) & (_listening_ports() - before_ports))
    assert elapsed < 180, f"demo took {elapsed:.0f} s"


def test_demo_is_interrupted_cleanly_by_sigint(
    tmp_path: Path, terminal_signals: Callable[[], None]
) -> None:
    """Ctrl-C while daemons are starting: every daemon stops, exit code 130."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemoe.cli", "demo", "--nodes", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "160"},
        preexec_fn=terminal_signals,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if "started 2 daemons" in line or time.monotonic() > deadline:
            break
    ports = [int(p) for p in re.findall(r"ports ([\d, ]+) \(", "".join(lines))[0].split(", ")]
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    assert all(port_is_free(p) for p in ports)
    with socket.socket() as s:  # and a server can listen on them again right away
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", ports[0]))
        s.listen()
