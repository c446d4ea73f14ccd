"""Shard files on disk: verified by size and digest, installed atomically, fetched resumably.

The store's root is a shard directory (the layout of `edgemoe shard`): the node's own
``--model-dir`` when it has one, else ``STATE_DIR/model`` filled from peers. A fetch writes
into ``.partial/`` and resumes from what is there with an HTTP Range request; only a file whose
size and digest (BLAKE3, or sha256 for older manifests: `manifest.FileCheck`) match the
manifest is renamed into place, so a corrupt or cut transfer is never loaded. A whole-file
fetch hashes the bytes on the loop as they arrive (a resumed one hashes the part already on
disk first), writes each chunk at once while it is in the cache (on a worker thread, a MiB at
a time, once a write has stalled), and renames the file into place: nothing is read back. A
file fetched in segments from several peers is hashed once whole (its segments are read back,
in order) before the rename.
Either way its one fsync runs on a syncer thread once no fetch is in flight, off the
transfers' path; the directory is not synced. A file torn or a rename lost in a crash only
means the file is fetched again: the store trusts nothing across restarts without hashing it,
and holding an expert means holding it in memory, not on disk.

A verified file is remembered with its size, mtime and inode; a file whose stat differs from
that (rewritten, truncated, extended, replaced) is hashed again before it is served or used,
off the event loop (`verified`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgemoe.daemon.peers import PeerClient, PeerError
from edgemoe.model.manifest import DENSE_NAME, MANIFEST_NAME, FileCheck, Manifest, hash_into

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_RECV_SIZE = 1 << 20  # socket reads while a file streams (`_large_reads`)
# A received chunk is hashed and written at once, on the loop, while it is still in the CPU's
# cache. Measured on the shard streaming benchmark (20 files, 33 MB a round, 2 vCPUs): the
# same bytes written by a worker a MiB later cost 20 ms of CPU a round (cache misses and the
# thread hand-off) against 10 ms written at once, as a plain copy writes them. A page-cache
# write that stalls (dirty-page throttling) would stall the loop, so one that takes longer
# than _STALL_S sends the fetcher's writes to a worker, _WRITE_BATCH bytes per writev, for
# _OFFLOAD_S: a slow disk costs the loop one stalled write, then no more.
_STALL_S = 0.02
_OFFLOAD_S = 30.0
_WRITE_BATCH = 1 << 20
_IOV_MAX = 1024  # buffers one writev takes (Linux)
# the last bytes of an offloaded file, when no batch is in the worker, are written on the loop
# up to this (a thread hop and its wake-up cost more than they do)
_INLINE_WRITE = 256 << 10
# A file fetched from several peers at once is cut into segments of at least this many bytes.
_MIN_SEGMENT = 1 << 16
_PARTIAL = ".partial"
_EXPERT_RE = re.compile(r"experts/L(\d+)/E(\d+)\.safetensors")


class CorruptShard(Exception):
    """A fetched file's size or digest differs from the manifest."""


