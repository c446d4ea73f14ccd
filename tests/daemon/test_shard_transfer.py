"""Shard transfer through a faulty link: a cut transfer resumes with an HTTP Range request and
verifies; a corrupted byte is detected, the shard refetched, and never installed or loaded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgemoe.daemon.peers import PeerClient, PeerError
from edgemoe.daemon.store import ShardFetcher, ShardStore
from edgemoe.model.local import LocalExperts
from edgemoe.model.manifest import Manifest

from .conftest import SECRET, Node


@dataclass
class FaultyProxy:
    """TCP proxy to a daemon; the first shard response is cut halfway or has a byte flipped."""

    upstream_port: int
    mode: str  # "cut" | "flip" | "pass"
    ranges: list[str] = field(default_factory=list)
    faults: int = 0
    server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            self.ranges += [
                ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("range:")
            ]
            head = head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            up_w.write(head)
            await up_w.drain()
            resp = await up_r.read()
            up_w.close()
            is_shard = b"/v1/shards/" in lines[0].encode()
            hdr_end = resp.index(b"\r\n\r\n") + 4
            body = resp[hdr_end:]
            if is_shard and self.faults == 0 and self.mode != "pass" and len(body) > 100:
                self.faults += 1
                if self.mode == "cut":
                    resp = resp[: hdr_end + len(body) // 2]
                else:
                    pos = hdr_end + len(body) // 2
                    resp = resp[:pos] + bytes([resp[pos] ^ 0xFF]) + resp[pos + 1 :]
            writer.write(resp)
            await writer.drain()
        finally:
            writer.close()


async def _setup(solo: Node, tmp: Path, mode: str) -> tuple[FaultyProxy, PeerClient, ShardStore]:
    proxy = FaultyProxy(solo.port, mode)
    port = await proxy.start()
    client = PeerClient(f"http://127.0.0.1:{port}", "feedfeedfeedfeed", SECRET.encode(),
                        peer_id=solo.node_id)  # fmt: skip
    store = ShardStore(tmp / "store")
    store.install_manifest(await client.get_bytes("/v1/manifest"), None)
    return proxy, client, store


async def test_cut_transfer_resumes_with_range_and_verifies(solo: Node, tmp_path: Path) -> None:
    proxy, client, store = await _setup(solo, tmp_path, "cut")
    rel = Manifest.expert_path(1, 3)
    size = int(store.info(rel)["bytes"])
    try:
        with pytest.raises(PeerError, match="1 attempts"):
            await ShardFetcher(store, attempts=1).fetch(rel, [client])
        partial = store.partial_path(rel)
        assert 0 < partial.stat().st_size < size  # half arrived and was kept
        assert not (store.root / rel).exists()
        have = partial.stat().st_size
        await ShardFetcher(store, attempts=1).fetch(rel, [client])
        assert proxy.ranges[-1] == f"bytes={have}-{size - 1}"  # resumed where it was cut
        assert store.has(rel) and not partial.exists()
    finally:
        await client.close()
        await proxy.stop()


async def test_corrupted_byte_is_refetched_and_never_loaded(solo: Node, tmp_path: Path) -> None:
    proxy, client, store = await _setup(solo, tmp_path, "flip")
    rel = Manifest.expert_path(0, 5)
    try:
        with pytest.raises(PeerError, match="blake3 differs from the manifest"):
            await ShardFetcher(store, attempts=1).fetch(rel, [client])
        assert proxy.faults == 1
        assert not (store.root / rel).exists()  # nothing installed...
        assert not any(store.partial_path(rel).parent.glob("experts__L0__E5*"))  # ...or kept
        for side in store.side_files():  # config and tokenizer so LocalExperts can build
            await ShardFetcher(store).fetch(side, [client])
        local = LocalExperts(store.root)
        with pytest.raises(ValueError, match="missing"):
            local.load(0, 5)
        await ShardFetcher(store, attempts=1).fetch(rel, [client])  # refetched, now clean
        local.load(0, 5)
        assert local.holds(0, 5) and store.has(rel)
    finally:
        await client.close()
        await proxy.stop()
