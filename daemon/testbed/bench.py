"""`edgemoe bench testbed`: real daemons in namespaces over shaped links, replaying real
routing, strategies side by side on the same setting and seed.

A strategy is a placement strategy, optionally with `+per-expert`: its daemons then call
peers once per (token, expert) (DanceMoE's system as published; daemon/per_expert.py).

Per strategy, on one testbed: one daemon per namespace (only node 0 has the shards; mDNS
bound to the namespace addresses), wait for the first placement, replay each node's stream
for a profiling window, re-place from those statistics (`migrate`), then every node runs
`requests` streamed requests of `tokens` tokens (nodes in parallel, each sequential) while
the bench records token arrival times, expert-RPC bytes and calls, and the local share.
Beside each, edgemoe.sim's prediction of the same run (`simulated.py`), with constants from
`bench calibrate` run first on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.daemon.testbed.lifecycle import Testbed, check_requirements
from edgemoe.daemon.testbed.netns import NS_THREAD_PREFIX, NamespacePool, namespace_pool
from edgemoe.daemon.testbed.plan import TestbedError, TestbedSpec
from edgemoe.daemon.testbed.probe import measure_rate, measure_rtt

DAEMON_PORT = 7600
# Waits, each bounded: daemons up (python + torch import, model fetch over the shaped link),
# a placement decided and its experts moved, one HTTP call.
START_TIMEOUT_S = 240.0
PLACEMENT_TIMEOUT_S = 300.0
HTTP_TIMEOUT_S = 300.0
POLL_S = 0.5
# A request the daemon answers with an error is sent again this many times in all.
REQUEST_ATTEMPTS = 3
# The expert-call probe (the simulator's per-message cost): calls, and the id it signs as
# (not a member; daemons answer expert calls from any holder of the secret).
RPC_PROBE_CALLS = 30
RPC_PROBE_NODE_ID = "7e57be0c47e57be0"
PROMPT = "Replay the recorded routing of this request."
SHAPES = ("lite", "tiny")
DEFAULT_STRATEGIES = ("edgemoe", "dancemoe", "dancemoe+per-expert", "eplb", "layers")


def split_strategy(name: str) -> tuple[str, str]:
    """'dancemoe+per-expert' -> ('dancemoe', 'per-expert'); a bare name is per-server."""
    strategy, _, transport = name.partition("+")
    return strategy, transport or "per-server"


@dataclass(frozen=True)
class BenchSetting:
    trace: Path
    streams: tuple[str, ...] = ("intent", "law", "summary")
    capacities: tuple[float, ...] = (1.0, 1.0, 2.0)  # relative expert memory per node
    total_capacity: float = 1.2  # all nodes together, in model expert bytes
    bandwidth_mbps: float | None = 500.0
    delay_ms: float = 1.0
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    profile_requests: int = 4
    requests: int = 4
    tokens: int = 16
    seed: int = 0
    shape: str = "lite"
    layers: int | None = None  # MoE layers of the model (None: the shape's own, 26 for lite)

    @property
    def nodes(self) -> int:
        return len(self.streams)

    def capacity_share(self, node: int) -> float:
        return self.total_capacity * self.capacities[node] / sum(self.capacities)

    def check(self) -> None:
        if self.nodes < 2:
            raise TestbedError("give at least 2 streams (one per node)")
        if len(self.capacities) != self.nodes:
            raise TestbedError(f"{len(self.capacities)} capacities for {self.nodes} nodes")
        if any(self.capacity_share(i) > 1 or self.capacity_share(i) <= 0
               for i in range(self.nodes)):  # fmt: skip
            raise TestbedError("every node's capacity share must be in (0, 100%] of the model")
        if self.total_capacity < 1:
            raise TestbedError("total capacity must be >= 1 (every expert held at least once)")
        if min(self.requests, self.tokens, self.profile_requests) < 1:
            raise TestbedError("requests, tokens and profile requests must be >= 1")
        if self.layers is not None and self.layers < 1:
            raise TestbedError("layers must be >= 1")
        if self.shape not in SHAPES:
            raise TestbedError(f"shape must be one of {', '.join(SHAPES)}")


@dataclass
class StrategyResult:
    tokens_per_s: float
    decode_latency_p50_s: float
    decode_latency_p99_s: float
    request_latency_mean_s: float
    bytes_between_nodes_per_token: float
    remote_calls_per_token: float
    local_share: float
    simulated_request_latency_mean_s: float = float("nan")
    measured_over_simulated: float = float("nan")  # request latency, measured / simulated
    # a request's parts: to its first token (the prefill), then each decode step; measured
    # and as the simulator predicts them
    first_token_mean_s: float = float("nan")
    decode_step_mean_s: float = float("nan")
    simulated_first_token_mean_s: float = float("nan")
    simulated_decode_step_mean_s: float = float("nan")
    # a remote expert call, from the model's thread asking to the answer (the daemons'
    # edgemoe_expert_call_seconds over the window), and the simulator's dispatch-to-answer
    remote_call_mean_s: float = float("nan")
    simulated_remote_call_mean_s: float = float("nan")
    # the machine's CPU while measuring, in cores: all of it busy, and the part that was not
    # the testbed's (daemons, delay helpers, the bench's clients): other load on the box,
    # which the simulator's shared cores leave out
    box_busy_cores: float = float("nan")
    other_cores: float = float("nan")
    simulated_cores: float = float("nan")  # the cores the simulated servers shared
    tokens: int = 0
    seconds: float = 0.0
    epoch: int = 0
    setup_s: float = 0.0
    failed_requests: int = 0  # answered with an error and sent again (measured window)
    failures: list[str] | None = None
    # per node (namespace order): its tokens/s and decode p50, and over the measured window
    # the counters of `_StrategyRun.counters` (where the bytes, calls and CPU went)
    nodes: list[dict[str, float]] | None = None
    expert_call_s: float = float("nan")  # the expert-call probe's median (first strategy)


@dataclass
class _Http:
    """JSON over HTTP to a daemon, from threads inside its namespace."""

    url: str
    token: str
    pool: NamespacePool

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        return self.pool.submit(self._call, method, path, body, timeout).result(timeout + 5)

    def _call(self, method: str, path: str, body: Any, timeout: float) -> Any:
        _in_namespace_thread()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        with _explained(self.url), urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if path != "/metrics" else raw.decode()

    def stream_here(self, tokens: int) -> tuple[list[float], int]:
        """Token arrival times (perf_counter, first = request sent) of one streamed request;
        called on one of the pool's threads (inside the namespace)."""
        _in_namespace_thread()
        body = {"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True,
                "temperature": 0, "stream": True}  # fmt: skip
        req = urllib.request.Request(
            self.url + "/v1/completions", data=json.dumps(body).encode(), method="POST"
        )
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        times = [time.perf_counter()]
        count = 0
        with _explained(self.url), urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            for line in resp:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"{self.url}: {event['error']}")
                got = len(event["choices"][0].get("token_ids") or [])
                if got:
                    times.append(time.perf_counter())
                    count += got
        return times, count