class ShardStore:
    """The node's shard directory; all paths come from the manifest (no path from the network)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest: Manifest | None = None
        # rel -> (size, mtime_ns, inode) of the file when its digest last matched
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._failed: dict[str, tuple[int, int, int]] = {}  # same, of a file that did not match
        # pending fsyncs finish before the interpreter exits (concurrent.futures joins it)
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
        # installed files whose fsync waits for the end of the burst of fetches (`fetching`)
        self._unsynced: list[Path] = []
        self._fetches = 0
        self._sync_lock = threading.Lock()
        if (root / MANIFEST_NAME).is_file():
            self.manifest = Manifest.load(root)

    # ---- what is here -------------------------------------------------------------------
    def side_files(self) -> list[str]:
        """Non-expert files of the manifest (dense part, config, tokenizer)."""
        assert self.manifest is not None
        return sorted(r for r in self.manifest.files if not _EXPERT_RE.fullmatch(r))

    def info(self, rel: str) -> dict[str, Any]:
        if self.manifest is None or rel not in self.manifest.files:
            raise KeyError(rel)
        return self.manifest.files[rel]

    def path(self, rel: str) -> Path:
        self.info(rel)
        return self.root / rel

    def has(self, rel: str) -> bool:
        """True when the file is present with the manifest's size and digest (hashed again
        only when its stat changed since it last verified)."""
        try:
            info, path = self.info(rel), self.root / rel
            st = path.stat()
        except (KeyError, OSError):
            self._verified.pop(rel, None)
            return False
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        if self._verified.get(rel) == stamp:
            return True
        if self._verified.pop(rel, None) is not None:
            log.warning("%s changed on disk since it was verified; checking it again", path)
        if self._failed.get(rel) == stamp or not path.is_file():
            return False
        check = FileCheck.of(info)
        if st.st_size != info["bytes"] or not check.file_matches(path):
            log.warning("%s: size or %s differs from the manifest; will refetch", path, check.name)
            self._failed[rel] = stamp
            return False
        self._verified[rel] = stamp
        return True

    def known_good(self, rel: str) -> bool:
        """True when the file verified before and its stat has not changed since: one stat,
        never a hash (safe on the event loop)."""
        stamp = self._verified.get(rel)
        if stamp is None:
            return False
        try:
            st = (self.root / rel).stat()
        except OSError:
            return False
        return stamp == (st.st_size, st.st_mtime_ns, st.st_ino)

    async def verified(self, rel: str) -> bool:
        """`has` for the event loop: a changed or new file is hashed on a worker thread (an
        absent one costs a stat here)."""
        if self.known_good(rel):
            return True
        if rel not in (self.manifest.files if self.manifest else ()):
            return False
        if not (self.root / rel).exists():
            self._verified.pop(rel, None)
            return False
        return await asyncio.to_thread(self.has, rel)

    def damaged(self, rels: list[str]) -> list[str]:
        """Those of `rels` (files that verified before) that no longer do: cheap while
        unchanged (one stat each); a changed file is hashed."""
        return [rel for rel in rels if not self.has(rel)]

    def has_expert(self, layer: int, expert: int) -> bool:
        return self.has(Manifest.expert_path(layer, expert))

    def ready(self) -> bool:
        """Manifest, dense part and side files present: the model can be loaded."""
        return self.manifest is not None and all(self.has(r) for r in self.side_files())

    def experts_on_disk(self) -> set[tuple[int, int]]:
        if self.manifest is None:
            return set()
        found = set()
        for rel in self.manifest.files:
            m = _EXPERT_RE.fullmatch(rel)
            if m and (self.root / rel).is_file():
                found.add((int(m.group(1)), int(m.group(2))))
        return found

    def forget(self, rel: str) -> None:
        self._verified.pop(rel, None)

    # ---- installing -----------------------------------------------------------------------
    def install_manifest(self, raw: bytes, expect_fingerprint: str | None) -> Manifest:
        """Check and write a manifest received from a peer."""
        try:
            data = json.loads(raw)
            manifest = Manifest(**data)
        except (ValueError, TypeError) as exc:
            raise CorruptShard(f"manifest from peer is malformed: {exc}") from None
        if expect_fingerprint and manifest.fingerprint != expect_fingerprint:
            raise CorruptShard("manifest fingerprint differs from the one the peer announced")
        for rel in manifest.files:
            if rel.startswith(("/", ".")) or ".." in Path(rel).parts:
                raise CorruptShard(f"manifest names an unsafe path {rel!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        manifest.save(self.root)
        self.manifest = manifest
        return manifest

    def partial_path(self, rel: str, segment: int = 0) -> Path:
        return self.root / _PARTIAL / f"{rel.replace('/', '__')}.{segment}"

    def remove_stale_parts(self, rel: str, keep: Sequence[Path]) -> None:
        """Make `.partial/` if needed and remove `rel`'s parts other than `keep` (left by an
        attempt cut into another number of segments): one listing, no glob."""
        folder = self.root / _PARTIAL
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            folder.mkdir(parents=True, exist_ok=True)
            return
        prefix, kept = f"{rel.replace('/', '__')}.", {p.name for p in keep}
        for name in names:
            if name.startswith(prefix) and name not in kept:
                (folder / name).unlink(missing_ok=True)

    def install_from(self, rel: str, parts: Sequence[Path]) -> None:
        """Verify the concatenation of `parts`; move it into place (renamed, then synced on the
        syncer thread like `install_hashed`)."""
        info = self.info(rel)
        # one part is verified and renamed in place; several are concatenated into a new file
        source = self.root / _PARTIAL / f"{rel.replace('/', '__')}.assembled"
        if len(parts) == 1:
            source = parts[0]
        check = FileCheck.of(info)
        digest = check.hasher()
        size = 0
        with source.open("rb+" if len(parts) == 1 else "wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        if len(parts) > 1:
                            out.write(chunk)
        if size != info["bytes"] or not check.matches(digest.hexdigest()):
            for p in {source, *parts}:
                p.unlink(missing_ok=True)
            raise CorruptShard(f"{rel}: size {size} or {check.name} differs from the manifest")
        self._rename(rel, source)
        for p in parts:
            p.unlink(missing_ok=True)

    def install_hashed(self, rel: str, part: Path, size: int, hexdigest: str) -> None:
        """Install a part whose bytes were hashed while they arrived: compared with the
        manifest and renamed into place (nothing read back); its one fsync runs after, on
        the syncer thread, off the fetch's path (the bytes are served from the page cache
        meanwhile, and a file torn by a crash before it fails the hash every start does)."""
        info = self.info(rel)
        check = FileCheck.of(info)
        if size != info["bytes"] or not check.matches(hexdigest):
            part.unlink(missing_ok=True)
            raise CorruptShard(f"{rel}: size {size} or {check.name} differs from the manifest")
        self._rename(rel, part)

    def sync_pending(self) -> None:
        """Block until every installed file is synced (those waiting for the burst to end
        too; the syncer runs them in order)."""
        self._queue_syncs(force=True)
        self._syncer.submit(lambda: None).result()

    @contextlib.contextmanager
    def fetching(self) -> Iterator[None]:
        """While any fetch is inside, installed files wait for their fsync; the last one out
        queues them on the syncer. The disk's writeback of a burst then runs after the burst,
        not against its transfers (measured on the shard streaming benchmark: ~7 ms of a 60 ms
        round of 20 files). Nothing depends on the fsync: a torn file fails its hash."""
        with self._sync_lock:
            self._fetches += 1
        try:
            yield
        finally:
            with self._sync_lock:
                self._fetches -= 1
            self._queue_syncs()

    def _queue_syncs(self, *, force: bool = False) -> None:
        with self._sync_lock:
            if self._fetches and not force:
                return
            paths, self._unsynced = self._unsynced, []
        if paths:  # one job for the burst: a submit costs ~0.1 ms of the loop's time
            self._syncer.submit(_fsync_all, paths)

    def _rename(self, rel: str, source: Path) -> None:
        """A verified file into place, remembered as verified; its fsync queued on the syncer
        (after the burst of fetches, see `fetching`)."""
        target = self.root / rel
        try:
            os.replace(source, target)
        except FileNotFoundError:  # its directory is new
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        st = target.stat()
        self._verified[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._sync_lock:
            self._unsynced.append(target)
        self._queue_syncs()


def _fsync_all(paths: list[Path]) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # replaced or removed since: nothing of ours to sync
            continue
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("%s: fsync failed (%s); a restart hashes it again", path, exc)
        finally:
            os.close(fd)


def _write(fd: int, chunks: list[bytes]) -> None:
    """All of `chunks`, in order, with as few writev calls as the kernel allows."""
    views = [memoryview(c) for c in chunks]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])  # may write less than asked
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


class _DiskStalls:
    """When a fetch's writes may run on the loop: until one stalls (see `_STALL_S`)."""

    def __init__(self) -> None:
        self.offload_until = 0.0

    def inline(self) -> bool:
        return time.monotonic() >= self.offload_until

    def took(self, seconds: float) -> None:
        if seconds > _STALL_S:
            log.info("a shard write took %.0f ms; writing on a worker for %.0f s",
                     seconds * 1e3, _OFFLOAD_S)  # fmt: skip
            self.offload_until = time.monotonic() + _OFFLOAD_S


