"""The client API under abuse: abandoned generations stop, a full node says 429, bad input of
any kind is a 4xx with a reason (never a 500 or a logged traceback)."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from edgemoe.daemon.engine import MAX_ADMITTED
from edgemoe.daemon.http_server import HEAD_TIMEOUT_S, MAX_UNPROVEN

from .conftest import MAX_NEW, PROMPTS, TOKEN, Node, TinyModel, make_node, running, wait_for

CANCELLED = "edgemoe_generations_cancelled_total"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def metric(node: Node, name: str) -> float:
    status, body = node.request("GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing")


def raw_post(node: Node, path: str, body: dict) -> socket.socket:
    """Send a request and return the socket without reading the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + data)
    return sock


def answers_reference(node: Node, tiny: TinyModel) -> bool:
    status, done = node.request("POST", "/v1/completions", {
        "prompt": PROMPTS[0], "max_tokens": MAX_NEW, "temperature": 0})  # fmt: skip
    return status == 200 and done["choices"][0]["token_ids"] == tiny.reference[PROMPTS[0]]


def test_client_leaving_a_non_streaming_request_stops_its_generation(
    solo: Node, tiny: TinyModel
) -> None:
    before = metric(solo, CANCELLED)
    # ignore_eos: a warm batched node reaches the greedy end-of-sequence within the second
    # below, and a generation that ended by itself is not a cancelled one
    body = {"prompt": PROMPTS[1], "max_tokens": 2048, "temperature": 0, "stream": False,
            "ignore_eos": True}
    socks = [raw_post(solo, "/v1/completions", body), raw_post(solo, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 2048,
        "temperature": 0, "ignore_eos": True})]  # fmt: skip
    time.sleep(1.0)  # both are generating (or waiting for a worker)
    for sock in socks:
        sock.close()
    wait_for(lambda: metric(solo, CANCELLED) == before + 2, 30, "both generations to stop")
    assert answers_reference(solo, tiny)


def test_a_full_node_answers_429_with_retry_after_then_serves_again(
    solo: Node, tiny: TinyModel
) -> None:
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": 2048, "stream": True,
                       "ignore_eos": True})  # held until we let go, never ended by EOS
    held = []
    try:
        for _ in range(MAX_ADMITTED):
            conn = http.client.HTTPConnection("127.0.0.1", solo.port, timeout=60)
            conn.request("POST", "/v1/completions", body, HEADERS)
            assert conn.getresponse().status == 200  # admitted: headers are out
            held.append(conn)
        conn = http.client.HTTPConnection("127.0.0.1", solo.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 4}),
                     HEADERS)  # fmt: skip
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        assert resp.status == 429, answer
        assert int(resp.headers["Retry-After"]) >= 1
        assert "busy" in answer["error"]["message"]
        conn.close()
    finally:
        for conn in held:
            conn.sock.close()
            conn.close()
    wait_for(lambda: answers_reference(solo, tiny), 60, "the node to serve again")
    assert metric(solo, "edgemoe_generations_refused_busy_total") >= 1


ADMIN = "test-admin-token-9876543210"


