"""`edgemoe demo`: a whole cluster on this machine, from nothing, in a few minutes.

Generates a tiny random MoE model, shards it, starts N real `edgemoe daemon` processes on
127.0.0.1 (zeroconf bound to 127.0.0.1, free ports, state in a temp dir, only the first node
given the shards), waits for discovery and the first decided placement, gives every node
prompts of its own domain, shows placement, latency and bytes; then moves one node to another
domain and shows the migration that follows. Every process it starts is stopped on the way
out (process groups, finally blocks, SIGINT/SIGTERM), and no port is left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from edgemoe.cli.client import ClientError, Node
from edgemoe.cli.config_cmds import new_config, write_config
from edgemoe.cli.ops_cmds import (
    held_by_node,
    holdings_by_node,
    human_bytes,
    local_hit,
    migration_table,
    ranges,
    short,
)

# Seconds the daemons get after SIGTERM before SIGKILL: a graceful leave hands a node's experts
# over within HANDOVER_TIMEOUT_S (10 s). After Ctrl-C every node leaves at once, so no handover
# can succeed (each waits for peers that are leaving too) and the demo's directory is thrown
# away: a short grace, then SIGKILL.
STOP_GRACE_S = 10.0
INTERRUPT_GRACE_S = 2.0

# Prompts whose bytes differ in kind (the tiny model's tokenizer is byte-level), so each
# domain drives the router towards its own experts.
DOMAINS: dict[str, list[str]] = {
    "code": [
        "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)",
        "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
        "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
        "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); }",
        'if err != nil { return fmt.Errorf("open %s: %w", path, err) }',
        "const add = (a, b) => a + b; console.log(add(2, 3));",
    ],
    "math": [
        "17 * 23 = 391; 391 / 17 = 23; 2^10 = 1024",
        "3.14159 * 2.71828 = 8.53972; sqrt(2) = 1.41421",
        "12 + 45 + 78 + 90 = 225, 225 / 4 = 56.25",
        "x^2 - 5x + 6 = 0 => x = 2 or x = 3",
        "1 1 2 3 5 8 13 21 34 55 89 144 233 377 610",
        "int_0^1 x^2 dx = 1/3; d/dx sin(x) = cos(x)",
    ],
    "cooking": [
        "Whisk the eggs with sugar until pale, then fold in the flour gently.",
        "Simmer the tomatoes with garlic, olive oil and basil for twenty minutes.",
        "Knead the dough, let it rise for an hour, then bake until golden.",
        "Season the chicken with salt and pepper and roast it with lemon.",
        "Melt the butter, add the onions and cook them slowly until sweet.",
        "Serve the soup hot with fresh bread and a little cream on top.",
    ],
    "poetry": [
        "ÜBER ALLEN GIPFELN IST RUH, IN ALLEN WIPFELN SPÜREST DU",
        "LA LUNE ÉTAIT SEREINE ET JOUAIT SUR LES FLOTS — À L'ÉTÉ",
        "¡OH NOCHE QUE GUIASTE! ¡OH NOCHE AMABLE MÁS QUE LA ALBORADA!",
        "ÅH, SOMMARNATT — ØJNE SOM STJÆRNER, HJÄRTA SOM ELD",
        "ΕΝ ΑΡΧΗ ΗΝ Ο ΛΟΓΟΣ — ЛЮБЛЮ ГРОЗУ В НАЧАЛЕ МАЯ",
        "ÇA VA, MON CŒUR? ŒUVRE D'ÉTÉ, FÊTE À LA FENÊTRE",
    ],
}
DOMAIN_ORDER = tuple(DOMAINS)
# After the shift node0 sends this many times its usual prompts, so that its decayed
# statistics (half-life minutes) turn to the new domain within the demo's seconds.
SHIFT_FACTOR = 3
SETTLE_WAIT_S = 15.0


def shifted_domain(domains: dict[int, str]) -> str:
    """Node 0's new domain: one no node uses yet, else the next one after its own."""
    unused = [d for d in DOMAIN_ORDER if d not in domains.values()]
    if unused:
        return unused[0]
    return DOMAIN_ORDER[(DOMAIN_ORDER.index(domains[0]) + 1) % len(DOMAIN_ORDER)]


