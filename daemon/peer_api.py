"""Peer endpoints: expert RPC, shard streaming, manifest, hello, gossip (and, registered by
the client API, a completion asked for a loading peer's client).

Every route goes through `authenticated`: the authentication headers are checked before any
of the body is read (so a stranger costs a header parse), then the body is read up to the
route's own limit while its sha256 is compared with the signed one; a sealed body is opened. Every
answer, errors included, is signed for the request's nonce (`wire.response_headers`) and
sealed when the request was. Any problem is a 4xx with a JSON reason, and nothing is written
to disk by a peer request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edgemoe.daemon.wire import (
    MAX_ROWS,
    PLAIN,
    SEAL_OVERHEAD,
    SEALED,
    STREAMED,
    BadSignature,
    BodyCheck,
    Envelope,
    WireError,
    body_digest,
    check_envelope,
    pack,
    parse_envelope,
    request_aad,
    response_aad,
    response_headers,
    unpack,
)
from edgemoe.model.errors import ModelError
from edgemoe.model.manifest import DENSE_NAME, MANIFEST_NAME, Manifest

if TYPE_CHECKING:
    from edgemoe.daemon.node import Daemon

log = logging.getLogger(__name__)
_INT = re.compile(r"\d{1,6}")
DAEMON_KEY = web.AppKey("daemon", object)
GOSSIP_LIMIT = 16 * 2**20  # full-state push-pull with every member's statistics
PER_PEER_IN_FLIGHT = 64  # requests of one authenticated peer being read or served at once
REFUSAL_LOG_INTERVAL_S = 60.0  # a refusing node logs each source at most this often


@dataclass
class Call:
    """One authenticated peer request, as the route's handler sees it."""

    sender: str
    env: Envelope
    body: bytes  # opened when it was sealed


@dataclass
class Reply:
    status: int
    payload: bytes
    content_type: str = "application/msgpack"


Handler = Callable[[web.Request, Call], Awaitable["Reply | web.StreamResponse"]]


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON_KEY]  # type: ignore[return-value]


def error(status: int, reason: str) -> web.Response:
    """A JSON error (the client API's form; peer routes sign it in `authenticated`)."""
    return web.json_response({"error": {"message": reason, "code": status}}, status=status)


def _error_reply(status: int, reason: str) -> Reply:
    body = json.dumps({"error": {"message": reason, "code": status}}).encode()
    return Reply(status, body, "application/json")