@pytest.fixture(scope="module")
def guarded(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node with both tokens: inference and administration are separate roles."""
    node = make_node(tmp_path_factory.mktemp("guarded"), "guarded", shard_dir=tiny.shard_dir,
                     cluster_id="guarded", capacity="100%", mdns=False,
                     extra=["--admin-token", ADMIN])  # fmt: skip
    with running(node):
        yield node


def test_admin_routes_need_the_admin_token_not_the_api_token(guarded: Node) -> None:
    dry = {"dry_run": True}
    status, body = guarded.request("POST", "/v1/cluster/migrate", dry, token=TOKEN)
    assert status == 403 and "needs the admin token" in body["error"]["message"], body
    status, body = guarded.request("POST", "/v1/cluster/migrate", dry, token=None)
    assert status == 401, body
    status, body = guarded.request("POST", "/v1/cluster/migrate", dry, token="\xff" * 8)
    assert status == 401, body
    status, body = guarded.request("POST", "/v1/cluster/migrate", dry, token=ADMIN)
    assert status == 200 and body["decided"] is False, body
    assert guarded.request("GET", "/v1/cluster", token=ADMIN)[0] == 200  # the CLI reads with it
    assert guarded.request("GET", "/v1/cluster", token=TOKEN)[0] == 200


def test_cli_migrate_sends_the_admin_token(guarded: Node) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEMOE_")}
    cmd = [sys.executable, "-m", "edgemoe.cli", "migrate", "--node", guarded.url,
           "--api-token", TOKEN, "--dry-run", "--json"]  # fmt: skip
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 4, refused.stderr
    assert "needs the admin token" in refused.stderr and "--admin-token" in refused.stderr
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**env, "EDGEMOE_ADMIN_TOKEN": ADMIN})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["decided"] is False


def tracebacks(node: Node) -> int:
    return node.log_path.read_text(errors="replace").count("Traceback")


BAD_BODIES = [
    ({"prompt": "x", "temperature": 1e-300}, 400, "temperature must be 0"),
    ({"prompt": "x", "temperature": 0.5, "seed": 2**200}, 400, "seed must be an integer in"),
    ({"prompt": "x", "seed": -1}, 400, "seed must be an integer in"),
    ({"prompt": "lone \ud800 surrogate"}, 400, "prompt contains an unpaired surrogate"),
    ({"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens must be in"),
    ({"prompt": "x", "max_tokens": 1e400}, 400, "max_tokens must be an integer"),
    ({"prompt": "x", "top_p": float("nan")}, 400, "top_p must be a number"),
    ({"prompt": "x", "temperature": float("inf")}, 400, "temperature must be a number"),
    ({"prompt": ["a", "b"]}, 400, "prompt must be a string or a list of token ids"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream must be true or false"),
]


def test_bad_generation_parameters_are_400s_with_a_reason_and_no_traceback(
    solo: Node, tiny: TinyModel
) -> None:
    before = tracebacks(solo)
    for body, status, reason in BAD_BODIES:
        got, answer = solo.request("POST", "/v1/completions", body)
        assert (got, reason in answer["error"]["message"]) == (status, True), (body, answer)
    chat = {"messages": [{"role": "user", "content": "\udfff"}]}
    got, answer = solo.request("POST", "/v1/chat/completions", chat)
    assert got == 400 and "message content contains an unpaired surrogate" in str(answer)
    nested = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    got, answer = solo.request("POST", "/v1/completions", raw=nested)
    assert got == 400 and "nests too deeply" in answer["error"]["message"], answer
    for header in (b"Bearer \xff", b"Bearer \xc3", b"\xff\xfe"):
        sock = socket.create_connection(("127.0.0.1", solo.port), timeout=30)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Authorization: " + header + b"\r\n\r\n")  # fmt: skip
        assert sock.recv(4096).startswith(b"HTTP/1.1 401"), header
        sock.close()
    assert tracebacks(solo) == before, solo.log()
    assert answers_reference(solo, tiny)


def test_slowloris_connections_are_dropped_and_do_not_block_a_client(
    solo: Node, tiny: TinyModel
) -> None:
    slow = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", solo.port), timeout=5)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    start = time.monotonic()
    assert answers_reference(solo, tiny)  # a client sending its request at once is served
    held = set(slow)
    while held and time.monotonic() < start + HEAD_TIMEOUT_S + 15:
        for sock in list(held):
            try:
                sock.sendall(b"X-Slow: 1\r\n")  # one more header line: never a complete head
                readable = select.select([sock], [], [], 0)[0]
                if readable and not sock.recv(1):
                    raise ConnectionResetError
            except OSError:
                held.discard(sock)
                sock.close()
        time.sleep(1.0)
    for sock in held:
        sock.close()
    assert not held, f"{len(held)} of 200 slow connections still open"
    capped = metric(solo, 'edgemoe_connections_dropped_total{reason="unproven_cap"}')
    timed_out = metric(solo, 'edgemoe_connections_dropped_total{reason="slow_head"}')
    assert capped >= 200 - MAX_UNPROVEN, capped  # never more than MAX_UNPROVEN held at once
    assert capped + timed_out >= 200
    assert answers_reference(solo, tiny)