class DemoError(Exception):
    """The demo cannot go on; the message says which step failed and why."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the daemon binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nobody holds or listens on ``port``: a server could bind it now. SO_REUSEADDR as every
    server sets it, so connections the stopped daemon left in TIME_WAIT (kernel state, owned
    by no process) do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


@dataclass
class DemoNode:
    """One daemon process of the demo cluster."""

    index: int
    port: int
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalCluster:
    """N daemons on 127.0.0.1 sharing one secret; a context manager that always stops them."""

    workdir: Path
    shard_dir: Path
    nodes_count: int
    capacity_bytes: int
    strategy: str = "edgemoe"
    secret: str = field(default_factory=lambda: secrets.token_hex(32))
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    nodes: list[DemoNode] = field(default_factory=list)
    daemon_argv: tuple[str, ...] = (sys.executable, "-m", "edgemoe.cli", "daemon")

    def client(self, node: DemoNode) -> Node:
        return Node(node.url, self.token, "demo")

    def label(self, node_id: str) -> str:
        """node0, node1, ... in start order (ids are random hex; the story uses indices)."""
        for node in self.nodes:
            if node.node_id == node_id:
                return f"node{node.index}"
        return short(node_id)

    def start(self) -> None:
        """Spawn every daemon in its own process group (so stopping reaches its children)."""
        cluster_id = f"demo-{secrets.token_hex(3)}"
        for i in range(self.nodes_count):
            node = DemoNode(
                index=i, port=free_port(), state_dir=self.workdir / f"node{i}",
                log_path=self.workdir / f"node{i}.log",
            )  # fmt: skip
            node.state_dir.mkdir(parents=True, exist_ok=True)
            config = self.workdir / f"node{i}.toml"
            values = new_config(
                cluster_id=cluster_id, secret=self.secret, api_token=self.token,
                admin_token=self.token,  # one local operator: the demo's migrate uses it too
                model_dir=str(self.shard_dir),
                state_dir=str(node.state_dir), host="127.0.0.1", port=node.port,
                capacity=f"{self.capacity_bytes}B", interface=["127.0.0.1"], device="cpu",
                strategy=self.strategy, log_level="info",
            )  # fmt: skip
            if i > 0:
                values["model_dir"] = None  # only node0 has the shards; the others fetch
            write_config(config, values, force=True)
            cmd = [*self.daemon_argv, "--config", str(config)]
            # The user's own EDGEMOE_* settings would override the demo's file: drop them.
            env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEMOE_")}
            env.update({"EDGEMOE_CONFIG": str(config), "OMP_NUM_THREADS": "1",
                        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})  # fmt: skip
            with node.log_path.open("wb") as log:
                node.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True, cwd=self.workdir,
                )  # fmt: skip
            self.nodes.append(node)

    def check_alive(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is not None:
                raise DemoError(
                    f"node{node.index} (port {node.port}) exited with code "
                    f"{node.proc.returncode}; its log ends:\n{node.log_tail()}"
                )

    def wait_healthy(self, timeout: float, tick: Callable[[str], None]) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.nodes)
        while pending:
            self.check_alive()
            for node in list(pending):
                try:
                    node.node_id = str(self.client(node).get("/healthz", timeout=1.0)["node_id"])
                    pending.remove(node)
                except ClientError:
                    pass
            tick(f"{len(self.nodes) - len(pending)}/{len(self.nodes)} daemons answering")
            if pending and time.monotonic() > deadline:
                raise DemoError(
                    f"node{pending[0].index} did not answer /healthz within {timeout:.0f} s; "
                    f"its log ends:\n{pending[0].log_tail()}"
                )
            time.sleep(0.3)

    def wait_ready(self, timeout: float, tick: Callable[[str], None]) -> None:
        """Until every node has loaded its part of the model (/healthz "ready")."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            ready = 0
            for node in self.nodes:
                with contextlib.suppress(ClientError):
                    ready += bool(self.client(node).get("/healthz", timeout=2.0).get("ready", True))
            if ready == len(self.nodes):
                return
            tick(f"{ready}/{len(self.nodes)} nodes loaded the model")
            if time.monotonic() > deadline:
                raise DemoError(
                    f"only {ready}/{len(self.nodes)} nodes loaded the model in "
                    f"{timeout:.0f} s; node0 log ends:\n{self.nodes[0].log_tail()}"
                )
            time.sleep(0.5)

    def cluster(self, node: DemoNode | None = None, timeout: float = 10.0) -> dict[str, Any]:
        return self.client(node or self.nodes[0]).get("/v1/cluster", timeout=timeout)

    def wait_until(
        self,
        what: str,
        ready: Callable[[dict[str, Any]], bool],
        timeout: float,
        tick: Callable[[str], None],
        node: DemoNode | None = None,
    ) -> dict[str, Any]:
        """Poll /v1/cluster of ``node`` until ``ready`` holds (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(ClientError):
                last = self.cluster(node, timeout=5.0)
                if ready(last):
                    return last
            tick(what)
            time.sleep(0.5)
        raise DemoError(
            f"timed out after {timeout:.0f} s waiting for {what}; last epoch "
            f"{last.get('epoch')}, members {[m.get('state') for m in last.get('members', [])]}; "
            f"node0 log ends:\n{self.nodes[0].log_tail()}"
        )

    def stop(self, grace: float = STOP_GRACE_S) -> list[int]:
        """SIGTERM every process group, SIGKILL what is left after ``grace``; returns the
        ports still bound afterwards (should be none)."""
        for node in self.nodes:
            if node.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in self.nodes:
            if node.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            # The group may outlive its leader (helper processes): kill what remains.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=5)
        busy: list[int] = []
        for node in self.nodes:
            for _ in range(20):
                if port_is_free(node.port):
                    break
                time.sleep(0.1)
            else:
                busy.append(node.port)
        return busy

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def all_alive(n: int) -> Callable[[dict[str, Any]], bool]:
    def ready(c: dict[str, Any]) -> bool:
        return sum(1 for m in c.get("members", []) if m.get("state") == "alive") >= n

    return ready


def placement_decided(n: int, after_epoch: int = 0) -> Callable[[dict[str, Any]], bool]:
    """Every node alive, a placement epoch newer than ``after_epoch`` covering all members."""

    def ready(c: dict[str, Any]) -> bool:
        placement = c.get("placement") or {}
        holders = held_by_node(placement.get("holders", {}))
        return (
            all_alive(n)(c) and int(placement.get("epoch") or 0) > after_epoch and len(holders) >= n
        )

    return ready


def migration_done(c: dict[str, Any]) -> bool:
    """Announced holdings cover the decided placement and nothing is pending."""
    if int(c.get("migration", {}).get("pending", 0)) > 0:
        return False
    decided = held_by_node((c.get("placement") or {}).get("holders", {}))
    announced = holdings_by_node(c.get("holdings", {}))
    return all(
        set(es) <= set(announced.get(n, {}).get(ly, []))
        for n, per in decided.items()
        for ly, es in per.items()
    )


def holdings_settled(c: dict[str, Any]) -> bool:
    """Every node announces exactly what the placement gives it: copies it no longer needs
    are dropped (they go after the new holders have loaded theirs)."""
    decided = held_by_node((c.get("placement") or {}).get("holders", {}))
    announced = holdings_by_node(c.get("holdings", {}))
    nodes = set(decided) | set(announced)
    return migration_done(c) and all(
        {ly: sorted(es) for ly, es in decided.get(n, {}).items() if es}
        == {ly: sorted(es) for ly, es in announced.get(n, {}).items() if es}
        for n in nodes
    )


@dataclass
class PhaseResult:
    """What one round of prompts cost, per node."""

    name: str
    domains: dict[str, str]
    latency_ms: dict[str, list[float]]
    tokens: dict[str, int]
    remote_bytes: dict[str, int]
    local_share: dict[str, float]
    routed: dict[str, tuple[int, int]]  # (served locally, all) routed pairs in the phase


def run_phase(
    cluster: LocalCluster, name: str, domains: dict[int, str], rounds: int, max_tokens: int,
    more: dict[int, int] | None = None,
) -> PhaseResult:  # fmt: skip
    """Every node answers its own domain's prompts (nodes in parallel, each one sequential);
    ``more`` gives some nodes (by index) another number of prompts."""
    model = cluster.client(cluster.nodes[0]).get("/v1/models")["data"][0]["id"]
    before = {n.node_id: cluster.cluster(n) for n in cluster.nodes}

    interrupted = threading.Event()  # Ctrl-C: no worker starts another prompt

    def work(node: DemoNode) -> tuple[list[float], int]:
        client = cluster.client(node)
        prompts = DOMAINS[domains[node.index]]
        latencies: list[float] = []
        tokens = 0
        for r in range((more or {}).get(node.index, rounds)):
            if interrupted.is_set():
                break
            prompt = prompts[r % len(prompts)]
            t0 = time.perf_counter()
            out = client.post(
                "/v1/completions",
                {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                timeout=120,
            )
            latencies.append((time.perf_counter() - t0) * 1000)
            tokens += int((out.get("usage") or {}).get("completion_tokens", max_tokens))
        return latencies, tokens

    pool = ThreadPoolExecutor(max_workers=len(cluster.nodes))
    try:
        results = dict(
            zip((n.node_id for n in cluster.nodes), pool.map(work, cluster.nodes), strict=True)
        )
    except BaseException:  # Ctrl-C: leave the prompts in flight to the daemons' stop
        interrupted.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    after = {n.node_id: cluster.cluster(n) for n in cluster.nodes}
    return PhaseResult(
        name=name,
        domains={n.node_id: domains[n.index] for n in cluster.nodes},
        latency_ms={i: lat for i, (lat, _) in results.items()},
        tokens={i: tok for i, (_, tok) in results.items()},
        remote_bytes={
            i: int(after[i].get("remote_bytes", 0)) - int(before[i].get("remote_bytes", 0))
            for i in after
        },
        local_share={i: phase_local_share(before[i], after[i]) for i in after},
        routed={i: routed_delta(before[i], after[i]) for i in after},
    )


def routed_delta(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int]:
    """(local, total) routed (token, expert) pairs between two views of one node."""
    b, a = before.get("routed") or {}, after.get("routed") or {}
    return (
        int(a.get("local", 0)) - int(b.get("local", 0)),
        int(a.get("total", 0)) - int(b.get("total", 0)),
    )


def phase_local_share(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Share of routed (token, expert) pairs served locally during the phase, from the
    cumulative counters when the node reports them, else its share since start."""
    b, a = before.get("routed") or {}, after.get("routed") or {}
    total = int(a.get("total", 0)) - int(b.get("total", 0))
    if total > 0:
        return (int(a.get("local", 0)) - int(b.get("local", 0))) / total
    return float(after.get("local_share", 0.0))


