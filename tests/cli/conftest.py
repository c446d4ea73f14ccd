"""A contract-shaped HTTP node (contracts.md, "Daemon HTTP") for the CLI's logic tests: real
sockets on 127.0.0.1, canned cluster state, so rendering and error paths are tested without
loading a model. Tests against the real daemon live in test_against_daemon.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

TOKEN = "test-token-0123456789"


def cluster_state(url: str) -> dict[str, Any]:
    """Two nodes, 2 MoE layers x 4 experts; node-a works on experts 0-1, node-b on 2-3."""
    return {
        "node_id": "node-a", "cluster_id": "lab", "url": url, "epoch": 3,
        "model": {"architecture": "mixtral", "num_layers": 2, "num_experts": 4, "top_k": 2,
                  "fingerprint": "f" * 16, "expert_bytes": 4096},
        "members": [
            {"node_id": "node-a", "url": url, "state": "alive", "capacity_bytes": 5 * 4096,
             "incarnation": 1},
            {"node_id": "node-b", "url": "http://127.0.0.1:9", "state": "suspect",
             "capacity_bytes": 5 * 4096, "incarnation": 4},
        ],
        "placement": {"epoch": 3, "strategy": "edgemoe", "reason": "drift", "holders": {
            "0/0": ["node-a"], "0/1": ["node-a", "node-b"], "0/2": ["node-b"], "0/3": ["node-b"],
            "1/0": ["node-a"], "1/1": ["node-a"], "1/2": ["node-b"], "1/3": ["node-a", "node-b"],
        }},
        "holdings": {"node-a": ["0/0", "0/1", "1/0", "1/1", "1/3"],
                     "node-b": ["0/1", "0/2", "0/3", "1/2", "1/3"]},
        "stats": {
            "node-a": {"version": 7, "request_rate": 1.5,
                       "counts": [[6.0, 3.0, 1.0, 0.0], [5.0, 5.0, 0.0, 0.0]]},
            "node-b": {"version": 2, "request_rate": 0.5,
                       "counts": [[0.0, 1.0, 4.0, 5.0], [0.0, 0.0, 8.0, 2.0]]},
        },
        "ready": True, "warnings": [],
        "local_share": 0.85, "routed": {"local": 85, "total": 100}, "remote_bytes": 123456,
        "drift": {"value": 0.07, "threshold": 0.15, "min_interval_s": 30.0},
        "migration": {"pending": 1, "bytes_moved": 8192},
    }  # fmt: skip


class FakeNode(ThreadingHTTPServer):
    daemon_threads = True
    token = TOKEN
    no_model = False  # True: like a node still fetching its shards
    abandoned = 0  # streamed answers whose client went away
    requests: list[tuple[str, str, Any]]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: FakeNode

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, code: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._send(401, {"error": "bad token"})
        return False

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path, None))
        if self.path == "/healthz":
            return self._send(200, {"ok": True, "node_id": "node-a"})
        if not self._authorised():
            return None
        if self.path == "/v1/cluster":
            state = cluster_state(self.server.url)
            if self.server.no_model:
                state["model"] = None
            return self._send(200, state)
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "tiny-mixtral"}]})
        return self._send(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.server.requests.append(("POST", self.path, body))
        if not self._authorised():
            return None
        if self.path == "/v1/cluster/migrate":
            if body.get("members") == ["ghost"]:
                return self._send(400, {"error": "unknown member ghost"})
            plan = [{"layer": 0, "expert": 2, "from": "node-b", "to": "node-a", "bytes": 4096}]
            return self._send(200, {"epoch": 4, "plan": plan, "decided": not body["dry_run"]})
        if self.path == "/v1/chat/completions":
            said = body["messages"][-1]["content"]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            # "slow": a long answer, a piece every 0.1 s (long enough to be interrupted)
            pieces = ["echo: ", said] if said != "slow" else ["tick "] * 100
            try:
                for piece in pieces:
                    event = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                    if said == "slow":
                        time.sleep(0.1)
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                self.server.abandoned += 1  # the client hung up mid-answer
            return None
        return self._send(404, {"error": f"no route {self.path}"})


@pytest.fixture
def fake_node() -> Iterator[FakeNode]:
    server = FakeNode(("127.0.0.1", 0), Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
