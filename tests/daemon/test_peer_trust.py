"""What a stranger without the cluster secret can do to a node: make it read bodies, replay
envelopes to another node, answer for a peer, read users' data. The envelope functions alone,
then against real daemons."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import threading
import time
from pathlib import Path

import msgpack
import pytest
from aiohttp import web

from edgemoe.daemon.peers import PeerClient, PeerError
from edgemoe.daemon.supervisor import Supervisor
from edgemoe.daemon.wire import (
    HDR_NONCE,
    HDR_TIME,
    REPLAY_WINDOW_S,
    SEALED,
    Envelope,
    ReplayGuard,
    UnauthenticatedResponse,
    WireError,
    body_digest,
    check_envelope,
    check_response,
    keys_for,
    pack,
    parse_envelope,
    request_aad,
    request_headers,
    response_headers,
)

from .conftest import SECRET, Node, TinyModel, make_node, wait_for

A, B, C = "a" * 16, "b" * 16, "c" * 16
KEYS = keys_for(SECRET.encode())


# ---- the envelope alone ------------------------------------------------------------------


def test_an_envelope_for_one_node_is_refused_by_another() -> None:
    headers = request_headers(KEYS, C, A, "GET", "/v1/hello", b"")
    env = parse_envelope(headers)
    with pytest.raises(WireError) as info:
        check_envelope(KEYS, ReplayGuard(), B, "GET", "/v1/hello", env, any_dest=True)
    assert info.value.status == 421
    check_envelope(KEYS, ReplayGuard(), A, "GET", "/v1/hello", env)  # its own destination


def _forged(ts: str) -> dict[str, str]:
    """Headers signed with the right key around a timestamp of the sender's choosing."""
    env = Envelope(C, A, ts, "0" * 24, "none", body_digest(b""), "")
    headers = request_headers(KEYS, C, A, "GET", "/v1/hello", b"", nonce="0" * 24)
    headers[HDR_TIME] = ts
    headers["X-Edgemoe-Signature"] = KEYS.sign(*env.signed_text("GET", "/v1/hello"))
    return headers


@pytest.mark.parametrize("ts", ["nan", "NaN", "inf", "-inf", "1e999", "-1", "0x10", " 5"])
def test_non_finite_or_odd_timestamps_are_refused(ts: str) -> None:
    with pytest.raises(WireError) as info:
        check_envelope(KEYS, ReplayGuard(), A, "GET", "/v1/hello", parse_envelope(_forged(ts)))
    assert info.value.status == 401
    with pytest.raises(WireError):
        ReplayGuard().check(ts, "1" * 24)


def test_replay_cache_evicts_by_arrival_whatever_the_timestamps_say() -> None:
    now = [1000.0]
    guard = ReplayGuard(max_entries=4, clock=lambda: now[0])
    for i in range(4):  # timestamps anywhere inside the window, oldest not first
        guard.check(f"{now[0] + REPLAY_WINDOW_S - 1 - i:.3f}", f"{i:024d}")
    with pytest.raises(WireError) as info:
        guard.check(f"{now[0]:.3f}", "9" * 24)
    assert info.value.status == 429  # full inside the window
    now[0] += 2 * REPLAY_WINDOW_S + 1
    guard.check(f"{now[0]:.3f}", "8" * 24)  # the old ones were evicted
    with pytest.raises(WireError, match="replayed"):
        guard.check(f"{now[0]:.3f}", "8" * 24)


def test_a_response_counts_only_when_signed_by_the_peer_for_our_nonce() -> None:
    body = b"answer"
    good = response_headers(KEYS, A, "1" * 24, 200, body_digest(body), "none")
    assert check_response(KEYS, A, "1" * 24, 200, good)[0] == A
    cases = {
        "other nonce": (KEYS, A, "2" * 24, 200, good),
        "other status": (KEYS, A, "1" * 24, 206, good),
        "other responder": (KEYS, B, "1" * 24, 200, good),
        "other secret": (keys_for(b"x" * 32), A, "1" * 24, 200, good),
        "unsigned": (KEYS, A, "1" * 24, 200, {}),
    }
    for name, args in cases.items():
        with pytest.raises(UnauthenticatedResponse):
            check_response(*args)
            pytest.fail(name)
    streamed = response_headers(KEYS, A, "1" * 24, 200, "-", "none")
    with pytest.raises(UnauthenticatedResponse, match="not covered"):
        check_response(KEYS, A, "1" * 24, 200, streamed)  # only a file may be streamed


