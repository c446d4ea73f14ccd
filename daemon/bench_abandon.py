"""Latency of a short request behind abandoned long generations, against the same request on an
idle node, measured side by side in one run on one daemon (issue 11, F5).

    python -m edgemoe.daemon.bench_abandon [WORKDIR] [--rounds N] [--abandoned K]

Each round: K clients each ask for max_tokens=2048 (not streamed) and hang up after
`HANG_UP_S`; then a 4-token request is timed. The idle figure is the same request alone.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import statistics
import tempfile
import time
from pathlib import Path

from edgemoe.daemon.bench import _daemon, _get, _wait

HANG_UP_S = 0.5
SHORT = {"prompt": "The edge servers", "max_tokens": 4, "temperature": 0}
LONG = {"prompt": "Hello world", "max_tokens": 2048, "temperature": 0}


def _abandon(url: str, token: str, body: dict[str, object]) -> socket.socket:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + data)
    return sock


def _timed(url: str, token: str) -> float:
    start = time.perf_counter()
    _get(url + "/v1/completions", token, SHORT)
    return time.perf_counter() - start


def run(workdir: Path, rounds: int, abandoned: int) -> dict[str, float]:
    from edgemoe.model.shard import shard_checkpoint
    from edgemoe.model.tiny import write_tiny_model

    secret, token = secrets.token_hex(32), secrets.token_urlsafe(24)
    model = write_tiny_model("mixtral", workdir / "model", seed=0)
    shard_checkpoint(model, workdir / "shards")
    proc, url = _daemon(workdir, "node", secret, token, model_dir=workdir / "shards",
                        capacity="100%", cluster_id="bench-abandon", seeds=[])  # fmt: skip
    try:
        _wait(lambda: bool(_get(url + "/healthz").get("ready")), 180, "the node to be ready")
        _timed(url, token)  # warm-up
        idle, behind = [], []
        for _ in range(rounds):
            idle.append(_timed(url, token))
            socks = [_abandon(url, token, LONG) for _ in range(abandoned)]
            time.sleep(HANG_UP_S)
            for sock in socks:
                sock.close()
            behind.append(_timed(url, token))
            time.sleep(1.0)  # let the abandoned ones drain before the next idle figure
    finally:
        proc.stop()
    figures = {"idle_s": statistics.median(idle), "behind_s": statistics.median(behind)}
    figures["ratio"] = figures["behind_s"] / figures["idle_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--abandoned", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        f = run(args.workdir or Path(tmp), args.rounds, args.abandoned)
    print(f"4-token request, median of {args.rounds}: idle {f['idle_s'] * 1000:.0f} ms, behind "
          f"{args.abandoned} abandoned max_tokens=2048 generations {f['behind_s'] * 1000:.0f} ms, "
          f"ratio {f['ratio']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
