"""Optional HTTPS for the client API on the node's one port (`tls_cert`, `tls_key`).

Peers keep speaking plain HTTP to the same port: their requests are signed with the cluster
secret and their user data encrypted by the peer layer, so they need no certificate, and a
cluster needs no CA of its own. The first byte of a connection decides: a TLS handshake record
(0x16) starts TLS, anything else is plain HTTP (no HTTP method starts with that byte). Over plain
HTTP, the client routes then serve loopback clients only (client_api), so a remote client's
token and prompts only ever travel encrypted.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from pathlib import Path

from edgemoe.daemon.http_server import HEAD_TIMEOUT_S, _Guarded
from edgemoe.daemon.startup import StartupError

_HANDSHAKE = 0x16  # TLS record type of a ClientHello


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The HTTPS context of the client API, or StartupError naming the file that is wrong."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"tls_cert {cert} / tls_key {key}: cannot load: {exc}") from None
    return ctx


class Sniffing(_Guarded):
    """A `_Guarded` connection that becomes TLS when its first byte is a handshake record."""

    def __init__(self, inner: object, guard: object, tls: ssl.SSLContext) -> None:
        super().__init__(inner, guard)  # type: ignore[arg-type]
        self.tls = tls
        self._decided = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.guard.opened(self)
        self._arm()  # the first byte is due within the head timeout too

    def data_received(self, data: bytes) -> None:
        if not self._decided:
            self._decided = True
            if data[0] == _HANDSHAKE:
                self._start_tls(data)
                return
            self.inner.connection_made(self.transport)
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._decided:  # closed before its first byte: aiohttp never saw it
            self._disarm()
            self.guard.closed(self)
            return
        super().connection_lost(exc)

    def _start_tls(self, first: bytes) -> None:
        """Hand the socket to an SSL protocol (fed the bytes already read) whose application
        side is a plain `_Guarded` around aiohttp's handler."""
        self._disarm()
        self.guard.closed(self)  # the handshake has its own timeout; then the app side counts
        app = _Guarded(self.inner, self.guard)
        loop = asyncio.get_running_loop()
        proto = sslproto.SSLProtocol(loop, app, self.tls, None, server_side=True,
                                     ssl_handshake_timeout=HEAD_TIMEOUT_S)  # fmt: skip
        transport = self.transport
        assert transport is not None
        transport.set_protocol(proto)
        proto.connection_made(transport)
        view = memoryview(first)
        while view:
            buf = proto.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            proto.buffer_updated(n)
            view = view[n:]
