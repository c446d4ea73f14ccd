"""mDNS discovery on 127.0.0.1 with real zeroconf: a peer of the same cluster and model is
reported; another cluster id or an incompatible model fingerprint is ignored, logged once."""

from __future__ import annotations

import asyncio
import logging
import secrets

import pytest

from edgemoe.daemon.discovery import Discovery


def _node(
    cluster_id: str, fingerprint: str, port: int, found: list[tuple[str, str, str]]
) -> Discovery:
    return Discovery(
        ["127.0.0.1"], node_id=secrets.token_hex(8), cluster_id=cluster_id, host="127.0.0.1",
        port=port, fingerprint=lambda: fingerprint, on_peer=lambda *p: found.append(p),
    )  # fmt: skip


async def test_other_clusters_and_models_are_ignored_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edgemoe.daemon.discovery")
    cid = f"disc-{secrets.token_hex(4)}"
    found: list[tuple[str, str, str]] = []
    me = _node(cid, "f" * 64, 17001, found)
    friend = _node(cid, "f" * 64, 17002, [])
    stranger = _node(cid + "-other", "f" * 64, 17003, [])
    other_model = _node(cid, "e" * 64, 17004, [])
    nodes = [me, friend, stranger, other_model]
    mine = f"mDNS on {me.node_id}: ignoring"
    try:
        for node in nodes:
            await node.start()
        for _ in range(150):  # bounded: 15 s
            logged = " ".join(m for r in caplog.records if (m := r.getMessage()).startswith(mine))
            if found and stranger.node_id in logged and other_model.node_id in logged:
                break
            await asyncio.sleep(0.1)
        await stranger.update()  # a re-announcement must not be logged again
        await other_model.update()
        await asyncio.sleep(1.5)
    finally:
        for node in nodes:
            await node.stop()
    assert {f[0] for f in found} == {friend.node_id}
    assert ("http://127.0.0.1:17002", "f" * 64) in {(f[1], f[2]) for f in found}
    ignored = [r.getMessage() for r in caplog.records if r.getMessage().startswith(mine)]
    assert sum(stranger.node_id in m and "cluster" in m for m in ignored) == 1, ignored
    assert sum(other_model.node_id in m and "fingerprint" in m for m in ignored) == 1, ignored
