"""mDNS discovery with python-zeroconf, on the configured interface addresses only.

Announces ``_edgemoe._tcp.local.`` with TXT node_id, cluster_id, fingerprint, proto, port
(never a secret) and browses for peers; a peer of another cluster or with an incompatible
model fingerprint is ignored (logged once per node). What mDNS says is not authenticated: a
peer found here becomes a member only once it proves it holds the cluster secret.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edgemoe.daemon.supervisor import Supervisor
from edgemoe.daemon.wire import PROTOCOL_VERSION

log = logging.getLogger(__name__)
SERVICE_TYPE = "_edgemoe._tcp.local."

# (node_id, url, fingerprint) of a compatible peer
OnPeer = Callable[[str, str, str], None]


class Discovery:
    """Announce this node and report compatible peers; `start()` / `stop()`."""

    def __init__(
        self,
        interfaces: list[str],
        *,
        node_id: str,
        cluster_id: str,
        host: str,
        port: int,
        fingerprint: Callable[[], str],
        on_peer: OnPeer,
        supervisor: Supervisor | None = None,
    ) -> None:
        if not interfaces:
            raise ValueError("mDNS needs at least one explicit interface address")
        self.interfaces = interfaces
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.host = host
        self.port = port
        self.fingerprint = fingerprint
        self.on_peer = on_peer
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._ignored: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.supervisor = supervisor or Supervisor()

    def _service_info(self) -> AsyncServiceInfo:
        props = {
            "node_id": self.node_id,
            "cluster_id": self.cluster_id,
            "fingerprint": self.fingerprint(),
            "proto": str(PROTOCOL_VERSION),
            "port": str(self.port),
        }
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.node_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(self.host)],
            port=self.port,
            properties=props,
            server=f"edgemoe-{self.node_id}.local.",
        )

    async def start(self) -> None:
        self._azc = AsyncZeroconf(interfaces=list(self.interfaces), ip_version=IPVersion.V4Only)
        self._info = self._service_info()
        await self._azc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(
            self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    async def update(self) -> None:
        """Re-announce (the fingerprint becomes known once a fresh node has the manifest)."""
        if self._azc is None:
            return
        self._info = self._service_info()
        await self._azc.async_update_service(self._info)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is not None:
            await self._azc.async_unregister_all_services()
            await self._azc.async_close()
        self._azc = None

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        coro = self._resolve(service_type, name)
        task = self.supervisor.spawn("mdns resolve", lambda: coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._azc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._azc.zeroconf, 3000):
            return
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        node_id = props.get("node_id", "")
        if not node_id or node_id == self.node_id:
            return
        reason = None
        mine = self.fingerprint()
        if props.get("cluster_id") != self.cluster_id:
            reason = f"cluster {props.get('cluster_id')!r}"
        elif props.get("proto") != str(PROTOCOL_VERSION):
            reason = f"protocol version {props.get('proto')!r}"
        elif mine and props.get("fingerprint") and props["fingerprint"] != mine:
            reason = f"model fingerprint {props['fingerprint'][:12]}"
        if reason is not None:
            if node_id not in self._ignored:
                self._ignored.add(node_id)
                log.info("mDNS on %s: ignoring node %s (%s)", self.node_id, node_id, reason)
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or not info.port:
            return
        self.on_peer(node_id, f"http://{addresses[0]}:{info.port}", props.get("fingerprint", ""))