def phases_table(phases: list[PhaseResult], label: Callable[[str], str] = short) -> Any:
    from rich import box
    from rich.table import Table

    # Compact (fits 80 columns); the caption says what the short headers mean.
    table = Table(
        title="requests: latency and bytes between nodes, per phase", box=box.SIMPLE_HEAD,
        pad_edge=False, collapse_padding=True,
        caption="phases: 1 own = each node its own domain, genesis placement; 2 adapted = the "
        "same after the workload-aware epoch; 3 shifted = node0 on a new domain; 4 migrated = "
        "after the migration that followed. ms = request latency; tok/s = tokens per second of "
        "request time; to peers = bytes of hidden states sent to other nodes per request; "
        "local = share of routed (token, expert) pairs the node served itself.",
        caption_justify="left",
    )  # fmt: skip
    for col in ("phase", "node", "domain", "req", "mean ms", "p50 ms", "tok/s", "to peers",
                "local"):  # fmt: skip
        table.add_column(
            col, justify="left" if col in ("phase", "node", "domain") else "right", no_wrap=True
        )

    def row(first: str, who: str, domain: str, lat: list[float], tokens: int, remote: int,
            share: float | None) -> None:  # fmt: skip
        srt = sorted(lat)
        table.add_row(
            first, who, domain, str(len(lat)), f"{sum(lat) / len(lat):.0f}",
            f"{srt[len(srt) // 2]:.0f}", f"{tokens / (sum(lat) / 1000 or 1.0):.1f}",
            human_bytes(remote / len(lat)), "-" if share is None else f"{share:.0%}",
        )  # fmt: skip

    for phase in phases:
        for i, (nid, lat) in enumerate(phase.latency_ms.items()):
            row(phase.name if i == 0 else "", label(nid), phase.domains[nid], lat,
                phase.tokens[nid], phase.remote_bytes[nid], phase.local_share[nid])  # fmt: skip
        local, total = (sum(x) for x in zip(*phase.routed.values(), strict=True))
        row("", "all", "", [x for lat in phase.latency_ms.values() for x in lat],
            sum(phase.tokens.values()), sum(phase.remote_bytes.values()),
            local / total if total > 0 else None)  # fmt: skip
        table.add_section()
    return table


