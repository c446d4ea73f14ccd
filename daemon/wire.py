"""Peer wire format: msgpack bodies, tensors as raw little-endian bytes, HMAC-signed requests.

Every peer request carries headers with the sender's node id, a timestamp, a random nonce and
an HMAC-SHA256 over (method, path, timestamp, nonce, body) keyed with the cluster secret.
`ReplayGuard` refuses stale timestamps and nonces seen inside the window.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

HDR_NODE = "X-Edgemoe-Node"
HDR_TIME = "X-Edgemoe-Time"
HDR_NONCE = "X-Edgemoe-Nonce"
HDR_SIG = "X-Edgemoe-Signature"
PROTOCOL_VERSION = 1
MAX_PEER_BODY = 64 * 2**20  # bytes of one peer request body
REPLAY_WINDOW_S = 30.0
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None, "int64": np.int64}


class WireError(ValueError):
    """A peer message that cannot be accepted; str() is the reason sent back with the 4xx."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, *, max_size: int = MAX_PEER_BODY) -> Any:
    if len(data) > max_size:
        raise WireError(f"body of {len(data)} bytes exceeds the limit of {max_size}", 413)
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, max_bin_len=max_size, max_str_len=1 << 20
        )
    except Exception as exc:
        raise WireError(f"malformed msgpack body: {type(exc).__name__}") from None


def sign(secret: bytes, method: str, path: str, ts: str, nonce: str, body: bytes) -> str:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in (method.upper().encode(), path.encode(), ts.encode(), nonce.encode()):
        mac.update(part)
        mac.update(b"\n")
    mac.update(body)
    return mac.hexdigest()


def signed_headers(
    secret: bytes, node_id: str, method: str, path: str, body: bytes
) -> dict[str, str]:
    """Headers that authenticate one request (fresh nonce, current time)."""
    ts = f"{time.time():.3f}"
    nonce = secrets.token_hex(12)
    return {
        HDR_NODE: node_id,
        HDR_TIME: ts,
        HDR_NONCE: nonce,
        HDR_SIG: sign(secret, method, path, ts, nonce, body),
    }


class ReplayGuard:
    """Accepts each (signed) nonce once within the time window; bounded memory."""

    def __init__(
        self,
        window_s: float = REPLAY_WINDOW_S,
        max_entries: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, ts_text: str, nonce: str) -> None:
        try:
            ts = float(ts_text)
        except ValueError:
            raise WireError("timestamp is not a number", 401) from None
        now = self.clock()
        if abs(now - ts) > self.window_s:
            raise WireError(f"timestamp outside the {self.window_s:.0f}s window", 401)
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - self.window_s:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                raise WireError("replayed nonce", 401)
            if len(self._seen) >= self.max_entries:
                raise WireError("too many requests in the replay window", 429)
            self._seen[nonce] = ts


def verify(
    secret: bytes,
    guard: ReplayGuard,
    method: str,
    path: str,
    headers: Any,
    body: bytes,
) -> str:
    """Check one request's signature and freshness; return the sender's node id."""
    node, ts, nonce, sig = (headers.get(h) for h in (HDR_NODE, HDR_TIME, HDR_NONCE, HDR_SIG))
    if not (node and ts and nonce and sig):
        raise WireError("missing peer authentication headers", 401)
    if len(nonce) > 64 or len(node) > 64:
        raise WireError("malformed peer authentication headers", 401)
    expected = sign(secret, method, path, ts, nonce, body)
    if not hmac.compare_digest(expected, sig):
        raise WireError("bad HMAC signature", 401)
    guard.check(ts, nonce)
    return node


def encode_array(array: np.ndarray, dtype_name: str | None = None) -> dict[str, Any]:
    """{"dtype", "shape", "data"} with little-endian bytes."""
    arr = np.ascontiguousarray(array)
    name = dtype_name or arr.dtype.name
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"dtype": name, "shape": list(arr.shape), "data": data}


def decode_array(
    obj: Any, *, dtypes: tuple[str, ...], ndim: int, max_elements: int, name: str
) -> tuple[np.ndarray, str]:
    """Validate and decode a tensor message field; returns (array, dtype name)."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise WireError(f"{name}: expected a tensor {{dtype, shape, data}}")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in dtypes:
        raise WireError(f"{name}: dtype {dtype!r} not accepted (want {', '.join(dtypes)})")
    if (
        not isinstance(shape, list)
        or len(shape) != ndim
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise WireError(f"{name}: shape must be {ndim} non-negative integers")
    count = int(np.prod(shape)) if shape else 1
    if count > max_elements:
        raise WireError(f"{name}: {count} elements exceed the limit of {max_elements}", 413)
    if not isinstance(data, bytes):
        raise WireError(f"{name}: data must be bytes")
    if dtype == "bfloat16":
        np_dtype: Any = np.dtype("<u2")
    else:
        np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
    if len(data) != count * np_dtype.itemsize:
        raise WireError(f"{name}: {len(data)} bytes do not match shape {shape} of {dtype}")
    return np.frombuffer(data, dtype=np_dtype).reshape(shape), dtype
