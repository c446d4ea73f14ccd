"""`Daemon`: one edgemoe node, wiring the store, discovery, peers, cluster driver, expert RPC,
inference engine and the HTTP API together. Lifecycle: ``async with Daemon(config):`` or
``await start()`` / ``await stop()``.

The port opens before torch, transformers and the model's code are imported (seconds of CPU,
three times that on a busy box): they load on a thread while the node finds its peers, and
until the model is in memory a ready peer answers this node's clients (`delegation.py`). So
this module and those it imports at the top stay free of torch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edgemoe.daemon import client_api, diagnosis, peer_api
from edgemoe.daemon.cluster_driver import HANDOVER_TIMEOUT_S, ClusterDriver
from edgemoe.daemon.config import DaemonConfig, dirs_to_create, torch_threads
from edgemoe.daemon.delegation import Delegation
from edgemoe.daemon.discovery import Discovery
from edgemoe.daemon.http_server import KEEPALIVE_S, ConnectionGuard, GuardedSite
from edgemoe.daemon.identity import load_or_create_node_id
from edgemoe.daemon.metrics import DaemonMetrics
from edgemoe.daemon.peers import PeerClient, PeerError
from edgemoe.daemon.standby import Epoch, Standby, epoch_of, ranked
from edgemoe.daemon.startup import StartupError, check_exposure, claim_dir
from edgemoe.daemon.store import CorruptShard, ShardFetcher, ShardStore
from edgemoe.daemon.supervisor import Supervisor
from edgemoe.daemon.tls import server_context
from edgemoe.daemon.wire import MAX_PEER_BODY, ReplayGuard, keys_for
from edgemoe.model.generation import GenerationParams, GenerationResult
from edgemoe.model.manifest import DENSE_NAME, Manifest
from edgemoe.stats.recorder import ActivationRecorder

if TYPE_CHECKING:
    from edgemoe.daemon.engine import InferenceEngine
    from edgemoe.daemon.remote import LocalShareTap, Router
    from edgemoe.daemon.rpc import ExpertService
    from edgemoe.model.local import LocalExperts

log = logging.getLogger(__name__)
SEED_WAIT_S = 3.0
VERIFY_PEER_FIRST_S = 1.0  # pause before asking an unauthenticated peer again; doubles
VERIFY_PEER_MAX_S = 30.0
# Seconds between checks of the shards this node holds against what verified (one stat per
# file while nothing changed): a file damaged on disk is fetched again within about this long.
SHARD_CHECK_S = 5.0


@dataclass
class Peer:
    node_id: str
    url: str
    fingerprint: str
    client: PeerClient
    # proved it holds the cluster secret (signed answer or request); only such a peer is a
    # member, a source of model files or a placement target
    trusted: bool = False


def load_libraries(threads: int) -> None:
    """Import what computing needs (torch, transformers, the engine and expert modules; the
    model family's own module loads with the model) and size torch's thread pool."""
    import torch

    import edgemoe.daemon.engine
    import edgemoe.daemon.per_expert
    import edgemoe.daemon.remote
    import edgemoe.daemon.replay
    import edgemoe.daemon.rpc  # noqa: F401

    torch.set_num_threads(threads)


def resolve_device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Daemon:
    """One node; see the module docstring."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        check_exposure(config)
        self.tls = (
            server_context(config.tls_cert, config.tls_key)
            if config.tls_cert and config.tls_key
            else None
        )
        created = dirs_to_create(config)
        self._claims = [claim_dir(config.state_dir, "state dir")]
        try:
            self._claims.append(claim_dir(store_root(config), "model dir"))
            self.node_id = load_or_create_node_id(config.state_dir)
        except (OSError, ValueError) as exc:
            self.release_dirs()
            raise StartupError(str(exc)) from None
        except StartupError:
            self.release_dirs()
            raise
        if created:  # said once the start can work: a refused start is its one error line
            log.info("created %s", ", ".join(map(str, created)))
        self.secret = config.secret.encode()
        self.replay = ReplayGuard()
        self.keys = keys_for(self.secret)
        self.peer_gate = peer_api.PeerGate()
        self.metrics = DaemonMetrics()
        self.supervisor = Supervisor(self._task_failed)
        self.device = config.device  # "auto" resolved once torch is loaded
        self.store = ShardStore(store_root(config))
        self.fetcher = ShardFetcher(self.store, on_bytes=self._fetched)
        self.bytes_fetched = 0
        # A node started with the whole model decides the first epoch (the genesis acceptor);
        # nodes that fetch the model learn epochs from their peers.
        self.seeded = self.store.ready()
        self.peers: dict[str, Peer] = {}
        self.delegation = Delegation()  # who answers our clients while we load
        self.started = int(time.time())
        self.url = config.url
        self.local: LocalExperts | None = None
        self.router: Router | None = None
        self.engine: InferenceEngine | None = None
        self.expert_service: ExpertService | None = None
        self.recorder: ActivationRecorder | None = None
        self.tap: LocalShareTap | None = None
        self.cluster: ClusterDriver | None = None
        self.standby: Standby | None = None
        self._epoch_cache: Epoch | None = None
        self.discovery: Discovery | None = None
        self.ready = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._peer_event = asyncio.Event()
        self._stopping = False
        self._closed = False  # stopping, past the leave: peers get 503 until the port closes
        self._seed_tasks: list[asyncio.Task[Any]] = []
        self._ignored: set[str] = set()
        # Why the node does not serve yet ("" once it does); "failed: ..." ends the process
        # (`failed` is set; main exits with EXIT_CANNOT_START).
        self.phase = "starting"
        self.failed = asyncio.Event()

    # ---- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_PEER_BODY + 1024)
        app[peer_api.DAEMON_KEY] = self
        peer_api.add_routes(app)
        client_api.add_routes(app)
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=2.0, keepalive_timeout=KEEPALIVE_S
        )
        await self._runner.setup()
        host, port = self.config.host, self.config.port
        guard = ConnectionGuard(lambda why: self.metrics.connections_dropped.labels(why).inc())
        await GuardedSite(self._runner, host, port, tls=self.tls, guard=guard).start()
        log.info("node %s listening on %s (store %s)", self.node_id, self.url, self.store.root)
        if self.config.interface:
            host = self.url.split("//", 1)[1].rsplit(":", 1)[0]
            self.discovery = Discovery(
                list(self.config.interface), node_id=self.node_id,
                cluster_id=self.config.cluster_id, host=host, port=self.config.port,
                fingerprint=self.fingerprint, on_peer=self.add_peer, supervisor=self.supervisor,
            )  # fmt: skip
            await self.discovery.start()
        self._seed_tasks = [
            self._spawn(self._contact_seed(f"http://{host}:{port}"), f"seed {host}:{port}")
            for host, port in self.config.seed_peer
        ]
        self._spawn(self._bootstrap_or_fail(), "bootstrap")
        self._spawn(lambda: diagnosis.log_warnings(self), "operator warnings", restart=True)

    async def stop(self) -> None:
        """Leave gracefully (announce, hand duties over), then close everything."""
        if self._stopping:
            return
        self._stopping = True
        if self.cluster is not None:
            try:
                await asyncio.wait_for(self.cluster.leave(), timeout=HANDOVER_TIMEOUT_S + 2.0)
            except (TimeoutError, PeerError) as exc:
                log.warning("graceful leave incomplete: %s", str(exc) or "timed out")
        # Stop answering before the cluster state closes: a peer must meet a closed port
        # (and fail over at once), never a node that answers from a closed database.
        self._closed = True
        if self._runner is not None:
            await self._runner.cleanup()
        if self.cluster is not None:
            await self.cluster.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in self.peers.values():
            await peer.client.close()
        if self.expert_service is not None:
            await asyncio.to_thread(self.expert_service.stop)
        if self.engine is not None:
            self.engine.close()
        self.release_dirs()

    def release_dirs(self) -> None:
        for claim in self._claims:
            claim.release()

    def _spawn(self, coro: Any, name: str = "background", *, restart: bool = False
               ) -> asyncio.Task[Any]:  # fmt: skip
        """Run a task under the supervisor: `coro` is a coroutine (run once) or, with
        `restart`, a function making one (run again after a failure)."""
        factory = coro if callable(coro) else (lambda: coro)
        task = self.supervisor.spawn(name, factory, restart=restart)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _task_failed(self, name: str) -> None:
        self.metrics.task_failures.labels(task=name).inc()

    # ---- identity and peers -----------------------------------------------------------------
    def _fetched(self, n: int) -> None:
        self.bytes_fetched += n
        self.metrics.migration_bytes.inc(n)

    def fingerprint(self) -> str:
        return self.store.manifest.fingerprint if self.store.manifest else ""

    @property
    def model_id(self) -> str:
        m = self.store.manifest
        return f"{m.architecture}-{m.fingerprint[:12]}" if m else "edgemoe"

    def hello(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "cluster_id": self.config.cluster_id,
            "url": self.url,
            "fingerprint": self.fingerprint(),
            "ready": self.engine is not None,
            "time": time.time(),  # its clock, for `edgemoe doctor`'s skew check
        }

    def add_peer(self, node_id: str, url: str, fingerprint: str = "", *, trusted: bool = False
                 ) -> Peer | None:  # fmt: skip
        """A peer found by mDNS, a seed or gossip; (re)creates its pooled client. A peer not
        `trusted` (mDNS says anything) is asked to prove the secret before it counts."""
        if node_id == self.node_id or self._stopping:
            return None
        mine = self.fingerprint()
        if mine and fingerprint and fingerprint != mine:
            if node_id not in self._ignored:
                self._ignored.add(node_id)
                log.warning("ignoring node %s at %s: model fingerprint %s differs from ours",
                            node_id, url, fingerprint[:12])  # fmt: skip
            return None
        peer = self.peers.get(node_id)
        if peer is not None and peer.url == url:
            if fingerprint and not peer.fingerprint:
                peer.fingerprint = fingerprint
            if trusted and not peer.trusted:
                self._trust(peer)
            return peer
        if peer is not None:
            self._spawn(peer.client.close(), "close peer client")
            trusted = trusted or peer.trusted
        client = PeerClient(url, self.node_id, self.secret, peer_id=node_id)
        peer = Peer(node_id, url, fingerprint, client)
        self.peers[node_id] = peer
        log.info("peer %s at %s", node_id, url)
        if trusted:
            self._trust(peer)
        else:
            self._spawn(self._verify_peer(peer), f"verify peer {node_id}")
        return peer

    def _trust(self, peer: Peer) -> None:
        peer.trusted = True
        self._peer_event.set()
        if self.cluster is not None:
            self.cluster.peer_found(peer.node_id, peer.url)

    async def _verify_peer(self, peer: Peer) -> None:
        """Ask a peer found unauthenticated for its signed hello until it answers one; until
        then it is neither a member nor a source (said once, not at every retry)."""
        pause = VERIFY_PEER_FIRST_S
        said = False
        while not peer.trusted and self.peers.get(peer.node_id) is peer and not self._stopping:
            try:
                await peer.client.hello()
                log.info("peer %s authenticated", peer.node_id)
                self._trust(peer)
                return
            except PeerError as exc:
                if not said:
                    said = True
                    log.warning("peer %s at %s is not authenticated (%s): not a member",
                                peer.node_id, peer.url, exc)  # fmt: skip
            await asyncio.sleep(pause)
            pause = min(pause * 2, VERIFY_PEER_MAX_S)

    def note_authenticated(self, sender: str) -> None:
        """`sender` signed a request with our secret: a peer known by that id is trusted."""
        peer = self.peers.get(sender)
        if peer is not None and not peer.trusted:
            self._trust(peer)

    async def _contact_seed(self, url: str) -> None:
        probe = PeerClient(url, self.node_id, self.secret)
        said = False
        try:
            for attempt in range(600):
                try:
                    info = await probe.hello()  # signed by the seed: it holds the secret
                    if info.get("cluster_id") != self.config.cluster_id:
                        log.warning("seed %s belongs to cluster %r", url, info.get("cluster_id"))
                        return
                    self.add_peer(str(info["node_id"]), url, str(info.get("fingerprint", "")),
                                  trusted=True)  # fmt: skip
                    return
                except PeerError as exc:
                    if exc.status in (401, 502) and not said:  # answered, but unauthenticated
                        said = True
                        log.warning("seed %s is not authenticated (%s): ignored", url, exc)
                    elif attempt % 10 == 0 and exc.status not in (401, 502):
                        log.info("seed %s not answering yet (%s)", url, exc)
                    await asyncio.sleep(1.0)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    if attempt % 10 == 0:
                        log.info("seed %s answered a malformed hello (%s)", url, exc)
                    await asyncio.sleep(1.0)
        finally:
            await probe.close()

    def client(self, node_id: str) -> PeerClient | None:
        peer = self.peers.get(node_id)
        return peer.client if peer else None

    def is_alive(self, node_id: str) -> bool:
        if node_id not in self.peers:
            return False
        return self.cluster.is_alive(node_id) if self.cluster is not None else True

    def report_failure(self, node_id: str) -> None:
        if self.cluster is not None:
            self.cluster.suspect(node_id)

    def sources(self, exclude: str | None = None, likely: list[str] | None = None
                ) -> list[PeerClient]:  # fmt: skip
        """Peers to fetch files from: live ones first, and among them those whose calls did
        not fail lately (a frozen or cut-off peer still counts as alive for a while); within
        each group, those of `likely` (peers likely to have the file) first, in its order."""
        router = self.router
        rank = {n: i for i, n in reversed(list(enumerate(likely or [])))}
        peers = [p for p in self.peers.values() if p.node_id != exclude and p.trusted]
        peers.sort(key=lambda p: (not self.is_alive(p.node_id),
                                  router is not None and router.failed_lately(p.node_id),
                                  rank.get(p.node_id, len(rank))))  # fmt: skip
        return [p.client for p in peers]

    def epoch_in_force(self) -> Epoch | None:
        """Members and placed holders of the decided epoch (None before the first)."""
        cur = self.cluster.core.consensus.current if self.cluster is not None else None
        if cur is None:
            return None
        if self._epoch_cache is None or self._epoch_cache.epoch != cur.epoch:
            self._epoch_cache = epoch_of(cur)
        return self._epoch_cache

    def likely_sources(self, layer: int, expert: int) -> list[str]:
        """Peers likely to have an expert's file, best first: its announced holders, its
        placed holders, then the other members in standby rank (the first alive ones of
        those keep standby copies; later ones may have one left from an earlier epoch)."""
        out = self.router.holders(layer, expert) if self.router is not None else []
        ep = self.epoch_in_force()
        if ep is not None:
            placed = ep.holders.get((layer, expert), frozenset())
            out += sorted(placed) + ranked(ep.members, layer, expert, placed)
        return out

    # ---- startup ------------------------------------------------------------------------------
    async def _bootstrap_or_fail(self) -> None:
        """A bootstrap error that leaves the node unable to serve ends the process with one
        line; transient ones (peers, transfers) are retried inside `_bootstrap` and shown in
        /healthz meanwhile."""
        try:
            await self._bootstrap()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.phase = f"failed: {type(exc).__name__}: {exc}"
            log.error("cannot serve: %s", self.phase[8:])
            self.failed.set()

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): the model is loaded, and an epoch is in force or this node holds
        every expert itself (a node alone can serve before its first epoch)."""
        if self.phase:
            return False, self.phase
        m = self.store.manifest
        if self.cluster is not None and self.cluster.core.epoch >= 1:
            return True, "serving"
        whole = m is not None and len(self.local.held() if self.local else ()) == (
            m.num_layers * m.num_experts
        )
        if whole:
            return True, "serving alone (no placement epoch yet)"
        return False, "waiting for the first placement epoch"

    async def _bootstrap(self) -> None:
        """Get the manifest and the dense part (from peers if needed), then load and serve."""
        libraries = asyncio.ensure_future(
            asyncio.to_thread(load_libraries, torch_threads(self.config))
        )
        try:
            await self._get_model_files()
            self.phase = "loading the model"
            await libraries
        finally:
            libraries.cancel()  # a failed fetch: the thread ends by itself, its result unread
        # imported by `load_libraries` by now: these are dictionary lookups
        from edgemoe.daemon.engine import InferenceEngine
        from edgemoe.daemon.per_expert import remote_executor_factory
        from edgemoe.daemon.remote import LocalShareTap, Router
        from edgemoe.daemon.replay import replay_from_config
        from edgemoe.daemon.rpc import ExpertService
        from edgemoe.model.local import LocalExperts

        self.device = resolve_device(self.config.device)
        manifest = self.store.manifest
        assert manifest is not None
        if self.discovery is not None:
            await self.discovery.update()
        self.local = await asyncio.to_thread(
            LocalExperts,
            self.store.root,
            device=self.device,
            expert_dtype=self.config.expert_dtype,
        )
        self.recorder = ActivationRecorder(
            manifest.num_layers, manifest.num_experts, manifest.top_k
        )
        self.tap = LocalShareTap(self.recorder, self.local, self.metrics)
        loop = asyncio.get_running_loop()
        self.router = Router(
            self.node_id, self.local, self, loop, self.metrics, self.fetch_and_load,
            remote_executor=remote_executor_factory(self.config.transport),
        )
        self.expert_service = ExpertService(
            self.local, on_batch=self.metrics.rpc_batch_rows.observe
        )
        self.expert_service.start()
        self.engine = await InferenceEngine.load(
            self.store.root, self.router, recorder=self.tap, device=self.device
        )
        await asyncio.to_thread(replay_from_config, self.engine, self.config, manifest)
        self.cluster = ClusterDriver(self, genesis=[self.node_id] if self.seeded else [])
        for peer in self.peers.values():
            if peer.trusted:
                self.cluster.peer_found(peer.node_id, peer.url)
        await self.cluster.start()
        self.phase = ""
        self.ready.set()
        log.info("node %s ready: model %s", self.node_id, self.model_id)
        self._spawn(self._watch_shards, "shard watch", restart=True)
        self._start_standby(manifest)

    async def _get_model_files(self) -> None:
        """The manifest and every side file verified on disk, from peers when missing."""
        if not self.store.ready() and self._seed_tasks:
            # let every answering seed be known first, so the dense part comes from all of them
            await asyncio.wait(self._seed_tasks, timeout=SEED_WAIT_S)
        while not self.store.ready():
            if not any(p.trusted for p in self.peers.values()):
                self.phase = "no model here and no peer found yet"
                self._peer_event.clear()
                await self._peer_event.wait()
                continue
            self.phase = "fetching the model from peers"
            try:
                await self._fetch_model_files()
            except (PeerError, CorruptShard, OSError) as exc:
                self.phase = f"fetching the model from peers (retrying: {exc})"
                log.warning("fetching the model from peers failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    def _start_standby(self, manifest: Manifest) -> None:
        """Keep standby copies on disk (`standby.py`), unless every expert's file is already
        here (the seed's full model dir)."""
        experts = [(l, e) for l in range(manifest.num_layers) for e in range(manifest.num_experts)]
        if len(self.store.experts_on_disk()) == len(experts) and self.config.model_dir:
            return
        self.standby = Standby(
            self.node_id, self.store, experts, self.epoch_in_force, self.is_alive,
            self.fetch_expert, on_fetched=self.metrics.standby_bytes.inc,
        )  # fmt: skip
        self._spawn(self.standby.run, "standby copies", restart=True)

    async def _watch_shards(self) -> None:
        """Fetch again, from peers, any held shard or side file that changed on disk and no
        longer matches the manifest (`ShardStore.has` already refuses to serve it)."""
        while True:
            await asyncio.sleep(SHARD_CHECK_S)
            if self.local is None:
                continue
            rels = self.store.side_files() + [
                Manifest.expert_path(layer, expert) for layer, expert in sorted(self.local.held())
            ]
            for rel in await asyncio.to_thread(self.store.damaged, rels):
                self.metrics.damaged_shards.inc()
                log.warning("%s is damaged on disk; fetching it again", rel)
                try:
                    await self.fetcher.fetch(rel, self.sources(), split=rel == DENSE_NAME)
                except (PeerError, CorruptShard, OSError) as exc:
                    log.warning("%s: could not fetch it again yet (%s)", rel, exc)

    async def _fetch_model_files(self) -> None:
        if self.store.manifest is None:
            await self._fetch_manifest()
        for rel in self.store.side_files():
            sources = self.sources()
            await self.fetcher.fetch(rel, sources, split=rel == DENSE_NAME)

    async def _fetch_manifest(self) -> None:
        """Ask every known peer in turn, those announcing a model fingerprint first: a peer that
        is itself still bootstrapping answers 503, and must not hide the one that has it."""
        trusted = [p for p in self.peers.values() if p.trusted]
        peers = sorted(trusted, key=lambda p: not p.fingerprint)
        errors: list[str] = []
        for peer in peers:
            try:
                raw = await peer.client.get_bytes("/v1/manifest")
            except PeerError as exc:
                errors.append(str(exc))
                continue
            self.store.install_manifest(raw, peer.fingerprint or None)
            log.info("manifest from %s", peer.node_id)
            return
        raise PeerError("; ".join(errors) or "no peer to ask")

    @property
    def model_expert_bytes(self) -> int:
        m = self.store.manifest
        return m.expert_bytes * m.num_layers * m.num_experts if m else 0

    @property
    def capacity_bytes(self) -> int:
        """Expert memory offered to the placement, in the manifest's bytes per expert (what
        it counts and moves). A size in bytes buys as many experts as fit once held: a
        dequantized MXFP4 expert takes several times its shard's bytes in memory."""
        capacity = self.config.capacity.resolve(self.model_expert_bytes)
        m = self.store.manifest
        if m is None or self.local is None or self.config.capacity.kind != "bytes":
            return capacity
        return capacity // self.local.expert_memory_bytes() * m.expert_bytes

    # ---- experts --------------------------------------------------------------------------------
    async def fetch_expert(self, layer: int, expert: int, prefer: str | None = None) -> None:
        """Make the expert's shard present and verified on disk (pulled from peers if needed)."""
        rel = Manifest.expert_path(layer, expert)
        if await asyncio.to_thread(self.store.has, rel):
            return
        likely = self.likely_sources(layer, expert)
        await self.fetcher.fetch(rel, self.sources(likely=[prefer, *likely] if prefer else likely))

    async def fetch_and_load(self, layer: int, expert: int, prefer: str | None = None) -> None:
        assert self.local is not None
        if self.local.holds(layer, expert):
            return
        await self.fetch_expert(layer, expert, prefer)
        await asyncio.to_thread(self.local.load, layer, expert)

    # ---- generation ---------------------------------------------------------------------------
    def _account(self, result: GenerationResult) -> None:
        if result.finish_reason == "cancelled":
            self.metrics.cancelled.inc()
        n = len(result.token_ids)
        self.metrics.generated_tokens.inc(n)
        self.metrics.generation_seconds.observe(result.seconds)
        if result.seconds > 0:
            self.metrics.tokens_per_second.set(n / result.seconds)

    async def generate(
        self, prompt_ids: list[int], params: GenerationParams, cancel: threading.Event,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        assert self.engine is not None and self.recorder is not None
        self.recorder.note_request()
        result = await self.engine.generate(prompt_ids, params, cancel, on_token)
        self._account(result)
        return result

    def stream(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        on_done: Callable[[GenerationResult], None],
        cancel: threading.Event,
    ) -> AsyncGenerator[int, None]:
        assert self.engine is not None and self.recorder is not None
        self.recorder.note_request()

        def done(result: GenerationResult) -> None:
            self._account(result)
            on_done(result)

        return self.engine.stream(prompt_ids, params, done, self.metrics.cancelled.inc, cancel)

    # ---- cluster ------------------------------------------------------------------------------
    async def on_gossip(self, sender: str, message: Any) -> Any:
        from edgemoe.daemon.wire import WireError

        if self.cluster is None:
            raise WireError("this node is still starting", 503)
        if self._closed:
            raise WireError("this node is leaving", 503)
        return await self.cluster.on_message(sender, message)

    def cluster_view(self) -> dict[str, Any]:
        m = self.store.manifest
        view: dict[str, Any] = {
            "node_id": self.node_id,
            "cluster_id": self.config.cluster_id,
            "url": self.url,
            "ready": self.engine is not None,
            "epoch": 0,
            "model": None
            if m is None
            else {
                "architecture": m.architecture,
                "num_layers": m.num_layers,
                "num_experts": m.num_experts,
                "top_k": m.top_k,
                "fingerprint": m.fingerprint,
                "expert_bytes": m.expert_bytes,
            },
            "members": [],
            "placement": {"epoch": 0, "strategy": self.config.strategy, "holders": {}},
            "holdings": {},
            "stats": {},
            "local_share": self.tap.share if self.tap else 1.0,
            "routed": {
                "local": self.tap.local_pairs if self.tap else 0,
                "total": self.tap.total_pairs if self.tap else 0,
            },
            "remote_bytes": int(
                sum(
                    s.value
                    for metric in self.metrics.remote_bytes.collect()
                    for s in metric.samples
                    if s.name.endswith("_total")
                )
            ),
            "migration": {"pending": 0, "bytes_moved": 0},
            "standby": self.standby.view() if self.standby is not None else None,
        }
        if self.cluster is not None:
            view.update(self.cluster.view())
        return view

    async def request_migration(self, *, dry_run: bool, members: list[str] | None) -> Any:
        if self.cluster is None:
            raise ValueError("this node is still starting")
        return await self.cluster.request_migration(dry_run=dry_run, members=members)


def store_root(config: DaemonConfig) -> Path:
    return config.model_dir or config.state_dir / "model"
