"""Peer endpoints (HMAC-authenticated): expert RPC, shard streaming, manifest, gossip.

Each handler checks the signature first, then bounds and validates everything it reads;
any problem is a 4xx with a JSON reason, and nothing is written to disk by a peer request.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from aiohttp import web

from edgemoe.daemon.rpc import parse_forward, tensor_to_wire
from edgemoe.daemon.wire import MAX_PEER_BODY, WireError, pack, unpack, verify
from edgemoe.model.errors import ModelError
from edgemoe.model.manifest import MANIFEST_NAME, Manifest
from edgemoe.model.shard import DENSE_NAME

if TYPE_CHECKING:
    from edgemoe.daemon.node import Daemon

_INT = re.compile(r"\d{1,6}")
DAEMON_KEY = web.AppKey("daemon", object)


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON_KEY]  # type: ignore[return-value]


def error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": {"message": reason, "code": status}}, status=status)


async def authenticate(request: web.Request) -> tuple[str, bytes]:
    """(sender node id, body) of a correctly signed, fresh peer request, else WireError."""
    d = _daemon(request)
    if request.content_length is not None and request.content_length > MAX_PEER_BODY:
        raise WireError(f"body of {request.content_length} bytes exceeds {MAX_PEER_BODY}", 413)
    body = await request.read() if request.can_read_body else b""
    sender = verify(d.secret, d.replay, request.method, request.path_qs, request.headers, body)
    return sender, body


async def _forward(request: web.Request) -> web.StreamResponse:
    d = _daemon(request)
    try:
        _, body = await authenticate(request)
        service, manifest = d.expert_service, d.store.manifest
        if service is None or manifest is None:
            raise WireError("this node is still starting", 503)
        req = parse_forward(
            unpack(body),
            num_layers=manifest.num_layers,
            num_experts=manifest.num_experts,
            hidden_size=manifest.hidden_size,
            dtype=manifest.dtype,
        )
        try:
            out = await service.forward(req)
        except ModelError as exc:
            raise WireError(str(exc), 409) from None
    except WireError as exc:
        return error(exc.status, str(exc))
    d.metrics.rpc_served.inc()
    return web.Response(body=pack({"out": tensor_to_wire(out)}), content_type="application/msgpack")


async def _serve_file(request: web.Request, rel: str) -> web.StreamResponse:
    d = _daemon(request)
    try:
        await authenticate(request)
    except WireError as exc:
        return error(exc.status, str(exc))
    if d.store.manifest is None:
        return error(503, "this node has no manifest yet")
    if rel not in d.store.manifest.files:
        return error(404, "no such file in the manifest")
    if not d.store.has(rel):
        return error(404, f"{rel} is not on this node's disk")
    size = int(d.store.manifest.files[rel]["bytes"])
    try:
        start, stop, _ = request.http_range.indices(size)
    except ValueError:  # a malformed Range header: FileResponse answers it with a 416
        start, stop = 0, 0
    kind = "dense" if rel == DENSE_NAME else "expert" if rel.startswith("experts/") else "other"
    d.metrics.shards_served_bytes.labels(kind=kind).inc(max(0, stop - start))
    return web.FileResponse(d.store.path(rel), chunk_size=1 << 18)


async def shard(request: web.Request) -> web.StreamResponse:
    layer, expert = request.match_info["layer"], request.match_info["expert"]
    if not (_INT.fullmatch(layer) and _INT.fullmatch(expert)):
        try:
            await authenticate(request)
        except WireError as exc:
            return error(exc.status, str(exc))
        return error(400, "layer and expert must be decimal integers")
    return await _serve_file(request, Manifest.expert_path(int(layer), int(expert)))


async def dense(request: web.Request) -> web.StreamResponse:
    return await _serve_file(request, DENSE_NAME)


async def side_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name == DENSE_NAME or "/" in name or name.startswith("."):
        try:
            await authenticate(request)
        except WireError as exc:
            return error(exc.status, str(exc))
        return error(400, "only top-level side files of the manifest are served here")
    return await _serve_file(request, name)


async def manifest(request: web.Request) -> web.StreamResponse:
    d = _daemon(request)
    try:
        await authenticate(request)
    except WireError as exc:
        return error(exc.status, str(exc))
    if d.store.manifest is None:
        return error(503, "this node has no manifest yet")
    return web.FileResponse(d.store.root / MANIFEST_NAME)


async def hello(request: web.Request) -> web.StreamResponse:
    """Who this node is (used to learn a seed peer's id)."""
    d = _daemon(request)
    try:
        await authenticate(request)
    except WireError as exc:
        return error(exc.status, str(exc))
    return web.Response(body=pack(d.hello()), content_type="application/msgpack")


async def gossip(request: web.Request) -> web.StreamResponse:
    d = _daemon(request)
    try:
        sender, body = await authenticate(request)
        message = unpack(body)
        reply = await d.on_gossip(sender, message)
    except WireError as exc:
        return error(exc.status, str(exc))
    return web.Response(body=pack(reply), content_type="application/msgpack")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/experts/forward", _forward)
    app.router.add_get("/v1/shards/{layer}/{expert}", shard)
    app.router.add_get("/v1/dense", dense)
    app.router.add_get("/v1/files/{name}", side_file)
    app.router.add_get("/v1/manifest", manifest)
    app.router.add_get("/v1/hello", hello)
    app.router.add_post("/v1/gossip", gossip)
