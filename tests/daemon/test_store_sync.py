"""A burst of fetches installs files at once and syncs them after: fsyncs wait until no fetch
is in flight (or until `sync_pending` asks for them), then each file is synced once."""

from __future__ import annotations

import shutil
from pathlib import Path

import blake3
import pytest

import edgemoe.daemon.store as store_module
from edgemoe.daemon.store import ShardStore
from edgemoe.model.manifest import Manifest

from .conftest import TinyModel


def _install(store: ShardStore, source: Path, rel: str) -> None:
    """`rel` as a fetch leaves it: its part on disk, hashed as it arrived, then installed."""
    part = store.partial_path(rel)
    part.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / rel, part)
    store.install_hashed(rel, part, part.stat().st_size,
                         blake3.blake3(part.read_bytes()).hexdigest())  # fmt: skip


def test_files_installed_during_a_burst_are_synced_once_it_ends(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(store_module, "_fsync_all", synced.extend)
    store = ShardStore(tmp_path / "node")
    store.install_manifest((tiny.shard_dir / "manifest.json").read_bytes(), None)
    first, second, third = (Manifest.expert_path(0, e) for e in range(3))

    def barrier() -> None:  # everything queued on the syncer so far has run
        store._syncer.submit(lambda: None).result()

    with store.fetching():
        with store.fetching():  # two fetches in flight
            _install(store, tiny.shard_dir, first)
        _install(store, tiny.shard_dir, second)
        barrier()
        assert synced == []  # a fetch is still in flight: nothing synced yet
    barrier()
    assert synced == [store.root / first, store.root / second]  # the last one out queued both
    assert store.has(first) and store.has(second)
    with store.fetching():
        _install(store, tiny.shard_dir, third)
        store.sync_pending()  # asked for: synced though a fetch is in flight
        assert synced[-1] == store.root / third
    barrier()
    assert len(synced) == 3  # each file once
