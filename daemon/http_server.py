"""The node's listening socket, guarded against slow and idle connections (slowloris).

aiohttp waits for a request head as long as a connection keeps sending bytes. Here every
connection is wrapped in `_Guarded`, which gives each request head `HEAD_TIMEOUT_S` from its
first byte (or from the connection's start) and drops the connection if the head is not complete
by then; connections that have not yet completed a first request count as unproven, and when
more than `MAX_UNPROVEN` are open the oldest is dropped, so a flood of them can never crowd out a
client that sends its request at once. Idle keep-alive connections close after `KEEPALIVE_S`.
Every listener, plain or TLS, is guarded; drops are counted per reason (`on_drop`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web

# Seconds a client has to send a complete request head (and a TLS handshake); a real client
# sends one in milliseconds, a slowloris holds a connection open by never finishing it.
HEAD_TIMEOUT_S = 10.0
# Connections open without a first complete request; past this the oldest of them is dropped.
MAX_UNPROVEN = 64
# Seconds an idle keep-alive connection is kept: longer than the peer client's pool keeps
# idle connections (aiohttp's 15 s), so the client, not the server, closes them and a
# request never races the server's close.
KEEPALIVE_S = 30.0


class _Guarded(asyncio.Protocol):
    """Forwards to aiohttp's request handler; closes the connection on a slow head."""

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)
        self.guard.opened(self)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._timer is None and self._awaiting_head():  # bytes of a head, not of a body
            self._arm()
        self.inner.data_received(data)
        if self.heads() > 0:
            self.guard.proven(self)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.closed(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def heads(self) -> int:
        """Request heads the handler has parsed on this connection."""
        return int(getattr(self.inner, "_request_count", 0))

    def _awaiting_head(self) -> bool:
        """The handler is idle, waiting for the next request (aiohttp's own keep-alive check)."""
        waiter = getattr(self.inner, "_waiter", None)
        return waiter is not None and not waiter.done()

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _arm(self) -> None:
        heads = self.heads()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HEAD_TIMEOUT_S, self._expire, heads)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, heads: int) -> None:
        self._timer = None
        if self.heads() == heads and (heads == 0 or self._awaiting_head()):  # head incomplete
            self.guard.dropped("slow_head")
            self.drop()


class ConnectionGuard:
    """The node's open connections that have not completed a first request, oldest first."""

    def __init__(self, on_drop: Callable[[str], None] | None = None) -> None:
        self._unproven: OrderedDict[_Guarded, None] = OrderedDict()
        self.on_drop = on_drop  # told each drop's reason: "slow_head" or "unproven_cap"

    def dropped(self, reason: str) -> None:
        if self.on_drop is not None:
            self.on_drop(reason)

    def opened(self, conn: _Guarded) -> None:
        self._unproven[conn] = None
        while len(self._unproven) > MAX_UNPROVEN:
            oldest, _ = self._unproven.popitem(last=False)
            self.dropped("unproven_cap")
            oldest.drop()

    def proven(self, conn: _Guarded) -> None:
        self._unproven.pop(conn, None)

    def closed(self, conn: _Guarded) -> None:
        self._unproven.pop(conn, None)


class GuardedSite(web.TCPSite):
    """`web.TCPSite` whose connections go through a `ConnectionGuard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        guard: ConnectionGuard | None = None,
    ) -> None:
        super().__init__(runner, host, port)
        self.tls = tls  # HTTPS for clients that start TLS; plain HTTP stays (see daemon.tls)
        self.guard = guard or ConnectionGuard()

    async def start(self) -> None:
        from edgemoe.daemon.tls import Sniffing

        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        tls, guard = self.tls, self.guard
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Sniffing(server(), guard, tls) if tls else _Guarded(server(), guard),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