class PeerGate:
    """Per-node admission state of the peer routes: concurrency per authenticated sender, and
    rate-limited logs of refused sources (a wrong secret is said once per source and minute,
    not once per request)."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def enter(self, sender: str) -> None:
        n = self._in_flight.get(sender, 0)
        if n >= PER_PEER_IN_FLIGHT:
            raise WireError(f"more than {PER_PEER_IN_FLIGHT} requests in flight from {sender}",
                            429)  # fmt: skip
        self._in_flight[sender] = n + 1

    def leave(self, sender: str) -> None:
        n = self._in_flight.get(sender, 1) - 1
        if n <= 0:
            self._in_flight.pop(sender, None)
        else:
            self._in_flight[sender] = n

    def refused(self, source: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(source, -REFUSAL_LOG_INTERVAL_S) < REFUSAL_LOG_INTERVAL_S:
            return
        if len(self._logged) > 4096:
            self._logged.clear()
        self._logged[source] = now
        log.warning("refusing peer requests from %s: %s", source, reason)


Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authenticated(handler: Handler, limit: Callable[[Daemon], int], *,
                  any_dest: bool = False) -> Route:  # fmt: skip
    """Authenticate, read and open the body, call `handler`, sign (and seal) its answer."""

    async def route(request: web.Request) -> web.StreamResponse:
        d = _daemon(request)
        nonce, seal, sender = "", PLAIN, ""
        try:
            env = parse_envelope(request.headers)
            nonce = env.nonce
            try:
                check_envelope(d.keys, d.replay, d.node_id, request.method, request.path_qs, env,
                               any_dest=any_dest)  # fmt: skip
            except BadSignature as exc:
                d.peer_gate.refused(f"{request.remote} (node {env.sender})", str(exc))
                d.metrics.peer_refused.labels(reason="signature").inc()
                raise
            seal, sender = env.seal, env.sender
            d.peer_gate.enter(sender)
        except WireError as exc:
            if not isinstance(exc, BadSignature):
                d.metrics.peer_refused.labels(reason="envelope").inc()
            return _signed(d, nonce, seal, _error_reply(exc.status, str(exc)))
        try:
            body = await _read_body(request, env, limit(d))
            if env.seal == SEALED:
                aad = request_aad(request.method, request.path_qs, env.dest, sender, nonce)
                body = d.keys.open(body, aad)
            d.note_authenticated(sender)
            answer = await handler(request, Call(sender, env, body))
        except WireError as exc:
            answer = _error_reply(exc.status, str(exc))
        finally:
            d.peer_gate.leave(sender)
        if isinstance(answer, Reply):
            return _signed(d, nonce, seal, answer)
        answer.headers.update(
            response_headers(d.keys, d.node_id, nonce, answer.status, STREAMED, PLAIN)
        )
        return answer

    return route


async def _read_body(request: web.Request, env: Envelope, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise WireError(f"body of {request.content_length} bytes exceeds this route's limit of "
                        f"{limit}", 413)  # fmt: skip
    check = BodyCheck(env, limit)
    if request.can_read_body:
        try:
            async for chunk in request.content.iter_chunked(1 << 16):
                check.feed(chunk)
        except ConnectionResetError:
            # a sender killed mid-request: one line, not aiohttp's traceback per connection
            log.info("peer %s at %s hung up mid-body", env.sender, request.remote)
            raise WireError("connection lost mid-body", 400) from None
    return check.finish()


def _signed(d: Daemon, nonce: str, seal: str, reply: Reply) -> web.Response:
    payload = reply.payload
    if seal == SEALED and nonce:
        payload = d.keys.seal(payload, response_aad(d.node_id, nonce, reply.status))
    resp = web.Response(status=reply.status, body=payload, content_type=reply.content_type)
    resp.headers.update(
        response_headers(d.keys, d.node_id, nonce, reply.status, body_digest(payload), seal)
    )
    return resp


# ---- limits per route -------------------------------------------------------------------------


def _forward_limit(d: Daemon) -> int:
    """Hidden rows at 4 bytes, ids at 8 and weights at 4 for up to 64 experts a row, framing."""
    m = d.store.manifest
    if m is None:
        return 4096
    return MAX_ROWS * (m.hidden_size * 4 + 64 * 12) + 4096 + SEAL_OVERHEAD


def _no_body(d: Daemon) -> int:
    return 0


def _gossip_limit(d: Daemon) -> int:
    return GOSSIP_LIMIT


# ---- handlers -------------------------------------------------------------------------------


def _msgpack(obj: Any) -> Reply:
    return Reply(200, pack(obj))


async def _forward(request: web.Request, call: Call) -> Reply:
    d = _daemon(request)
    service, manifest = d.expert_service, d.store.manifest
    if service is None or manifest is None:
        raise WireError("this node is still starting", 503)
    # loaded with torch, after the port is up (node.load_libraries); here by now
    from edgemoe.daemon.rpc import parse_forward, tensor_to_wire

    req = parse_forward(
        unpack(call.body),
        num_layers=manifest.num_layers,
        num_experts=manifest.num_experts,
        hidden_size=manifest.hidden_size,
        dtype=manifest.dtype,
    )
    try:
        out = await service.forward(req)
    except ModelError as exc:
        raise WireError(str(exc), 409) from None
    d.metrics.rpc_served.inc()
    return _msgpack({"out": tensor_to_wire(out)})


async def _serve_file(request: web.Request, rel: str) -> web.StreamResponse:
    """The file by sendfile; its bytes are authenticated by the fetcher against the signed
    manifest's sha256 (the response signature binds the nonce, not the bytes)."""
    d = _daemon(request)
    if d.store.manifest is None:
        raise WireError("this node has no manifest yet", 503)
    if rel not in d.store.manifest.files:
        raise WireError("no such file in the manifest", 404)
    if not await d.store.verified(rel):  # a changed file is hashed off the event loop
        raise WireError(f"{rel} is not on this node's disk", 404)
    size = int(d.store.manifest.files[rel]["bytes"])
    try:
        start, stop, _ = request.http_range.indices(size)
    except ValueError:  # a malformed Range header: FileResponse answers it with a 416
        start, stop = 0, 0
    kind = "dense" if rel == DENSE_NAME else "expert" if rel.startswith("experts/") else "other"
    d.metrics.shards_served_bytes.labels(kind=kind).inc(max(0, stop - start))
    return web.FileResponse(d.store.path(rel), chunk_size=1 << 20)


async def shard(request: web.Request, call: Call) -> web.StreamResponse:
    layer, expert = request.match_info["layer"], request.match_info["expert"]
    if not (_INT.fullmatch(layer) and _INT.fullmatch(expert)):
        raise WireError("layer and expert must be decimal integers")
    return await _serve_file(request, Manifest.expert_path(int(layer), int(expert)))


async def dense(request: web.Request, call: Call) -> web.StreamResponse:
    return await _serve_file(request, DENSE_NAME)


async def side_file(request: web.Request, call: Call) -> web.StreamResponse:
    name = request.match_info["name"]
    if name == DENSE_NAME or "/" in name or name.startswith("."):
        raise WireError("only top-level side files of the manifest are served here")
    return await _serve_file(request, name)


async def manifest(request: web.Request, call: Call) -> Reply:
    """The manifest's bytes, signed whole: a fetching node trusts shard hashes only from it."""
    d = _daemon(request)
    if d.store.manifest is None:
        raise WireError("this node has no manifest yet", 503)
    raw = await asyncio.to_thread((d.store.root / MANIFEST_NAME).read_bytes)
    return Reply(200, raw, "application/json")


async def hello(request: web.Request, call: Call) -> Reply:
    """Who this node is (used to learn a seed peer's id; the only route open to any
    destination, since a seed's id is not known before)."""
    return _msgpack(_daemon(request).hello())


async def gossip(request: web.Request, call: Call) -> Reply:
    reply = await _daemon(request).on_gossip(call.sender, unpack(call.body))
    return _msgpack(reply)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/experts/forward", authenticated(_forward, _forward_limit))
    app.router.add_get("/v1/shards/{layer}/{expert}", authenticated(shard, _no_body))
    app.router.add_get("/v1/dense", authenticated(dense, _no_body))
    app.router.add_get("/v1/files/{name}", authenticated(side_file, _no_body))
    app.router.add_get("/v1/manifest", authenticated(manifest, _no_body))
    app.router.add_get("/v1/hello", authenticated(hello, _no_body, any_dest=True))
    app.router.add_post("/v1/gossip", authenticated(gossip, _gossip_limit))
