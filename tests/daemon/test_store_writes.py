"""A fetch writes each received chunk at once, on the loop; a write that stalls (the page cache
full, the kernel throttling the writer) sends the store's later writes to a worker thread, in
order, so a slow disk cannot hold the event loop more than once."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import blake3
import pytest

import edgemoe.daemon.store as store_module
from edgemoe.daemon.store import _DiskStalls, _Writer

CHUNKS = [os.urandom(300_000 + i) for i in range(8)]  # 2.4 MB, each chunk a different length


async def _write_file(path: Path, stalls: _DiskStalls) -> _Writer:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    writer = _Writer(fd, blake3.blake3(), stalls)
    try:
        for chunk in CHUNKS:
            await writer.add(chunk)
    finally:
        await writer.finish()
        os.close(fd)
    return writer


def _record_threads(monkeypatch: pytest.MonkeyPatch, stall_first_s: float) -> list[int]:
    """The thread of each write call; the first one sleeps `stall_first_s` (a stalled disk)."""
    threads: list[int] = []
    write = store_module._write
    stall = [stall_first_s]

    def recorded(fd: int, chunks: list[bytes]) -> None:
        threads.append(threading.get_ident())
        time.sleep(stall.pop() if stall else 0.0)
        write(fd, chunks)

    monkeypatch.setattr(store_module, "_write", recorded)
    return threads


def _check(path: Path, writer: _Writer) -> None:
    whole = b"".join(CHUNKS)
    assert path.read_bytes() == whole  # every byte, in order
    assert writer.written == len(whole)
    assert writer.digest.hexdigest() == blake3.blake3(whole).hexdigest()


async def test_chunks_are_written_on_the_loop_as_they_arrive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = _record_threads(monkeypatch, 0.0)
    stalls = _DiskStalls()
    writer = await _write_file(tmp_path / "f", stalls)
    _check(tmp_path / "f", writer)
    assert threads == [threading.get_ident()] * len(CHUNKS)  # one write per chunk, no hop
    assert stalls.inline()


async def test_a_stalled_write_sends_later_writes_to_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = _record_threads(monkeypatch, store_module._STALL_S * 3)
    stalls = _DiskStalls()
    loop_thread = threading.get_ident()
    writer = await _write_file(tmp_path / "first", stalls)
    _check(tmp_path / "first", writer)
    assert threads[0] == loop_thread  # the write that stalled the loop, once
    assert threads[1:] and loop_thread not in threads[1:]  # the rest of the file on a worker
    assert len(threads) < len(CHUNKS)  # in batches, not one hop per chunk
    assert not stalls.inline()

    # the store's next file goes to the worker from its first chunk, for _OFFLOAD_S
    del threads[:]
    writer = await _write_file(tmp_path / "second", stalls)
    _check(tmp_path / "second", writer)
    assert threads and loop_thread not in threads

    stalls.offload_until = time.monotonic()  # the offload period is over: on the loop again
    del threads[:]
    writer = await _write_file(tmp_path / "third", stalls)
    _check(tmp_path / "third", writer)
    assert threads == [loop_thread] * len(CHUNKS)


async def test_a_streaming_response_reads_its_socket_a_mib_at_a_time_then_puts_it_back() -> None:
    """asyncio's own socket transport (not a fake: the attribute is CPython's) reads up to
    `_RECV_SIZE` while a file streams and goes back to the pool with its default; a transport
    without the attribute (another event loop's) is left alone."""
    import asyncio
    from types import SimpleNamespace

    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    try:
        default = transport.max_size  # type: ignore[attr-defined]
        resp = SimpleNamespace(connection=SimpleNamespace(transport=transport))
        with store_module._large_reads(resp):
            assert transport.max_size == store_module._RECV_SIZE > default  # type: ignore[attr-defined]
        assert transport.max_size == default  # type: ignore[attr-defined]
        with pytest.raises(OSError), store_module._large_reads(resp):
            raise OSError("cut")  # a cut transfer puts it back too
        assert transport.max_size == default  # type: ignore[attr-defined]
        for other in (SimpleNamespace(connection=None),
                      SimpleNamespace(connection=SimpleNamespace(transport=object()))):  # fmt: skip
            with store_module._large_reads(other):
                pass
    finally:
        transport.close()
        server.close()
        await server.wait_closed()