def holdings_table(c: dict[str, Any], title: str, label: Callable[[str], str] = short) -> Any:
    """Per node: experts held per layer (announced), and how much of the node's own routed
    traffic (its decayed statistics) those experts serve locally."""
    from rich.table import Table

    announced = holdings_by_node(c.get("holdings", {}))
    stats = c.get("stats", {})
    layers = int(c["model"]["num_layers"])
    experts = int(c["model"]["num_experts"])
    table = Table(title=title or None)
    table.add_column("node")
    for ly in range(layers):
        table.add_column(f"layer {ly}")
    table.add_column("held", justify="right")
    table.add_column("own traffic served locally", justify="right")
    for m in sorted(c.get("members", []), key=lambda m: label(m["node_id"])):
        nid = m["node_id"]
        per = announced.get(nid, {})
        hits = [h for h in local_hit(stats.get(nid, {}).get("counts", []), per) if h is not None]
        table.add_row(
            label(nid),
            *(ranges(per.get(ly, [])) for ly in range(layers)),
            f"{sum(len(v) for v in per.values())}/{layers * experts}",
            f"{sum(hits) / len(hits):.0%}" if hits else "no traffic yet",
        )
    return table


def show_holdings(out: Any, cluster: LocalCluster, c: dict[str, Any], when: str) -> None:
    epoch = c["placement"]["epoch"]
    out.print(f"[bold]experts held per node and layer, epoch {epoch}[/] ({when})", soft_wrap=True)
    out.print(holdings_table(c, "", cluster.label))


