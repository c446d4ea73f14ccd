"""Fuzzing every client route of a real daemon: any JSON, bytes or headers get an answer below
500 (a 4xx with a reason for bad input), nothing logs a traceback, and the node keeps serving.

A bounded number of examples runs in the normal suite; EDGEMOE_FUZZ_EXAMPLES asks for more.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import MAX_NEW, PROMPTS, TOKEN, Node, TinyModel

EXAMPLES = int(os.environ.get("EDGEMOE_FUZZ_EXAMPLES", "120"))
ROUTES = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/cluster"),
    ("POST", "/v1/cluster/migrate"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
]
KEYS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "seed", "stream", "model", "n", "dry_run", "members", "role", "content"]  # fmt: skip

# small numbers (a valid request generates at most a few dozen tokens) and the extremes
numbers = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([2**31, 2**64, 2**200, -(2**63), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
)
texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["\ud800", "x\udfffy", "edgemoe", "user", "assistant", PROMPTS[0]]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, texts),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=5),
    ),
    max_leaves=12,
)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6).map(
        lambda d: json.dumps(d).encode()
    ),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.just(b"[" * 50_000 + b"]" * 50_000),
)
header_values = st.one_of(
    st.just(f"Bearer {TOKEN}".encode()),
    st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
    st.sampled_from([b"Bearer \xff", b"Bearer ", b"Basic x", b"bearer " + TOKEN.encode()]),
)
headers = st.lists(
    st.tuples(
        st.sampled_from([b"Authorization", b"Content-Type", b"Accept", b"Range", b"X-Fuzz"]),
        header_values,
    ),
    max_size=3,
)


def send(node: Node, method: str, path: str, hdrs: list[tuple[bytes, bytes]], body: bytes) -> int:
    """One request on a fresh connection (raw bytes: no client library cleans them up)."""
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close",
            f"Content-Length: {len(body)}".encode()]  # fmt: skip
    head += [name + b": " + value for name, value in hdrs]
    with socket.create_connection(("127.0.0.1", node.port), timeout=60) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0].split()
    assert len(status_line) >= 2, answer[:200]
    return int(status_line[1])


def test_any_request_to_a_client_route_is_answered_below_500(solo: Node, tiny: TinyModel) -> None:
    tracebacks = solo.log_path.read_text(errors="replace").count("Traceback")
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(route=st.sampled_from(ROUTES), hdrs=headers, body=bodies, as_get=st.booleans())
    def one(route: tuple[str, str], hdrs: list[tuple[bytes, bytes]], body: bytes,
            as_get: bool) -> None:  # fmt: skip
        method, path = route
        if path == "/v1/cluster/migrate":  # fuzz the parsing, not a real re-placement each time
            body = _dry_run(body)
        if as_get and method == "POST":
            method = "GET"  # the wrong method: 405
        status = send(solo, method, path, hdrs, body)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (method, path, hdrs, body[:200], status)

    one()
    assert any(400 <= s < 500 for s in seen), seen
    log = solo.log_path.read_text(errors="replace")
    assert log.count("Traceback") == tracebacks, log[-3000:]
    status, done = solo.request("POST", "/v1/completions", {
        "prompt": PROMPTS[0], "max_tokens": MAX_NEW, "temperature": 0})  # fmt: skip
    assert status == 200 and done["choices"][0]["token_ids"] == tiny.reference[PROMPTS[0]]


def _dry_run(body: bytes) -> bytes:
    try:
        value: Any = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if isinstance(value, dict) and "dry_run" not in value:
        value["dry_run"] = True
        return json.dumps(value).encode()
    return body