class _Writer:
    """Hashes a file's received bytes on the loop as they arrive (BLAKE3: ~0.15 ms a MiB) and
    writes each chunk at once while it is in the cache; while `stalls` says the disk is slow,
    chunks go to a worker thread instead, `_WRITE_BATCH` at a time, one batch in the worker at
    a time, so the bytes reach the file in order. Measured on this 2-vCPU box, hashing on a
    worker cost more CPU than it hid (its hash competes with the loop for the same core)."""

    def __init__(self, fd: int, digest: Any, stalls: _DiskStalls) -> None:
        self.fd = fd
        self.digest = digest
        self.stalls = stalls
        self.held: list[bytes] = []  # received, not yet handed to the worker
        self.size = 0
        self.written = 0  # bytes handed to the file so far
        self.pending: asyncio.Future[None] | None = None

    async def add(self, chunk: bytes) -> None:
        if self.digest is not None:
            self.digest.update(chunk)
        if self.pending is not None and self.pending.done():
            pending, self.pending = self.pending, None
            pending.result()  # a failed batch fails the transfer
        if not self.held and self.pending is None and self.stalls.inline():
            t0 = time.perf_counter()
            _write(self.fd, [chunk])
            self.stalls.took(time.perf_counter() - t0)
            self.written += len(chunk)
            return
        self.held.append(chunk)
        self.size += len(chunk)
        if self.size >= _WRITE_BATCH:
            await self._hand_off()

    async def _hand_off(self) -> None:
        if self.pending is not None:
            await self.pending
        loop = asyncio.get_running_loop()
        self.pending = loop.run_in_executor(None, _write, self.fd, self.held)
        self.written += self.size
        self.held, self.size = [], 0

    async def finish(self) -> None:
        """Every byte received so far written; a small remainder here on the loop."""
        if self.held and self.pending is None and self.size <= _INLINE_WRITE:
            _write(self.fd, self.held)
            self.written += self.size
            self.held, self.size = [], 0
        elif self.held:
            await self._hand_off()
        if self.pending is not None:
            pending, self.pending = self.pending, None
            await pending


