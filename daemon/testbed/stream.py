"""Shard streaming over a shaped link: the daemon's verified fetch against a plain HTTP copy of
the same files, between two testbed namespaces.

`edgemoe bench rpc` compares them on loopback, where a 2-vCPU box is CPU-bound on both sides
(the receive, the write and the hash share one core's worth of work with the sender); here
they cross a `tc tbf` link at a LAN's rate, which is what a node fetching experts from a peer
meets. Node 0 runs one daemon holding the shards and the plain static server; the fetches run
on a thread inside node 1's namespace (the same `_stream_figures` as on loopback).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from edgemoe.daemon.bench import ECHO_SERVER, _get, _stream_figures, _wait
from edgemoe.daemon.testbed.lifecycle import Testbed
from edgemoe.daemon.testbed.netns import namespace_pool
from edgemoe.daemon.testbed.plan import TestbedError, TestbedSpec

DAEMON_PORT, PLAIN_PORT = 7411, 7412
READY_TIMEOUT_S = 120.0


def stream_over_link(
    shard_dir: Path, workdir: Path, *, mbps: float, delay_ms: float = 0.0, rounds: int = 3
) -> dict[str, Any]:
    """`_stream_figures` across a link of `mbps` each way and `delay_ms` one way per node;
    the figures with the setting under "link". Needs root (see `Testbed`)."""
    spec = TestbedSpec(nodes=2, bandwidth_mbps=mbps, delay_ms=delay_ms)
    secret, token = secrets.token_hex(32), secrets.token_urlsafe(24)
    # the files linked into a directory of this daemon's own (a model dir has one daemon)
    served = workdir / "link-shards"
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(shard_dir, served, copy_function=os.link, ignore=shutil.ignore_patterns(".*"))
    with Testbed(spec) as tb:
        host = tb.address(0)
        state = workdir / "link-daemon"
        state.mkdir(parents=True, exist_ok=True)
        with (workdir / "link-daemon.log").open("wb") as log:
            daemon = tb.popen(0, [
                sys.executable, "-m", "edgemoe.cli", "daemon", "--state-dir", str(state),
                "--host", host, "--port", str(DAEMON_PORT), "--interface", host,
                "--secret", secret, "--api-token", token, "--admin-token", token,
                "--model-dir", str(served),
                "--cluster-id", f"bench-link-{secrets.token_hex(3)}", "--capacity", "100%",
                "--device", "cpu", "--log-level", "warning",
            ], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        plain = [sys.executable, "-c", ECHO_SERVER, str(PLAIN_PORT), "1", str(served), host]
        tb.popen(0, plain, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)  # fmt: skip
        url, files_url = f"http://{host}:{DAEMON_PORT}", f"http://{host}:{PLAIN_PORT}/files"
        pool = namespace_pool(tb.namespace(1), 1)
        try:
            pool.submit(_wait_ready, url, token, files_url, daemon).result(READY_TIMEOUT_S + 10)
            figures = pool.submit(
                asyncio.run, _stream_figures(url, files_url, secret, shard_dir, workdir, rounds)
            ).result()
        finally:
            pool.shutdown()
    return {**figures, "link": {"mbps": mbps, "delay_ms": delay_ms}}


def _wait_ready(url: str, token: str, files_url: str, daemon: subprocess.Popen[Any]) -> None:
    """Until the daemon is ready and the plain server answers (run inside node 1)."""

    def ready() -> bool:
        if daemon.poll() is not None:
            raise TestbedError(f"the daemon exited {daemon.returncode} (see link-daemon.log)")
        if not _get(url + "/healthz", token).get("ready"):
            return False
        with urllib.request.urlopen(files_url + "/manifest.json", timeout=3) as resp:
            return resp.status == 200

    _wait(ready, READY_TIMEOUT_S, f"the daemon at {url} and the plain server")
