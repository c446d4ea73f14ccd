"""Outgoing peer HTTP: one pooled aiohttp session per peer, every request HMAC-signed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from edgemoe.daemon.wire import pack, signed_headers, unpack


class PeerError(Exception):
    """A peer could not be reached or answered with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PeerClient:
    """Talks to one peer at ``url``; keeps its connections pooled until `close()`."""

    def __init__(self, url: str, node_id: str, secret: bytes, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.node_id = node_id
        self._secret = secret
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=16, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=3.0, sock_read=timeout_s),
        )

    async def close(self) -> None:
        await self._session.close()

    def _headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return signed_headers(self._secret, self.node_id, method, path, body)

    async def post(self, path: str, obj: Any, *, timeout_s: float | None = None) -> Any:
        """POST a msgpack body; return the decoded msgpack answer."""
        body = pack(obj)
        headers = self._headers("POST", path, body)
        headers["Content-Type"] = "application/msgpack"
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        try:
            async with self._session.post(
                self.url + path, data=body, headers=headers, timeout=timeout
            ) as resp:
                data = await resp.read()
                if resp.status != 200:
                    reason = data[:200].decode(errors="replace")
                    raise PeerError(f"{self.url}{path}: HTTP {resp.status}: {reason}", resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None
        return unpack(data)

    async def get_bytes(self, path: str, *, timeout_s: float = 30.0) -> bytes:
        async with self.stream(path, timeout_s=timeout_s) as resp:
            try:
                return await resp.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise PeerError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None

    @asynccontextmanager
    async def stream(
        self,
        path: str,
        *,
        start: int | None = None,
        end: int | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A signed GET; with `start`/`end` (inclusive) asks for that byte range."""
        headers = self._headers("GET", path, b"")
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        try:
            async with self._session.get(self.url + path, headers=headers, timeout=timeout) as resp:
                if resp.status not in (200, 206):
                    text = (await resp.read())[:200].decode(errors="replace")
                    raise PeerError(f"{self.url}{path}: HTTP {resp.status}: {text}", resp.status)
                yield resp
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None