def test_a_sealed_body_opens_only_for_its_request_and_key() -> None:
    aad = request_aad("POST", "/v1/experts/forward", A, C, "1" * 24)
    blob = KEYS.seal(b"hidden states of a user", aad)
    assert b"hidden states" not in blob
    assert KEYS.open(blob, aad) == b"hidden states of a user"
    for other in (request_aad("POST", "/v1/experts/forward", B, C, "1" * 24),
                  request_aad("POST", "/v1/gossip", A, C, "1" * 24)):  # fmt: skip
        with pytest.raises(WireError):
            KEYS.open(blob, other)
    with pytest.raises(WireError):
        keys_for(b"y" * 32).open(blob, aad)


async def test_a_failing_task_is_logged_counted_and_restarted() -> None:
    failures: list[str] = []
    runs = [0]

    async def loop() -> None:
        runs[0] += 1
        if runs[0] <= 2:
            raise RuntimeError(f"boom {runs[0]}")
        await asyncio.sleep(3600)

    sup = Supervisor(failures.append)
    sup.spawn("loop", loop, restart=True)
    for _ in range(100):
        if runs[0] >= 3:
            break
        await asyncio.sleep(0.1)
    assert runs[0] == 3 and failures == ["loop", "loop"]
    state = sup.failed()["loop"]
    assert state["failures"] == 2 and "boom 2" in state["last_error"] and state["running"]
    await sup.stop()