@contextlib.contextmanager
def _large_reads(resp: Any) -> Iterator[None]:
    """The response's socket read up to `_RECV_SIZE` at a time while a file streams. asyncio's
    selector transport reads 256 KiB a call, and each read is a turn of the loop and a step of
    the fetch's task; on loopback, where the fetch's loop is the bottleneck, 1 MiB reads took
    ~10% off a round of the streaming benchmark. `max_size` is that transport's attribute
    (another loop's transport lacks it: left alone); it is put back before the connection
    returns to the pool, where expert calls read small messages."""
    transport = resp.connection.transport if resp.connection is not None else None
    old = getattr(transport, "max_size", None)
    if not isinstance(old, int):
        yield
        return
    transport.max_size = max(old, _RECV_SIZE)
    try:
        yield
    finally:
        transport.max_size = old


def url_path(rel: str) -> str:
    """The peer endpoint serving a manifest file."""
    m = _EXPERT_RE.fullmatch(rel)
    if m:
        return f"/v1/shards/{m.group(1)}/{m.group(2)}"
    if rel == DENSE_NAME:
        return "/v1/dense"
    return f"/v1/files/{rel}"


class ShardFetcher:
    """Pulls manifest files from peers into a `ShardStore`, resuming and verifying."""

    def __init__(
        self,
        store: ShardStore,
        *,
        on_bytes: Callable[[int], None] | None = None,
        attempts: int = 3,
    ) -> None:
        self.store = store
        self.on_bytes = on_bytes or (lambda n: None)
        self.attempts = attempts
        self._locks: dict[str, asyncio.Lock] = {}
        self._stalls = _DiskStalls()

    async def fetch(self, rel: str, sources: Sequence[PeerClient], *, split: bool = False) -> None:
        """Make `rel` present and verified, from `sources` (several at once when `split`)."""
        if not sources:
            raise PeerError(f"{rel}: no peer to fetch it from")
        lock = self._locks.setdefault(rel, asyncio.Lock())
        async with lock:
            with self.store.fetching():  # its install syncs once the burst ends
                if await self.store.verified(rel):
                    return
                last: Exception | None = None
                for attempt in range(self.attempts):
                    order = list(sources[attempt % len(sources) :]) + list(
                        sources[: attempt % len(sources)]
                    )
                    try:
                        await self._fetch_once(rel, order, split=split)
                        return
                    except CorruptShard as exc:
                        log.warning("%s: %s; fetching again", rel, exc)
                        last = exc
                    except PeerError as exc:
                        log.info("%s: transfer failed (%s); will resume", rel, exc)
                        last = exc
                raise PeerError(f"{rel}: could not fetch after {self.attempts} attempts: {last}")

    async def _fetch_once(self, rel: str, sources: Sequence[PeerClient], *, split: bool) -> None:
        size = int(self.store.info(rel)["bytes"])
        n = max(1, min(len(sources), size // _MIN_SEGMENT)) if split else 1
        bounds = [(size * i // n, size * (i + 1) // n) for i in range(n)]
        parts = [self.store.partial_path(rel, i) for i in range(n)]
        self.store.remove_stale_parts(rel, parts)

        digests: list[Any] = [None] * n

        async def segment(i: int) -> None:
            errors: list[str] = []
            for k in range(len(sources)):
                peer = sources[(i + k) % len(sources)]
                try:
                    digests[i] = await self._fetch_range(peer, rel, parts[i], *bounds[i],
                                                         whole=n == 1)  # fmt: skip
                    return
                except PeerError as exc:
                    errors.append(str(exc))
            raise PeerError("; ".join(errors))

        if n == 1:  # no task of its own: one less hop through the loop per file
            await segment(0)
        else:
            await asyncio.gather(*(segment(i) for i in range(n)))
        if digests[0] is not None:  # one segment: hashed as it arrived, nothing read back
            # a compare and a rename: no thread hop (its fsync runs on the syncer)
            self.store.install_hashed(rel, parts[0], size, digests[0].hexdigest())
        else:
            await asyncio.to_thread(self.store.install_from, rel, parts)

    async def _fetch_range(self, peer: PeerClient, rel: str, part: Path, lo: int, hi: int, *,
                           whole: bool = False) -> Any:  # fmt: skip
        """Bytes lo..hi-1 of `rel` into `part`, resuming what it holds. With `whole` (the part
        is the whole file) returns its digest (`FileCheck`), fed as the bytes arrived (those
        already on disk first); else None."""
        try:
            have = os.stat(part).st_size
        except FileNotFoundError:
            have = 0
        if have > hi - lo:
            part.unlink()
            have = 0
        digest = FileCheck.of(self.store.info(rel)).hasher() if whole else None
        if digest is not None and have:
            await asyncio.to_thread(hash_into, digest, part)
        if have == hi - lo:
            return digest
        async with peer.stream(url_path(rel), start=lo + have, end=hi - 1) as resp:
            if resp.status == 200 and lo + have != 0:
                raise PeerError(f"{peer.url}: ignored the Range request")
            fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            writer = _Writer(fd, digest, self._stalls)
            try:
                with _large_reads(resp):
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        self.on_bytes(len(chunk))
                        await writer.add(chunk)
            except Exception as exc:
                raise PeerError(f"{peer.url}: transfer of {rel} cut: {exc!r}") from None
            finally:
                await writer.finish()  # what arrived is kept for the resume
                os.close(fd)
            # no fsync here: the install syncs after the rename, and a part torn by a crash
            # fails the digest check and is fetched again
        got = have + writer.written
        if got != hi - lo:
            raise PeerError(f"{peer.url}: {rel} ended after {got} of {hi - lo} bytes")
        return digest
