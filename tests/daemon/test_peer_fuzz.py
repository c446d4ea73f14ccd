"""Fuzzing every peer decoder and every peer route of a real daemon (hypothesis): any input is
accepted or refused with the decoder's own error (a 4xx over HTTP), never anything else, and
the node keeps serving. A few dozen examples each in the normal suite; `make fuzz` runs
EDGEMOE_FUZZ_EXAMPLES (2000) each."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemoe.cluster.messages import (
    REGISTRY,
    TAG,
    Accept,
    Ack,
    Alive,
    Gossip,
    Learn,
    MessageError,
    Ping,
    Promise,
    Proposal,
    PushPull,
    Snapshot,
    Versioned,
    from_wire,
    to_wire,
)
from edgemoe.daemon.rpc import parse_forward
from edgemoe.daemon.wire import (
    HDR_DIGEST,
    HDR_NODE,
    HDR_NONCE,
    HDR_SIG,
    HDR_TIME,
    ReplayGuard,
    WireError,
    check_envelope,
    decode_array,
    keys_for,
    pack,
    parse_envelope,
    request_headers,
    unpack,
)

from .conftest import SECRET, Node

EXAMPLES = int(os.environ.get("EDGEMOE_FUZZ_EXAMPLES", "40"))
HTTP_EXAMPLES = int(os.environ.get("EDGEMOE_FUZZ_EXAMPLES", "15"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="EDGEMOE_FUZZ_EXAMPLES" not in
                os.environ, suppress_health_check=list(HealthCheck))  # fmt: skip
HTTP_FUZZ = settings(FUZZ, max_examples=HTTP_EXAMPLES)
RUN: Counter[str] = Counter()
KEYS = keys_for(SECRET.encode())
ME, SENDER = "a" * 16, "feedfeedfeedfeed"


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print("\nfuzz examples run (escapes: 0, else a test failed):",
          ", ".join(f"{k} {v}" for k, v in sorted(RUN.items())))  # fmt: skip


leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
          | st.text(max_size=20) | st.binary(max_size=64))  # fmt: skip
objects = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from([TAG, "sender", "epoch"]), inner,
                      max_size=5),
    max_leaves=20,
)  # fmt: skip


# ---- decoders ------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512))
def test_unpack_takes_any_bytes(data: bytes) -> None:
    RUN["wire.unpack"] += 1
    with contextlib.suppress(WireError):
        unpack(data)


@FUZZ
@given(objects, st.sampled_from(["float32", "bfloat16", "int64"]), st.integers(0, 3))
def test_tensor_decoding_takes_any_object(obj: Any, dtype: str, ndim: int) -> None:
    RUN["wire.decode_array"] += 1
    for candidate in (obj, {"dtype": dtype, "shape": obj, "data": b"\0" * 8},
                      {"dtype": obj, "shape": [1, 2], "data": b"\0" * 8}):  # fmt: skip
        with contextlib.suppress(WireError):
            decode_array(candidate, dtypes=(dtype,), ndim=ndim, max_elements=64, name="t")


@FUZZ
@given(objects)
def test_forward_parsing_takes_any_object(obj: Any) -> None:
    RUN["rpc.parse_forward"] += 1
    for candidate in (obj, {"layer": 0, "hidden": obj, "expert_ids": obj, "weights": obj}):
        with contextlib.suppress(WireError):
            parse_forward(candidate, num_layers=2, num_experts=8, hidden_size=4, dtype="float32")


PROPOSAL = Proposal(1, (("n1", 10),), (Snapshot("n1", 1, {"x": 1}),), "d",
                    (("n1", ((0, 1),)),), ((0, 1, "", "n1"),), "n1", "genesis")  # fmt: skip
VALID = [to_wire(m) for m in (
    Ping("n1", 1, "n2", 3, (Alive("n1", 2, "http://h:1", 5), Versioned("stats", "n1", 1, b""))),
    Ack("n1", 1), Gossip("n1", 2), PushPull("n1", True, (Alive("n2", 0, "u", 1),), ()),
    Promise("n1", 1, (1, "n1"), (0, "n2"), PROPOSAL), Accept("n1", 1, (1, "n1"), PROPOSAL),
    Learn("n1", (PROPOSAL,)),
)]  # fmt: skip


def _mutate(value: Any, path: list[int], new: Any) -> Any:
    """`value` with the leaf or node reached by `path` (indices into the items) replaced."""
    if not path:
        return new
    if isinstance(value, dict):
        keys = sorted(value, key=str)
        k = keys[path[0] % len(keys)] if keys else None
        if k is None:
            return new
        return {**value, k: _mutate(value[k], path[1:], new)}
    if isinstance(value, list) and value:
        i = path[0] % len(value)
        return [*value[:i], _mutate(value[i], path[1:], new), *value[i + 1 :]]
    return new


@FUZZ
@given(st.sampled_from(VALID), st.lists(st.integers(0, 20), max_size=6), objects)
def test_cluster_message_decoding_refuses_every_wrong_field(base: Any, path: list[int],
                                                            new: Any) -> None:  # fmt: skip
    RUN["messages.from_wire"] += 1
    try:
        msg = from_wire(_mutate(base, path, new))
    except MessageError:
        return
    assert type(msg).__name__ in REGISTRY  # what decodes is a whole, well-typed message
    for f in dataclasses.fields(msg):
        assert hasattr(msg, f.name)


@FUZZ
@given(objects)
def test_cluster_message_decoding_takes_any_object(obj: Any) -> None:
    RUN["messages.from_wire(any)"] += 1
    with contextlib.suppress(MessageError):
        from_wire(obj)


header_values = st.text(max_size=80) | st.sampled_from(["nan", "inf", "1e999", "-1", "", ME])


@FUZZ
@given(st.dictionaries(st.sampled_from([HDR_NODE, HDR_TIME, HDR_NONCE, HDR_SIG, HDR_DIGEST,
                                        "X-Edgemoe-Dest", "X-Edgemoe-Seal"]), header_values),
       st.booleans())  # fmt: skip
def test_header_parsing_takes_any_headers(overrides: dict[str, str], start_valid: bool) -> None:
    RUN["wire.parse_envelope"] += 1
    headers = request_headers(KEYS, SENDER, ME, "GET", "/v1/hello", b"") if start_valid else {}
    headers.update(overrides)
    try:
        env = parse_envelope(headers)
        check_envelope(KEYS, ReplayGuard(), ME, "GET", "/v1/hello", env)
    except WireError as exc:
        assert 400 <= exc.status < 500


# ---- routes of a real daemon -----------------------------------------------------------------

POST_ROUTES = ["/v1/experts/forward", "/v1/gossip"]
GET_ROUTES = ["/v1/hello", "/v1/manifest", "/v1/dense", "/v1/shards/0/0", "/v1/files/config.json"]


def _signed(node: Node, method: str, path: str, body: bytes) -> tuple[int, Any]:
    headers = request_headers(KEYS, SENDER, node.node_id, method, path, body)
    return node.request(method, path, raw=body, token=None, headers=headers, timeout=30)


@HTTP_FUZZ
@given(st.sampled_from(POST_ROUTES + GET_ROUTES), st.binary(max_size=2048),
       st.dictionaries(st.sampled_from([HDR_NODE, HDR_TIME, HDR_NONCE, HDR_SIG, HDR_DIGEST]),
                       header_values, max_size=5))  # fmt: skip
def test_every_route_refuses_any_unsigned_bytes(solo: Node, path: str, body: bytes,
                                                headers: dict[str, str]) -> None:  # fmt: skip
    RUN["http unsigned"] += 1
    method = "POST" if path in POST_ROUTES else "GET"
    ascii_headers = {k: v for k, v in headers.items() if v.isascii() and v.isprintable()}
    status, answer = solo.request(method, path, raw=body if method == "POST" else None,
                                  token=None, headers=ascii_headers, timeout=30)  # fmt: skip
    assert 400 <= status < 500, (path, status, answer)


@HTTP_FUZZ
@given(st.sampled_from(POST_ROUTES), st.binary(max_size=2048) | objects.map(pack))
def test_every_post_route_refuses_any_signed_bytes(solo: Node, path: str, body: bytes) -> None:
    RUN["http signed POST"] += 1
    status, answer = _signed(solo, "POST", path, body)
    assert 400 <= status < 500, (path, status, answer)


@HTTP_FUZZ
@given(st.sampled_from(GET_ROUTES), st.binary(min_size=1, max_size=256),
       st.text(st.sampled_from("abcXYZ0189.-_~%"), max_size=12))
def test_every_get_route_refuses_bodies_and_odd_paths(solo: Node, path: str, body: bytes,
                                                       suffix: str) -> None:  # fmt: skip
    RUN["http signed GET"] += 1
    status, answer = _signed(solo, "GET", path, body)
    assert status == 413 or 400 <= status < 500, (path, status, answer)
    odd = path.rsplit("/", 1)[0] + "/" + suffix
    status, answer = _signed(solo, "GET", odd, b"")
    assert status == 200 or 400 <= status < 500, (odd, status, answer)


def test_the_node_still_serves_after_the_fuzzing(solo: Node) -> None:
    status, body = solo.request(
        "POST", "/v1/completions", {"prompt": "Hello world", "max_tokens": 3, "temperature": 0}
    )
    assert status == 200 and len(body["choices"][0]["token_ids"]) == 3
    assert solo.request("GET", "/healthz", token=None)[1]["tasks"] == {"failed": {}}
