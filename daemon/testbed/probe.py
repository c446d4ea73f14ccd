"""Link probes measured at the application level (TCP between two namespaces).

`ping` under-reports the NFQUEUE ingress delay, so round trips and rates are measured the
way the daemons see them: a TCP echo for RTT, a TCP bulk send timed by the receiver for rate.
`python -m edgemoe.daemon.testbed.probe serve|rtt|rate ...` runs inside a namespace;
`measure_rtt` / `measure_rate` drive both ends through a `Testbed`.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgemoe.daemon.testbed.lifecycle import Testbed

PROBE_PORT = 7219
CHUNK = 64 * 1024
# A probe server exits after this long even if nobody talks to it.
SERVE_MAX_S = 60.0
CLIENT_TIMEOUT_S = 30.0


def serve(host: str, port: int, max_s: float) -> None:
    """Answer connections one at a time until `max_s`: first byte `e` = echo 64-byte
    messages, `s` = sink everything, then reply `bytes seconds` (first to last byte)."""
    deadline = time.monotonic() + max_s
    with socket.create_server((host, port), reuse_port=False) as srv:
        print("ready", flush=True)
        while (left := deadline - time.monotonic()) > 0:
            srv.settimeout(left)
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                break
            with conn:
                conn.settimeout(CLIENT_TIMEOUT_S)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                mode = conn.recv(1)
                if mode == b"e":
                    while msg := _recv_exact(conn, 64):
                        conn.sendall(msg)
                elif mode == b"s":
                    total, first, last = 0, 0.0, 0.0
                    while data := conn.recv(CHUNK):
                        last = time.monotonic()
                        first = first or last
                        total += len(data)
                    conn.sendall(f"{total} {last - first}\n".encode())


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            return b""
        buf += part
    return buf


def rtt(host: str, port: int, count: int) -> dict[str, float]:
    """Median and minimum of `count` 64-byte round trips over one TCP connection."""
    times = []
    with socket.create_connection((host, port), timeout=CLIENT_TIMEOUT_S) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"e")
        msg = bytes(64)
        for _ in range(count):
            t0 = time.perf_counter()
            conn.sendall(msg)
            if not _recv_exact(conn, 64):
                raise ConnectionError("echo server closed the connection")
            times.append(time.perf_counter() - t0)
    return {"rtt_median_s": statistics.median(times), "rtt_min_s": min(times)}


def rate(host: str, port: int, seconds: float) -> dict[str, float]:
    """Send as fast as TCP allows for `seconds`; the receiver's byte count over its time."""
    payload = bytes(CHUNK)
    with socket.create_connection((host, port), timeout=CLIENT_TIMEOUT_S) as conn:
        conn.sendall(b"s")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            part = conn.recv(64)
            if not part:
                break
            reply += part
    total, secs = reply.split()
    return {"bytes": float(total), "seconds": float(secs),
            "mbps": float(total) * 8 / max(float(secs), 1e-9) / 1e6}  # fmt: skip


def _client(tb: Testbed, src: int, dst: int, args: list[str]) -> dict[str, float]:
    server = tb.popen(
        dst,
        [sys.executable, "-m", "edgemoe.daemon.testbed.probe", "serve",
         "--host", tb.address(dst), "--max-s", str(SERVE_MAX_S)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ready = server.stdout.readline() if server.stdout else ""
        if ready.strip() != "ready":
            raise RuntimeError(f"probe server on node {dst} did not start")
        argv = [sys.executable, "-m", "edgemoe.daemon.testbed.probe", *args, tb.address(dst)]
        done = subprocess.run(
            tb.command(src, argv), capture_output=True, text=True, timeout=SERVE_MAX_S,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"probe {args[0]} {src}->{dst} failed: {done.stderr.strip()}")
        return json.loads(done.stdout)
    finally:
        server.terminate()
        server.wait(timeout=5)


def measure_rtt(tb: Testbed, src: int, dst: int, count: int = 50) -> dict[str, float]:
    return _client(tb, src, dst, ["rtt", "--count", str(count)])


def measure_rate(tb: Testbed, src: int, dst: int, seconds: float = 1.0) -> dict[str, float]:
    return _client(tb, src, dst, ["rate", "--seconds", str(seconds)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=PROBE_PORT)
    p.add_argument("--max-s", type=float, default=SERVE_MAX_S)
    p = sub.add_parser("rtt")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--port", type=int, default=PROBE_PORT)
    p.add_argument("host")
    p = sub.add_parser("rate")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--port", type=int, default=PROBE_PORT)
    p.add_argument("host")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.host, args.port, args.max_s)
        return 0
    if args.cmd == "rtt":
        result = rtt(args.host, args.port, max(1, min(args.count, 10_000)))
    else:
        result = rate(args.host, args.port, max(0.05, min(args.seconds, 30.0)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
