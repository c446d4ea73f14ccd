"""Outgoing peer HTTP: one pooled aiohttp session per peer; every request signed for its
destination, every answer refused unless it is signed by that peer for our request's nonce.
Bodies of POSTs (expert forward, gossip: users' hidden states and statistics) are sealed."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from edgemoe.daemon.wire import (
    HDR_NONCE,
    PLAIN,
    SEALED,
    UnauthenticatedResponse,
    check_body,
    check_response,
    keys_for,
    pack,
    request_aad,
    request_headers,
    response_aad,
    unpack,
)

log = logging.getLogger(__name__)
REFUSED_LOG_FIRST_S = 10.0  # "the secret differs" is repeated after this, then twice as late
REFUSED_LOG_MAX_S = 600.0


class PeerError(Exception):
    """A peer could not be reached or answered with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ExpertsUnavailable(Exception):
    """A layer's experts could not be computed in time: every holder failed or did not
    answer, and their shards could not be fetched here. A peer's failure, not ours."""


class _RefusalLog:
    """Says once, then with a doubling pause, that a peer refuses our signature."""

    def __init__(self) -> None:
        self._next = 0.0
        self._pause = REFUSED_LOG_FIRST_S

    def note(self, who: str) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        log.warning("peer %s refuses our signature: the cluster secret differs", who)
        self._next = now + self._pause
        self._pause = min(self._pause * 2, REFUSED_LOG_MAX_S)


class PeerClient:
    """Talks to one peer at ``url`` (node id `peer_id`, "" while unknown: only /v1/hello may
    then be asked); keeps its connections pooled until `close()`. `seal=False` is for the
    RPC benchmark's comparison only."""

    def __init__(
        self,
        url: str,
        node_id: str,
        secret: bytes,
        *,
        peer_id: str = "",
        timeout_s: float = 30.0,
        seal: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.node_id = node_id
        self.peer_id = peer_id
        self._keys = keys_for(secret)
        self._seal = SEALED if seal else PLAIN
        self._refusals = _RefusalLog()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=16, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=3.0, sock_read=timeout_s),
        )

    async def close(self) -> None:
        await self._session.close()

    def _who(self) -> str:
        return f"{self.peer_id or '?'} at {self.url}"

    def _check(self, path: str, nonce: str, resp: aiohttp.ClientResponse, *,
               streamed: bool = False) -> tuple[str, str]:  # fmt: skip
        """(seal, digest) of an authenticated answer; a refusal of our own signature is
        diagnosed (the peer's answer to it cannot be authenticated: its key differs)."""
        try:
            responder, seal, digest = check_response(
                self._keys, self.peer_id, nonce, resp.status, resp.headers, streamed=streamed
            )
        except UnauthenticatedResponse as exc:
            if resp.status == 401:
                self._refusals.note(self._who())
                raise PeerError(f"{self.url}{path}: refused our signature (the cluster secret "
                                "differs)", 401) from None  # fmt: skip
            raise PeerError(f"{self.url}{path}: {exc}", 502) from None
        if not self.peer_id:
            self.peer_id = responder
        return seal, digest

    def _open(self, path: str, nonce: str, status: int, seal: str, digest: str,
              data: bytes) -> bytes:  # fmt: skip
        try:
            check_body(digest, data)
            if seal == SEALED:
                return self._keys.open(data, response_aad(self.peer_id, nonce, status))
        except UnauthenticatedResponse as exc:
            raise PeerError(f"{self.url}{path}: {exc}", 502) from None
        except ValueError as exc:
            raise PeerError(f"{self.url}{path}: {exc}", 502) from None
        return data

    async def post(self, path: str, obj: Any, *, timeout_s: float | None = None) -> Any:
        """POST a msgpack body (sealed); return the decoded msgpack answer."""
        plain = pack(obj)
        body = plain
        nonce = secrets.token_hex(12)
        if self._seal == SEALED:
            # the nonce of the headers is bound into the sealed body's associated data
            aad = request_aad("POST", path, self.peer_id, self.node_id, nonce)
            body = self._keys.seal(plain, aad)
        headers = request_headers(self._keys, self.node_id, self.peer_id, "POST", path, body,
                                  seal=self._seal, nonce=nonce)  # fmt: skip
        headers["Content-Type"] = "application/msgpack"
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        try:
            async with self._session.post(
                self.url + path, data=body, headers=headers, timeout=timeout
            ) as resp:
                data = await resp.read()
                seal, digest = self._check(path, nonce, resp)
                if seal != self._seal:
                    raise PeerError(f"{self.url}{path}: answer sealed as {seal!r}", 502)
                data = self._open(path, nonce, resp.status, seal, digest, data)
                if resp.status != 200:
                    reason = data[:200].decode(errors="replace")
                    raise PeerError(f"{self.url}{path}: HTTP {resp.status}: {reason}", resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None
        return unpack(data)

    async def get_bytes(self, path: str, *, timeout_s: float = 30.0) -> bytes:
        """A signed GET whose whole answer is covered by the peer's signature."""
        headers = request_headers(self._keys, self.node_id, self.peer_id, "GET", path, b"")
        nonce = headers[HDR_NONCE]
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._session.get(self.url + path, headers=headers, timeout=timeout) as resp:
                data = await resp.read()
                seal, digest = self._check(path, nonce, resp)
                data = self._open(path, nonce, resp.status, seal, digest, data)
                if resp.status != 200:
                    reason = data[:200].decode(errors="replace")
                    raise PeerError(f"{self.url}{path}: HTTP {resp.status}: {reason}", resp.status)
                return data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None

    async def hello(self, *, timeout_s: float = 5.0) -> dict[str, Any]:
        """The peer's own description, signed by it; learns its node id when unknown."""
        known = self.peer_id
        info = unpack(await self.get_bytes("/v1/hello", timeout_s=timeout_s))
        if not isinstance(info, dict) or info.get("node_id") != self.peer_id:
            self.peer_id = known
            raise PeerError(f"{self.url}/v1/hello: answer names another node", 502)
        return info

    @asynccontextmanager
    async def stream(
        self,
        path: str,
        *,
        start: int | None = None,
        end: int | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A signed GET of a file (its bytes are checked against the manifest by the caller);
        with `start`/`end` (inclusive) asks for that byte range."""
        headers = request_headers(self._keys, self.node_id, self.peer_id, "GET", path, b"")
        nonce = headers[HDR_NONCE]
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        try:
            async with self._session.get(self.url + path, headers=headers, timeout=timeout) as resp:
                if resp.status not in (200, 206):
                    data = await resp.read()
                    seal, digest = self._check(path, nonce, resp)
                    data = self._open(path, nonce, resp.status, seal, digest, data)
                    text = data[:200].decode(errors="replace")
                    raise PeerError(f"{self.url}{path}: HTTP {resp.status}: {text}", resp.status)
                self._check(path, nonce, resp, streamed=True)
                yield resp
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None