# ---- against a real daemon ---------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _send_body(port: int, path: str, headers: dict[str, str], size: int, sent: list[int]) -> None:
    """Stream a `size`-byte POST body until the node stops reading it (bounded in time)."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    chunk = b"\x00" * (1 << 20)
    deadline = time.monotonic() + 30
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head.encode())
        n = 0
        try:
            while n < size and time.monotonic() < deadline:
                s.sendall(chunk)
                n += len(chunk)
        except OSError:
            pass
        sent.append(n)


def test_unauthenticated_bodies_are_never_read(solo: Node) -> None:
    """8 connections each sending 60 MB without the secret (half with no headers, half with
    well-formed forged ones) leave the node's memory where it was."""
    assert solo.proc is not None
    size = 60 * 2**20
    forged = request_headers(keys_for(b"not the secret, no"), C, solo.node_id, "POST",
                             "/v1/experts/forward", b"x")  # fmt: skip
    before = _rss_kb(solo.proc.pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kb(solo.proc.pid))  # type: ignore[union-attr]
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    sent: list[int] = []
    senders = [
        threading.Thread(target=_send_body, args=(solo.port, path, hdrs, size, sent))
        for i in range(8)
        for path, hdrs in [(("/v1/experts/forward", "/v1/gossip")[i % 2], (forged, {})[i // 4])]
    ]
    for t in senders:
        t.start()
    for t in senders:
        t.join(60)
    done.set()
    sampler.join()
    growth_mb = (peak[0] - before) / 1024
    print(f"\nRSS growth under 8 x 60 MB unauthenticated bodies: {growth_mb:.1f} MB "
          f"(before {before / 1024:.0f} MB, sent {sum(sent) / 2**20:.0f} MB)")  # fmt: skip
    assert growth_mb < 20, growth_mb
    status, body = solo.request("GET", "/v1/models")
    assert status == 200, body  # still serving


def test_a_peer_that_hangs_up_mid_body_costs_one_line_not_a_traceback(solo: Node) -> None:
    """A signed POST whose sender dies halfway through its body (kill -9 mid-request, as the
    chaos runs do) is refused quietly: no aiohttp traceback per lost connection in the log."""
    body = b"\x00" * (1 << 20)
    headers = request_headers(KEYS, C, solo.node_id, "POST", "/v1/gossip", body, seal=SEALED)
    tracebacks = solo.log_path.read_text(errors="replace").count("Traceback")
    head = f"POST /v1/gossip HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", solo.port), timeout=5) as s:
        s.sendall(head.encode() + body[: len(body) // 2])
        time.sleep(0.3)  # the node is reading the body when the sender goes
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    wait_for(lambda: "mid-body" in solo.log_path.read_text(errors="replace"), 10,
             "the lost connection to be logged")  # fmt: skip
    assert solo.log_path.read_text(errors="replace").count("Traceback") == tracebacks
    status, _ = solo.request("GET", "/v1/models")
    assert status == 200  # still serving


def _raw_peer(node: Node, path: str, headers: dict[str, str]) -> tuple[int, object]:
    return node.request("GET", path, token=None, headers=headers)


def test_a_daemon_refuses_envelopes_for_another_node_and_odd_timestamps(solo: Node) -> None:
    to_other = request_headers(KEYS, C, A, "GET", "/v1/manifest", b"")
    status, body = _raw_peer(solo, "/v1/manifest", to_other)
    assert status == 421, body
    for ts in ("nan", "inf", "1e999"):
        env = Envelope(C, solo.node_id, ts, "3" * 24, "none", body_digest(b""), "")
        headers = request_headers(KEYS, C, solo.node_id, "GET", "/v1/hello", b"")
        headers.update({HDR_TIME: ts, HDR_NONCE: env.nonce,
                        "X-Edgemoe-Signature": KEYS.sign(*env.signed_text("GET", "/v1/hello"))})
        status, body = _raw_peer(solo, "/v1/hello", headers)
        assert status == 401, (ts, body)
    ok = request_headers(KEYS, C, solo.node_id, "GET", "/v1/hello", b"")
    status, body = _raw_peer(solo, "/v1/hello", ok)
    assert status == 200 and msgpack.unpackb(body)["node_id"] == solo.node_id
    health = solo.request("GET", "/healthz", token=None)[1]
    assert health["tasks"] == {"failed": {}}, health


class Rogue:
    """A process without the secret answering every peer route with a real model's files."""

    NODE = "0badc0de0badc0de"

    def __init__(self, shard_dir: Path, cluster_id: str) -> None:
        self.shard_dir = shard_dir
        self.cluster_id = cluster_id
        self.hits: list[str] = []
        self.keys = keys_for(b"a guessed secret, not the real one")
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        path = request.path
        if path == "/v1/hello":
            body = pack({"node_id": self.NODE, "cluster_id": self.cluster_id,
                         "url": f"http://127.0.0.1:{self.port}", "fingerprint": "",
                         "ready": True})  # fmt: skip
        elif path == "/v1/manifest":
            body = (self.shard_dir / "manifest.json").read_bytes()
        elif path == "/v1/dense":
            body = (self.shard_dir / "dense.safetensors").read_bytes()
        elif path.startswith("/v1/files/"):
            body = (self.shard_dir / path.removeprefix("/v1/files/")).read_bytes()
        else:
            body = b""
        resp = web.Response(body=body)
        nonce = request.headers.get(HDR_NONCE, "")
        resp.headers.update(response_headers(self.keys, self.NODE, nonce, 200,
                                             hashlib.sha256(body).hexdigest(), "none"))
        return resp

    def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        runner = web.AppRunner(app)
        self._thread.start()

        async def go() -> int:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        self.port = asyncio.run_coroutine_threadsafe(go(), self._loop).result(10)
        self._runner = runner

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_a_rogue_without_the_secret_cannot_feed_a_fresh_node(
    tiny: TinyModel, tmp_path: Path
) -> None:
    cid = "rogue-test"
    rogue = Rogue(tiny.shard_dir, cid)
    rogue.start()
    fresh = make_node(tmp_path, "fresh", shard_dir=None, cluster_id=cid, capacity="100%",
                      extra=["--seed-peer", f"127.0.0.1:{rogue.port}"], mdns=False)  # fmt: skip
    fresh.start()
    try:
        wait_for(lambda: "/v1/hello" in rogue.hits and "not authenticated" in fresh.log(), 60,
                 "the fresh node to ask the rogue and refuse it")  # fmt: skip
        time.sleep(3.0)  # it keeps asking: still nothing accepted, still said once
        status, health = fresh.request("GET", "/healthz", token=None)
        assert status == 200 and health["ready"] is False, health
        assert rogue.hits and set(rogue.hits) == {"/v1/hello"}, rogue.hits
        assert not (fresh.state_dir / "model" / "manifest.json").exists()
        assert fresh.log().count("not authenticated") == 1, fresh.log()
        # asked directly, whether its id is known or not, every answer of the rogue is refused
        assert asyncio.run(_ask_rogue(rogue.port, Rogue.NODE)) == [502] * 5
        assert asyncio.run(_ask_rogue(rogue.port, "")) == [502] * 5
    finally:
        fresh.stop()
        rogue.stop()


async def _ask_rogue(port: int, peer_id: str) -> list[int | None]:
    client = PeerClient(f"http://127.0.0.1:{port}", C, SECRET.encode(), peer_id=peer_id)
    statuses: list[int | None] = []
    try:
        for path in ("/v1/manifest", "/v1/files/config.json"):
            with pytest.raises(PeerError) as info:
                await client.get_bytes(path)
            statuses.append(info.value.status)
        for path in ("/v1/dense", "/v1/shards/0/0"):
            with pytest.raises(PeerError) as info:
                async with client.stream(path):
                    pass
            statuses.append(info.value.status)
        with pytest.raises(PeerError) as info:
            await client.hello()
        statuses.append(info.value.status)
    finally:
        await client.close()
    return statuses