def placement_moves(
    old: dict[str, Any], new: dict[str, Any], expert_bytes: int
) -> list[dict[str, Any]]:
    """Experts each node gained between two placements (what had to be copied to it)."""
    old_h = (old.get("placement") or {}).get("holders", {})
    moves: list[dict[str, Any]] = []
    for key, holders in sorted((new.get("placement") or {}).get("holders", {}).items()):
        before = set(old_h.get(key, []))
        layer, expert = (int(x) for x in key.split("/"))
        for to in sorted(set(holders) - before):
            src = sorted(before)[0] if before else None
            moves.append({"layer": layer, "expert": expert, "from": src, "to": to,
                          "bytes": expert_bytes})  # fmt: skip
    return sorted(moves, key=lambda m: (m["layer"], m["expert"], m["to"]))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP become KeyboardInterrupt so every finally block runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def build_model(workdir: Path, arch: str, say: Callable[[str], None]) -> Path:
    """Tiny random checkpoint of ``arch``, sharded; returns the shard directory."""
    from edgemoe.model.shard import shard_checkpoint
    from edgemoe.model.tiny import write_tiny_model

    model_dir = write_tiny_model(arch, workdir / "model", seed=0)
    manifest, _ = shard_checkpoint(model_dir, workdir / "shards")
    say(
        f"model: tiny {manifest.architecture}, {manifest.num_layers} MoE layers x "
        f"{manifest.num_experts} experts, top-{manifest.top_k}, expert shard "
        f"{human_bytes(manifest.expert_bytes)}, {len(manifest.files)} files"
    )
    return workdir / "shards"


def demo_capacity(nodes: int, layers: int, experts: int, expert_bytes: int) -> int:
    """Each node may hold ~1.6/N of all experts (+1 per layer): together 1.6x the model, so
    every expert fits once and there is room to replicate what each workload uses most."""
    per_node = int(layers * experts * 1.6 / nodes) + layers
    return min(layers * experts, per_node) * expert_bytes


