"""Bad input on every endpoint: a 4xx with a reason, the daemon keeps serving, disk unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgpack
import numpy as np

from edgemoe.daemon.wire import keys_for, pack, request_headers

from .conftest import SECRET, TOKEN, Node, TinyModel


def disk_state(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.endswith(".log"):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def signed(
    node: Node, method: str, path: str, body: bytes = b"", **kw: object
) -> tuple[int, object]:
    headers = request_headers(keys_for(SECRET.encode()), "feedfeedfeedfeed", node.node_id,
                              method, path, body)  # fmt: skip
    headers.update(kw.pop("override", {}))  # type: ignore[arg-type]
    return node.request(
        method, path, raw=body if method == "POST" else None, token=None, headers=headers
    )


def tensor(arr: np.ndarray, dtype: str | None = None) -> dict[str, object]:
    return {"dtype": dtype or arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}


def forward_body(
    layer: int = 0,
    rows: int = 2,
    hidden: int = 64,
    ids: list[int] | None = None,
    hdtype: str = "float32",
) -> bytes:
    h = np.zeros((rows, hidden), dtype=np.float32)
    e = np.array([ids or [0, 1]] * rows, dtype=np.int64)
    w = np.full(e.shape, 0.5, dtype=np.float32)
    return pack({"layer": layer, "hidden": tensor(h, hdtype), "expert_ids": tensor(e),
                 "weights": tensor(w)})  # fmt: skip


def test_every_endpoint_refuses_bad_input_and_keeps_serving(solo: Node, tiny: TinyModel) -> None:
    before = disk_state(solo.state_dir, solo.model_dir)
    fwd = "/v1/experts/forward"
    good = forward_body()
    status, body = signed(solo, "POST", fwd, good)
    assert status == 200, body
    out = msgpack.unpackb(body)["out"]
    assert out["shape"] == [2, 64] and out["dtype"] == "float32"

    cases: list[tuple[str, tuple[int, object], int, str]] = [
        ("no HMAC", solo.request("POST", fwd, raw=good, token=None), 401, "authentication"),
        (
            "wrong HMAC",
            signed(solo, "POST", fwd, good, override={"X-Edgemoe-Signature": "0" * 64}),
            401,
            "HMAC",
        ),
        ("malformed msgpack", signed(solo, "POST", fwd, b"\xc1\x00\x01"), 400, "msgpack"),
        ("not a map", signed(solo, "POST", fwd, pack([1, 2])), 400, "map"),
        ("unknown layer", signed(solo, "POST", fwd, forward_body(layer=99)), 404, "layer"),
        ("unknown expert", signed(solo, "POST", fwd, forward_body(ids=[0, 42])), 404, "expert_ids"),
        ("wrong width", signed(solo, "POST", fwd, forward_body(hidden=10)), 400, "hidden"),
        ("wrong dtype", signed(solo, "POST", fwd, forward_body(hdtype="int64")), 400, "dtype"),
        ("oversized", signed(solo, "POST", fwd, b"\x00" * (65 * 2**20)), 413, "exceeds"),
        ("bad shard path", signed(solo, "GET", "/v1/shards/0/..%2F..%2Fmanifest"), 400, "integers"),
        ("unknown shard", signed(solo, "GET", "/v1/shards/7/0"), 404, "manifest"),
        ("side file trick", signed(solo, "GET", "/v1/files/..manifest.json"), 400, "side files"),
        (
            "unsigned shard",
            solo.request("GET", "/v1/shards/0/0", token=None),
            401,
            "authentication",
        ),
        ("gossip garbage", signed(solo, "POST", "/v1/gossip", b"\x92\x01"), 400, ""),
        ("wrong token", solo.request("GET", "/v1/cluster", token="nope" * 5), 401, "token"),
        (
            "no token",
            solo.request("POST", "/v1/completions", {"prompt": "x"}, token=None),
            401,
            "token",
        ),
        ("not JSON", solo.request("POST", "/v1/completions", raw=b"{nope"), 400, "JSON"),
        (
            "bad max_tokens",
            solo.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": -3}),
            400,
            "max_tokens",
        ),
        (
            "bad prompt",
            solo.request("POST", "/v1/completions", {"prompt": {"a": 1}}),
            400,
            "prompt",
        ),
        (
            "bad token ids",
            solo.request("POST", "/v1/completions", {"prompt": [1, 10**9]}),
            400,
            "token ids",
        ),
        (
            "unknown model",
            solo.request("POST", "/v1/completions", {"prompt": "x", "model": "gpt-9"}),
            404,
            "model",
        ),
        (
            "bad messages",
            solo.request("POST", "/v1/chat/completions", {"messages": "hi"}),
            400,
            "messages",
        ),
        (
            "bad role",
            solo.request(
                "POST", "/v1/chat/completions", {"messages": [{"role": "god", "content": "x"}]}
            ),
            400,
            "role",
        ),
        (
            "huge body",
            solo.request("POST", "/v1/completions", raw=b"[" * (2 << 20)),
            413,
            "exceeds",
        ),
        (
            "bad migrate",
            solo.request("POST", "/v1/cluster/migrate", {"members": "all"}),
            400,
            "members",
        ),
    ]
    for name, (status, body), want, needle in cases:
        assert status == want, (name, status, body)
        reason = body["error"]["message"] if isinstance(body, dict) else str(body)
        assert needle.lower() in reason.lower(), (name, reason)

    # a replayed request (same nonce) is refused even though its signature is valid
    headers = request_headers(keys_for(SECRET.encode()), "feedfeedfeedfeed", solo.node_id,
                              "POST", fwd, good)  # fmt: skip
    assert solo.request("POST", fwd, raw=good, token=None, headers=headers)[0] == 200
    status, body = solo.request("POST", fwd, raw=good, token=None, headers=headers)
    assert status == 401 and "replayed" in body["error"]["message"]

    # still serving, and nothing on disk changed
    status, body = solo.request(
        "POST", "/v1/completions", {"prompt": "Hello world", "max_tokens": 5, "temperature": 0}
    )
    assert status == 200 and len(body["choices"][0]["token_ids"]) == 5
    assert solo.request("GET", "/healthz", token=None)[0] == 200
    assert disk_state(solo.state_dir, solo.model_dir) == before
    assert solo.proc is not None and solo.proc.poll() is None
    assert TOKEN  # the right token was used for the good requests above