def _in_namespace_thread() -> None:
    """Testbed addresses exist only inside the namespaces: from the host's namespace a
    request would follow the default route off the machine, so refuse to send it there."""
    if not threading.current_thread().name.startswith(NS_THREAD_PREFIX):
        raise TestbedError("bug: a testbed request outside a namespace thread")


@contextlib.contextmanager
def _explained(url: str) -> Iterator[None]:
    """An HTTP error status becomes a TestbedError carrying the daemon's reason."""
    try:
        yield
    except urllib.error.HTTPError as exc:
        raise TestbedError(f"{url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None


def _toml(values: dict[str, Any]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items() if v is not None)


def build_model(
    workdir: Path, shape: str, say: Callable[[str], None], layers: int | None = None
) -> Path:
    """A DeepSeek-V2-Lite-shaped tiny model ('lite') or the family's tiny default, sharded;
    reused when `workdir` already has it. `layers` overrides the MoE layer count (model
    layer l replays trace layer l mod 26)."""
    import torch

    from edgemoe.model.shard import shard_checkpoint
    from edgemoe.model.tiny import TinyShape, write_tiny_model

    name = f"model-{shape}" + (f"-{layers}l" if layers else "")
    shards = workdir / name / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    say(f"generating and sharding the {name} model ...")
    lite = shape == "lite"
    tiny_shape = TinyShape.deepseek_v2_lite() if lite else TinyShape()
    if layers:
        tiny_shape = dataclasses.replace(tiny_shape, layers=layers)
    ckpt = write_tiny_model(
        "deepseek_v2", workdir / name / "checkpoint", seed=0,
        dtype=torch.bfloat16 if lite else torch.float32, shape=tiny_shape,
    )  # fmt: skip
    shard_checkpoint(ckpt, shards)
    return shards


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def _expert_rtts(url: str, secret: str, view: dict[str, Any], expert: str, hidden: int,
                      dtype: str, calls: int) -> float:  # fmt: skip
    import torch

    from edgemoe.daemon.peers import PeerClient
    from edgemoe.daemon.remote import FORWARD_PATH
    from edgemoe.daemon.rpc import tensor_to_wire

    layer, index = (int(x) for x in expert.split("/"))
    kind = getattr(torch, dtype)
    body = {"layer": layer, "hidden": tensor_to_wire(torch.randn(1, hidden).to(kind)),
            "expert_ids": tensor_to_wire(torch.tensor([[index]], dtype=torch.int64)),
            "weights": tensor_to_wire(torch.ones(1, 1, dtype=kind))}  # fmt: skip
    client = PeerClient(url, RPC_PROBE_NODE_ID, secret.encode(), peer_id=view["node_id"])
    times = []
    try:
        for i in range(calls + 3):  # 3 to warm the connection up
            t0 = time.perf_counter()
            await client.post(FORWARD_PATH, body, timeout_s=HTTP_TIMEOUT_S)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    finally:
        await client.close()
    return float(np.median(times))


def box_busy_s() -> float:
    """CPU seconds this whole machine has been busy (all cores; /proc/stat user, nice,
    system, irq and softirq; not idle, iowait or a hypervisor's steal): with the testbed's
    own processes' CPU, what the other load on the box took."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """This process's CPU seconds (the bench's clients, all threads)."""
    t = os.times()
    return t.user + t.system


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (/proc; `ip netns exec` execs the daemon)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _settled(view: dict[str, Any], nodes: int, after_epoch: int) -> bool:
    """All members alive, a placement newer than `after_epoch`, every node holding exactly
    what it is assigned, nothing pending."""
    alive = {m["node_id"] for m in view.get("members", []) if m.get("state") == "alive"}
    placement = view.get("placement") or {}
    holders: dict[str, list[str]] = placement.get("holders") or {}
    if len(alive) < nodes or int(placement.get("epoch") or 0) <= after_epoch or not holders:
        return False
    if int((view.get("migration") or {}).get("pending", 0)) > 0:
        return False
    holdings = {n: set(ks) for n, ks in (view.get("holdings") or {}).items()}
    assigned: dict[str, set[str]] = {n: set() for n in alive}
    for key, hs in holders.items():
        for h in hs:
            assigned.setdefault(h, set()).add(key)
    return all(holdings.get(n, set()) == keys for n, keys in assigned.items())


class _StrategyRun:
    """One strategy's daemons on the testbed, from start to stop."""

    def __init__(self, tb: Testbed, setting: BenchSetting, strategy: str, shards: Path,
                 workdir: Path, port: int) -> None:  # fmt: skip
        self.tb, self.setting, self.strategy = tb, setting, strategy
        self.workdir = workdir
        self.token = secrets.token_urlsafe(24)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.failures: list[str] = []
        self.pools = [namespace_pool(tb.namespace(i), setting.requests + 2)
                      for i in range(setting.nodes)]  # fmt: skip
        self.http = [_Http(f"http://{tb.address(i)}:{port}", self.token, self.pools[i])
                     for i in range(setting.nodes)]  # fmt: skip
        self._start(shards, port)

    def _start(self, shards: Path, port: int) -> None:
        s = self.setting
        self.secret = secret = secrets.token_hex(32)
        strategy, transport = split_strategy(self.strategy)
        cluster_id = f"tb-{strategy}-{secrets.token_hex(2)}"
        for i in range(s.nodes):
            state = self.workdir / f"node{i}"
            state.mkdir(parents=True, exist_ok=True)
            config = self.workdir / f"node{i}.toml"
            config.write_text(_toml(dict(
                secret=secret, api_token=self.token, admin_token=self.token,
                cluster_id=cluster_id, state_dir=str(state),
                model_dir=str(shards) if i == 0 else None,
                host=self.tb.address(i), port=port, interface=[self.tb.address(i)],
                capacity=f"{100 * s.capacity_share(i):.4f}%", device="cpu",
                strategy=strategy, transport=transport, log_level="warning",
                drift_threshold=1.0,
                routing_trace=str(s.trace), routing_stream=s.streams[i],
            )))  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEMOE_")}
            env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
            with (self.workdir / f"node{i}.log").open("wb") as log:
                self.procs.append(self.tb.popen(
                    i, [sys.executable, "-m", "edgemoe.cli", "daemon", "--config", str(config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                ))  # fmt: skip

    def _check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                log = (self.workdir / f"node{i}.log").read_text(errors="replace")[-2000:]
                raise TestbedError(f"{self.strategy}: daemon of node {i} exited "
                                   f"{p.returncode}:\n{log}")  # fmt: skip

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if predicate():
                    return
            except (OSError, ValueError, KeyError, urllib.error.URLError) as exc:
                last = exc
            time.sleep(POLL_S)
        raise TestbedError(f"{self.strategy}: timed out waiting for {what} ({last or 'no'})")

    def view(self, node: int = 0) -> dict[str, Any]:
        return self.http[node].call("GET", "/v1/cluster")

    def ready(self) -> int:
        """Wait for every daemon, discovery and the first placement in force; its epoch."""
        def healthy() -> bool:
            return all(h.call("GET", "/healthz", timeout=3).get("ready") for h in self.http)

        self.wait("the daemons to be ready", healthy, START_TIMEOUT_S)
        self.node_ids = [h.call("GET", "/healthz", timeout=3)["node_id"] for h in self.http]
        self.wait("the first placement", lambda: all(
            _settled(self.view(i), self.setting.nodes, 0) for i in range(self.setting.nodes)
        ), PLACEMENT_TIMEOUT_S)  # fmt: skip
        return int(self.view()["placement"]["epoch"])

    def load(self, requests: int) -> tuple[list[list[tuple[list[float], int]]], float]:
        """Every node `requests` sequential streamed requests, nodes in parallel: per node,
        (token arrival times, tokens) of each request; the wall time."""
        def node_work(i: int) -> list[tuple[list[float], int]]:
            return [self._one(i) for _ in range(requests)]  # on a thread in node i's namespace

        start = time.perf_counter()
        futures = [self.pools[i].submit(node_work, i) for i in range(self.setting.nodes)]
        per_node = [f.result(HTTP_TIMEOUT_S * requests * REQUEST_ATTEMPTS) for f in futures]
        return per_node, time.perf_counter() - start

    def _one(self, node: int) -> tuple[list[float], int]:
        """One request; a request the daemon fails is counted and sent again (bounded)."""
        for attempt in range(REQUEST_ATTEMPTS):
            try:
                return self.http[node].stream_here(self.setting.tokens)
            except (RuntimeError, TestbedError) as exc:
                self.failures.append(f"node {node}: {exc}"[:300])
                if attempt == REQUEST_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def expert_call_s(self, hidden: int, dtype: str, calls: int = RPC_PROBE_CALLS) -> float:
        """Median round trip of a one-row expert call from node 0 to an expert node 1 holds,
        through the daemons' own wire (signed, sealed, their batching worker): what one
        message costs, for the simulator's `message_s` (calibrate's is a bare msgpack echo)."""
        view = self.view(1)
        expert = view["holdings"][view["node_id"]][0]
        return self.pools[0].submit(
            lambda: _in_namespace_thread() or asyncio.run(_expert_rtts(
                self.http[1].url, self.secret, view, expert, hidden, dtype, calls))
        ).result(HTTP_TIMEOUT_S)

    def migrate(self, epoch: int) -> int:
        self.http[0].call("POST", "/v1/cluster/migrate", {"dry_run": False, "members": None},
                          timeout=HTTP_TIMEOUT_S)  # fmt: skip
        self.wait("the re-placement from the profiled statistics", lambda: all(
            _settled(self.view(i), self.setting.nodes, epoch) for i in range(self.setting.nodes)
        ), PLACEMENT_TIMEOUT_S)  # fmt: skip
        return int(self.view()["placement"]["epoch"])

    def counters(self) -> list[dict[str, float]]:
        """Per node: bytes sent and received for its experts, calls made, pairs routed (and
        held locally), rows and calls served for peers, CPU seconds of its daemon."""
        out = []
        for i in range(self.setting.nodes):
            v = self.view(i)
            metrics = self.http[i].call("GET", "/metrics")
            out.append({
                "bytes": float(v.get("remote_bytes", 0)),
                "local": float((v.get("routed") or {}).get("local", 0)),
                "routed": float((v.get("routed") or {}).get("total", 0)),
                "calls": _metric_sum(metrics, "edgemoe_remote_expert_calls_total"),
                "served_calls": _metric_sum(metrics, "edgemoe_expert_rpc_served_total"),
                "served_rows": _metric_sum(metrics, "edgemoe_expert_rpc_batch_rows_sum"),
                "call_s": _metric_sum(metrics, "edgemoe_expert_call_seconds_sum"),
                "answered_calls": _metric_sum(metrics, "edgemoe_expert_call_seconds_count"),
                "cpu_s": _cpu_seconds(self.procs[i].pid),
                "helper_cpu_s": (_cpu_seconds(self.tb.delay_helpers[i].pid)
                                 if i in self.tb.delay_helpers else 0.0),
                "held": float(len((v.get("holdings") or {}).get(v.get("node_id", ""), []))),
            })  # fmt: skip
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for pool in self.pools:
            pool.shutdown()


def measure_strategy(
    tb: Testbed, setting: BenchSetting, strategy: str, shards: Path, workdir: Path, port: int,
    say: Callable[[str], None], probe: tuple[int, str] | None = None,
) -> tuple[StrategyResult, dict[str, Any], list[str]]:
    """The measured figures, the placement in force while measuring, the nodes' ids.
    `probe` (hidden size, dtype): also time one-row expert calls (`expert_call_s`) first."""
    t0 = time.monotonic()
    run = _StrategyRun(tb, setting, strategy, shards, workdir, port)
    try:
        epoch = run.ready()
        say(f"{strategy}: placement epoch {epoch} in force; profiling "
            f"{setting.profile_requests} requests per node")  # fmt: skip
        run.load(setting.profile_requests)
        epoch = run.migrate(epoch)
        placed = run.view()
        # after the profiling window and the re-placement: warm daemons, nothing moving
        call_s = run.expert_call_s(*probe) if probe else float("nan")
        setup = time.monotonic() - t0
        say(f"{strategy}: re-placed (epoch {epoch}); measuring {setting.requests} x "
            f"{setting.tokens} tokens per node")  # fmt: skip
        before = run.counters()
        box, own = box_busy_s(), _own_cpu_s()
        failed_before = len(run.failures)
        per_node, wall = run.load(setting.requests)
        box, own = box_busy_s() - box, _own_cpu_s() - own
        after = run.counters()
        failures = run.failures[failed_before:]
    finally:
        run.stop()
    times = [t for node in per_node for t, _ in node]
    tokens = sum(n for node in per_node for _, n in node)
    gaps = _decode_gaps(times)
    delta = {k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in after[0]}
    nodes = [{
        "tokens_per_s": sum(n for _, n in node) / (node[-1][0][-1] - node[0][0][0]),
        "decode_latency_p50_s": _p(_decode_gaps([t for t, _ in node]), 50),
        **{k: a[k] - b[k] for k in a if k != "held"}, "held": a["held"],
    } for node, a, b in zip(per_node, after, before, strict=True)]  # fmt: skip
    testbed_cpu = delta["cpu_s"] + delta["helper_cpu_s"] + own
    return StrategyResult(
        tokens_per_s=tokens / wall,
        first_token_mean_s=float(np.mean([t[1] - t[0] for t in times if len(t) > 1])),
        decode_step_mean_s=float(gaps.mean()) if gaps.size else float("nan"),
        remote_call_mean_s=(delta["call_s"] / delta["answered_calls"]
                            if delta["answered_calls"] else float("nan")),
        box_busy_cores=box / wall, other_cores=max(box - testbed_cpu, 0.0) / wall,
        decode_latency_p50_s=_p(gaps, 50), decode_latency_p99_s=_p(gaps, 99),
        request_latency_mean_s=float(np.mean([t[-1] - t[0] for t in times])),
        bytes_between_nodes_per_token=delta["bytes"] / max(tokens, 1),
        remote_calls_per_token=delta["calls"] / max(tokens, 1),
        local_share=delta["local"] / delta["routed"] if delta["routed"] else 1.0,
        tokens=tokens, seconds=wall, epoch=epoch, setup_s=setup,
        failed_requests=len(failures), failures=run.failures or None, nodes=nodes,
        expert_call_s=call_s,
    ), placed, run.node_ids  # fmt: skip


def _decode_gaps(times: list[list[float]]) -> np.ndarray:
    """Seconds between consecutive tokens after the first (decode steps) of each request."""
    return np.concatenate([np.diff(t[1:]) for t in times if len(t) > 2] or [np.zeros(0)])


def _p(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


def _prompt_tokens(shards: Path) -> int:
    """Tokens of PROMPT as the daemons encode it (their tokenizer ships with the shards)."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(shards))(PROMPT)["input_ids"])


def _activation_bytes(setting: BenchSetting) -> int:
    """Bytes of one hidden-state value on the wire: the lite shape runs bf16, the tiny fp32."""
    return 2 if setting.shape == "lite" else 4


def _simulate(setting: BenchSetting, strategy: str, shards: Path, placed: dict[str, Any],
              node_ids: list[str], constants: Any, cores: float) -> Any:  # fmt: skip
    """edgemoe.sim's prediction (`simulated.Predicted`) of this strategy's measured window."""
    from edgemoe.daemon.testbed import simulated
    from edgemoe.model.manifest import Manifest

    manifest = Manifest.load(shards)
    prompt = _prompt_tokens(shards)
    requests = simulated.replayed_requests(
        setting.trace, setting.streams, shards, skip=setting.profile_requests,
        count=setting.requests, prompt_tokens=prompt, tokens=setting.tokens)
    placement = simulated.placement_of(placed, node_ids, manifest.num_layers,
                                       manifest.num_experts)
    return simulated.simulated_latency(
        placement, requests, constants=constants, bandwidth_mbps=setting.bandwidth_mbps,
        delay_ms=setting.delay_ms, hidden_size=int(manifest.config["hidden_size"]),
        activation_bytes=_activation_bytes(setting),
        transport=split_strategy(strategy)[1], prompt_tokens=prompt, cores=cores)


def _testbed_cores(result: StrategyResult) -> float:
    """The cores the testbed's processes had while `result` was measured."""
    return float(os.cpu_count() or 1) - result.other_cores


def run_testbed_bench(setting: BenchSetting, workdir: Path,
                      say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """The whole run; returns {"setting": ..., "link": ..., "strategies": {...}}."""
    setting.check()
    check_requirements(need_delay=setting.delay_ms > 0)
    from edgemoe.stats.traces import load_stream

    for name in setting.streams:
        load_stream(setting.trace, name)  # a bad stream fails now, not in a daemon
    shards = build_model(workdir, setting.shape, say, setting.layers)
    from edgemoe.daemon.testbed.simulated import calibrate_for, fit_call_costs, with_wire_cost
    from edgemoe.model.manifest import Manifest

    manifest = Manifest.load(shards)
    dtype = manifest.config.get("dtype") or manifest.config.get("torch_dtype") or "float32"
    say("bench calibrate: the simulator's constants at this model's shape, on one thread ...")
    calibrated = calibrate_for(shards)
    say(", ".join(f"{k} {v:.3g}" for k, v in calibrated.to_dict().items()
                  if isinstance(v, float)))  # fmt: skip
    spec = TestbedSpec(nodes=setting.nodes, bandwidth_mbps=setting.bandwidth_mbps,
                       delay_ms=setting.delay_ms)  # fmt: skip
    measured: dict[str, tuple[StrategyResult, dict[str, Any], list[str]]] = {}
    with Testbed(spec) as tb:
        link = {**measure_rtt(tb, 0, 1, count=20), **measure_rate(tb, 0, 1, seconds=0.5)}
        say(f"testbed {spec.prefix}*: {setting.nodes} namespaces; link 0->1 measured "
            f"{link['mbps']:.0f} Mbit/s, RTT {1000 * link['rtt_median_s']:.2f} ms")  # fmt: skip
        for k, strategy in enumerate(setting.strategies):
            run_dir = workdir / f"run-{strategy}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a node's state from an earlier run
            run_dir.mkdir(parents=True)  # (placement log, holdings) must not leak into this one
            measured[strategy] = measure_strategy(
                tb, setting, strategy, shards, run_dir, DAEMON_PORT + k, say,
                probe=None if k else (int(manifest.config["hidden_size"]), str(dtype)))
    # The per-call costs: fitted to the daemons' and delay helpers' CPU seconds per node
    # beyond what the simulator charges for compute; the probe's round trip where no fit is
    # possible (too few strategies, a coefficient below zero).
    probed = with_wire_cost(calibrated, measured[setting.strategies[0]][0].expert_call_s,
                            link["rtt_median_s"])  # fmt: skip
    free = dataclasses.replace(calibrated, message_s=0.0, caller_message_s=0.0, byte_s=0.0)
    row_bytes = int(manifest.config["hidden_size"]) * _activation_bytes(setting)
    rows = []
    for strategy, (result, placed, node_ids) in measured.items():
        work = _simulate(setting, strategy, shards, placed, node_ids, free,
                         _testbed_cores(result)).work_s
        for n, w in zip(result.nodes or [], work, strict=True):
            n["simulated_compute_s"] = float(w)  # what the simulator charges it, calls aside
            served_bytes = 2 * n["served_rows"] * row_bytes  # each row in and out
            rows.append((n["cpu_s"] + n["helper_cpu_s"] - w, n["calls"], n["served_calls"],
                         n["bytes"] + served_bytes))
    constants = fit_call_costs(probed, rows)
    say(f"per-call costs: {1000 * constants.caller_message_s:.2f} ms per call made, "
        f"{1000 * constants.message_s:.2f} ms per call served, "
        f"{1e9 * constants.byte_s:.1f} ns per byte moved ({constants.source})")
    results: dict[str, Any] = {}
    for strategy, (result, placed, node_ids) in measured.items():
        result.simulated_cores = _testbed_cores(result)
        predicted = _simulate(setting, strategy, shards, placed, node_ids, constants,
                              result.simulated_cores)
        result.simulated_request_latency_mean_s = predicted.request_mean_s
        result.simulated_first_token_mean_s = predicted.first_token_mean_s
        result.simulated_decode_step_mean_s = predicted.decode_step_mean_s
        result.simulated_remote_call_mean_s = predicted.remote_call_mean_s
        result.measured_over_simulated = (
            result.request_latency_mean_s / result.simulated_request_latency_mean_s)
        results[strategy] = asdict(result)
    return {
        "setting": {**{k: v for k, v in asdict(setting).items() if k != "trace"},
                    "trace": str(setting.trace), "nodes": setting.nodes},
        "link": {"rtt_median_s": link["rtt_median_s"], "mbps": link["mbps"]},
        "constants": constants.to_dict(),
        "calibrated_constants": calibrated.to_dict(),
        "strategies": results,
    }


__all__ = ["DEFAULT_STRATEGIES", "BenchSetting", "StrategyResult", "build_model",
           "run_testbed_bench", "split_strategy"]