def run_demo(
    nodes: int, arch: str, rounds: int, max_tokens: int, trigger_wait: float, keep: bool,
    strategy: str,
) -> int:  # fmt: skip
    """The demo proper; returns the process exit code."""
    from rich.console import Console

    out = Console()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="edgemoe-demo-"))
    cluster: LocalCluster | None = None
    busy: list[int] = []
    grace = STOP_GRACE_S
    try:
        with stop_on_signals():
            with out.status("generating and sharding a tiny model ..."):
                shard_dir = build_model(workdir, arch, out.print)
            from edgemoe.model.manifest import Manifest

            manifest = Manifest.load(shard_dir)
            capacity = demo_capacity(
                nodes, manifest.num_layers, manifest.num_experts, manifest.expert_bytes
            )
            cluster = LocalCluster(workdir, shard_dir, nodes, capacity, strategy=strategy)
            cluster.start()
            out.print(
                f"started {nodes} daemons on 127.0.0.1 ports "
                f"{', '.join(str(n.port) for n in cluster.nodes)} "
                f"(capacity {human_bytes(capacity)} each; only node0 has the shards); "
                f"logs in {workdir}"
            )
            with out.status("waiting for the daemons ...") as st:
                cluster.wait_healthy(180, lambda s: st.update(f"waiting: {s}"))
                c0 = cluster.wait_until(
                    "discovery and the first decided placement",
                    placement_decided(nodes), 120, lambda s: st.update(f"waiting for {s}"),
                )  # fmt: skip
                cluster.wait_until("the first migration", migration_done, 120,
                                   lambda s: st.update(f"waiting for {s}"))  # fmt: skip
                cluster.wait_ready(120, lambda s: st.update(f"waiting: {s}"))
            out.print(
                f"discovered {nodes} nodes by mDNS; epoch {c0['placement']['epoch']} placement "
                f"decided ({c0['placement'].get('strategy')}) in "
                f"{time.monotonic() - started:.0f} s"
            )
            legend = [f"node{n.index} = {n.node_id} (port {n.port})" for n in cluster.nodes]
            out.print("nodes: " + ", ".join(legend) + "; node0 had the shards", soft_wrap=True)
            show_holdings(out, cluster, cluster.cluster(), "genesis: no statistics yet")
            domains = {n.index: DOMAIN_ORDER[n.index % len(DOMAIN_ORDER)] for n in cluster.nodes}
            phases: list[PhaseResult] = []
            with out.status("phase 1: each node gets prompts of its own domain ..."):
                phases.append(run_phase(cluster, "1 own", domains, rounds, max_tokens))
            adapted = rebalance(cluster, out, trigger_wait, "workload-aware placement")
            show_holdings(out, cluster, adapted, "after phase 1")
            with out.status("phase 2: same domains on the adapted placement ..."):
                phases.append(run_phase(cluster, "2 adapted", domains, rounds, max_tokens))
            shifted = {**domains, 0: shifted_domain(domains)}
            out.print(f"shift: node0 now gets "
                      f"{SHIFT_FACTOR}x as many {shifted[0]} prompts instead of {domains[0]}; "
                      "its decayed statistics follow")  # fmt: skip
            more = {0: SHIFT_FACTOR * rounds}
            with out.status("phase 3: node0's workload shifted ..."):
                phases.append(run_phase(cluster, "3 shifted", shifted, rounds, max_tokens, more))
            after = rebalance(cluster, out, trigger_wait, "migration after the shift")
            show_holdings(out, cluster, after, "after the shift")
            with out.status("phase 4: shifted workload on the migrated placement ..."):
                phases.append(run_phase(cluster, "4 migrated", shifted, rounds, max_tokens))
            out.print(phases_table(phases, cluster.label))
    except DemoError as exc:
        out.print(f"[red]demo failed:[/] {exc}")
        return 1
    except ClientError as exc:
        out.print(f"[red]demo failed:[/] {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        out.print("[yellow]interrupted: stopping the daemons[/]")
        grace = INTERRUPT_GRACE_S
        return 130
    finally:
        if cluster is not None:
            with out.status("stopping every daemon ..."):
                busy = cluster.stop(grace)
        if keep:
            out.print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if busy:
        out.print(f"[red]ports still bound after stopping: {busy}[/]")
        return 1
    out.print(
        f"demo finished in {time.monotonic() - started:.0f} s; all {nodes} daemons stopped, "
        "no port left bound"
    )
    return 0


def stats_versions(c: dict[str, Any]) -> dict[str, int]:
    return {n: int(v.get("version", 0)) for n, v in c.get("stats", {}).items()}


def rebalance(cluster: LocalCluster, out: Any, trigger_wait: float, what: str) -> dict[str, Any]:
    """Let every node's fresh statistics reach node0, give a daemon-side trigger
    ``trigger_wait`` s to start a new epoch, else ask for one the way `edgemoe migrate` does
    (POST /v1/cluster/migrate). Show the moves and wait until they are done."""
    before = cluster.cluster()
    epoch = int((before.get("placement") or {}).get("epoch") or 0)
    seen = stats_versions(before)
    n = len(cluster.nodes)

    def fresh(c: dict[str, Any]) -> bool:
        now = stats_versions(c)
        return all(now.get(x.node_id, 0) > seen.get(x.node_id, 0) for x in cluster.nodes)

    with out.status(f"{what}: waiting for every node's new statistics ...") as st:
        cluster.wait_until(
            "statistics from every node", fresh, 60, lambda s: st.update(f"{what}: waiting for {s}")
        )
    how = "a daemon-side trigger"
    try:
        with out.status(f"{what}: {trigger_wait:.0f} s for a daemon-side trigger ..."):
            cluster.wait_until(
                "a trigger", placement_decided(n, epoch), trigger_wait, lambda s: None
            )
    except DemoError:
        how = f"asking for it (POST /v1/cluster/migrate; no trigger in {trigger_wait:.0f} s)"
        with out.status(f"{what}: asking node0 for a new epoch ..."):
            result = cluster.client(cluster.nodes[0]).post(
                "/v1/cluster/migrate", {"dry_run": False, "members": None}, timeout=120
            )
        if not result.get("decided"):
            raise DemoError(
                f"{what}: the cluster did not decide a new placement epoch in time (answer "
                f"{result}); node0 log ends:\n{cluster.nodes[0].log_tail()}"
            ) from None
    with out.status(f"{what}: moving experts ...") as st:
        after = cluster.wait_until(
            "migration to finish", migration_done, 120, lambda s: st.update(f"waiting for {s}")
        )
        with contextlib.suppress(DemoError):  # old copies dropped; show them if still there
            after = cluster.wait_until(
                "old copies to be dropped", holdings_settled, SETTLE_WAIT_S,
                lambda s: st.update(f"waiting for {s}"),
            )  # fmt: skip
    moves = placement_moves(before, after, int(after["model"]["expert_bytes"]))
    total = sum(m["bytes"] for m in moves)
    out.print(
        f"[bold]{what}: epoch {epoch} -> {after['placement']['epoch']}[/] by {how}; "
        f"{len(moves)} expert {'copy' if len(moves) == 1 else 'copies'}, "
        f"{human_bytes(total)} moved",
        soft_wrap=True,
    )
    if moves:
        named = [{**m, "from": m["from"] and cluster.label(m["from"]), "to": cluster.label(m["to"])}
                 for m in moves]  # fmt: skip
        out.print(migration_table(named, "expert copies"))
    return after


def complete_arch(incomplete: str) -> list[str]:
    from edgemoe.model.families import TINY_CONFIGS

    return [a for a in TINY_CONFIGS if a.startswith(incomplete)]


def complete_strategy(incomplete: str) -> list[str]:
    from edgemoe.daemon.config import STRATEGIES

    return [s for s in STRATEGIES if s.startswith(incomplete)]


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add `edgemoe demo`."""

    @app.command()
    def demo(
        nodes: Annotated[int, typer.Option(min=1, max=8, help="Daemons to start")] = 3,
        arch: Annotated[
            str, typer.Option(help="Tiny model architecture", autocompletion=complete_arch)
        ] = "mixtral",
        rounds: Annotated[int, typer.Option(min=1, help="Prompts per node per phase")] = 6,
        max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer")] = 8,
        trigger_wait: Annotated[
            float,
            typer.Option(help="Seconds to give a daemon-side trigger before asking for an epoch"),
        ] = 5.0,
        strategy: Annotated[
            str, typer.Option(help="Placement strategy", autocompletion=complete_strategy)
        ] = "edgemoe",
        keep: Annotated[bool, typer.Option("--keep", help="Keep the temp dir (logs)")] = False,
    ) -> None:
        """A whole cluster on this machine: tiny model, N daemons, placement, migration."""
        from edgemoe.model.families import TINY_CONFIGS

        if arch not in TINY_CONFIGS:
            typer.echo(f"error: --arch {arch}: choose one of {', '.join(TINY_CONFIGS)}", err=True)
            raise typer.Exit(2)
        code = run_demo(nodes, arch, rounds, max_tokens, trigger_wait, keep, strategy)
        raise typer.Exit(code)
