"""`edgemoe bench chaos`: real daemons in namespaces, clients generating on every node, the
seeded nemesis of `schedule.py`, and `checker.py` over what was recorded.

Reuses the namespace testbed (lifecycle, namespace threads): namespaces are named `emch-*`
so a chaos run and a testbed run never remove each other's. Partitions are iptables DROP
rules in the nodes' own namespaces, lossy links iptables rules dropping a random share of a
node's packets, slow links a tbf qdisc on both ends of a node's link; each rule is removed
by its heal, and every rule, qdisc and process goes with the namespaces on exit, errors and
signals.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgemoe.daemon.chaos.checker import (
    Exit,
    Fault,
    History,
    Request,
    Resources,
    Snapshot,
    check,
    check_convergence,
)
from edgemoe.daemon.chaos.disks import shard_hashes
from edgemoe.daemon.chaos.schedule import (
    GAP_S,
    LOSS,
    MIGRATION_WAIT_S,
    SLOW_MBPS,
    Step,
    make_schedule,
)
from edgemoe.daemon.testbed.lifecycle import (
    Testbed,
    check_requirements,
    remove_namespaces,
    run_command,
)
from edgemoe.daemon.testbed.netns import NS_THREAD_PREFIX, NamespacePool, namespace_pool
from edgemoe.daemon.testbed.plan import NODE_IF, TestbedError, TestbedSpec

FAMILY = "emch-"
PORT = 7700
PROMPTS = ("The edge cluster", "Mixture of experts", "A box on the LAN", "Partitions heal")
MAX_TOKENS = 6
DEADLINE_S = 30.0  # a request must end (answer or clear error) within this
CLIENT_PAUSE_S = 0.2  # between a client's requests; after an error, ERROR_PAUSE_S
ERROR_PAUSE_S = 0.5
SNAPSHOT_EVERY_S = 1.0
START_TIMEOUT_S = 240.0
SETTLE_TIMEOUT_S = 150.0  # after the last heal: one epoch, every expert held
FINAL_SUCCESS_TIMEOUT_S = 60.0
MAX_REQUESTS_PER_NODE = 5000
SAMPLE_EVERY = 5  # a resource sample of every daemon each this many snapshot rounds
# Seconds between the clients' stop and the end-of-run resource count: a peer connection
# pool (aiohttp's client, 15 s keep-alive) closes idle connections by then, so the count
# shows fds that stay, not the pool the run's last burst of traffic left open.
POOL_IDLE_S = 17.0


def remove_leftovers() -> list[str]:
    """Namespaces (and processes) of crashed chaos runs; only when no chaos run is live."""
    return remove_namespaces(FAMILY)


def reference_tokens(checkpoint: Path, prompts: tuple[str, ...],
                     tokens: int) -> dict[str, list[int]]:  # fmt: skip
    """Greedy tokens of the single-process transformers model, EOS ignored like the clients."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    out = {}
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False)  # fmt: skip
        out[prompt] = gen[0, ids["input_ids"].shape[1]:].tolist()
    return out


def _in_namespace_thread() -> None:
    """Node addresses exist only inside the namespaces; from the host a request would take
    the default route off the machine, so refuse to send it there."""
    if not threading.current_thread().name.startswith(NS_THREAD_PREFIX):
        raise TestbedError("bug: a chaos request outside a namespace thread")


def _http(url: str, token: str, method: str, body: Any, timeout: float) -> Any:
    _in_namespace_thread()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _proc_resources(pid: int) -> dict[str, int]:
    """RSS bytes, threads, fds that are not sockets, and sockets (peer connections come and
    go with members, so the checker allows them more room)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return {}
    fds, sockets = len(links), sum(link.startswith("socket:") for link in links)
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "threads": int(fields["Threads"]),
            "fds": fds - sockets, "sockets": sockets}  # fmt: skip


@dataclass
class ChaosSetting:
    nodes: int = 5
    seed: int = 0
    duration: float = 120.0
    join: bool = True


class _Daemons:
    """One daemon per namespace (node `nodes` is the spare that joins), started, killed,
    paused and restarted on the same state dir; every exit is recorded with whether it was
    asked for."""

    def __init__(self, tb: Testbed, setting: ChaosSetting, shards: Path, workdir: Path,
                 clock: Callable[[], float]) -> None:  # fmt: skip
        self.tb, self.setting, self.workdir, self.clock = tb, setting, workdir, clock
        self.token = secrets.token_urlsafe(24)
        self.secret = secrets.token_hex(32)
        self.cluster_id = f"chaos-{secrets.token_hex(2)}"
        total = setting.nodes + 1
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.asked: set[int] = set()  # pids we ended on purpose
        self.exits: list[Exit] = []
        self.recorded: set[int] = set()  # pids whose exit is in `exits`
        self.hung_stops: list[tuple[int, int, float]] = []  # (node, pid, t): stop never ended
        self.pools: list[NamespacePool] = [namespace_pool(tb.namespace(i), 4)
                                           for i in range(total)]  # fmt: skip
        survivors = (setting.nodes + 2) // 2  # the nodes left when a minority is down
        self.capacity = f"{min(100.0, 120.0 / survivors):.1f}%"  # they hold it all, x1.2
        self.stores: dict[int, Path] = {}
        for i in range(total):
            state = workdir / f"node{i}"
            state.mkdir(parents=True, exist_ok=True)
            model = None
            if i == 0:  # its own copy: the store may write, the built model stays clean
                model = workdir / "node0-model"
                if not model.exists():
                    shutil.copytree(shards, model)
            self.stores[i] = model or state / "model"
            config = dict(
                secret=self.secret, api_token=self.token, admin_token=self.token,
                cluster_id=self.cluster_id, state_dir=str(state),
                model_dir=str(model) if model else None, host=tb.address(i), port=PORT,
                interface=[tb.address(i)], capacity=self.capacity, device="cpu",
                log_level="info")  # fmt: skip
            (workdir / f"node{i}.toml").write_text(
                "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items() if v is not None))

    def url(self, i: int, path: str) -> str:
        return f"http://{self.tb.address(i)}:{PORT}{path}"

    def call(self, i: int, method: str, path: str, body: Any = None,
             timeout: float = 5.0) -> Any:  # fmt: skip
        return self.pools[i].submit(_http, self.url(i, path), self.token, method, body,
                                    timeout).result(timeout + 5)  # fmt: skip

    def start(self, i: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEMOE_")}
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                   PYTHONFAULTHANDLER="1")
        with (self.workdir / f"node{i}.log").open("ab") as log:
            argv = [sys.executable, "-m", "edgemoe.cli", "daemon", "--config",
                    str(self.workdir / f"node{i}.toml")]  # fmt: skip
            self.procs[i] = self.tb.popen(i, argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env)  # fmt: skip

    def signal(self, i: int, sig: int) -> None:
        p = self.procs[i]
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.asked.add(p.pid)
        if p.poll() is None:
            os.kill(p.pid, sig)

    def wait_exit(self, i: int, timeout: float = 30.0) -> None:
        """Wait for a daemon asked to end; one that does not is made to dump every thread's
        stack into its log (faulthandler, SIGABRT) to show where its stop hung, then killed."""
        p = self.procs[i]
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.asked.add(p.pid)
            self.hung_stops.append((i, p.pid, self.clock()))
            os.kill(p.pid, signal.SIGABRT)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.poll()

    def poll(self) -> None:
        """Record every daemon process that ended since the last look (once each)."""
        for i, p in list(self.procs.items()):
            if p.poll() is not None and p.pid not in self.recorded:
                self.recorded.add(p.pid)
                self.exits.append(Exit(i, self.clock(), p.returncode, p.pid in self.asked))

    def alive(self, i: int) -> bool:
        return i in self.procs and self.procs[i].poll() is None

    def log_tail(self, i: int) -> str:
        return (self.workdir / f"node{i}.log").read_text(errors="replace")[-1500:]

    def stop_all(self) -> None:
        for i in list(self.procs):
            self.signal(i, signal.SIGCONT)
            self.signal(i, signal.SIGTERM)
        for i in list(self.procs):
            self.wait_exit(i)
        for pool in self.pools:
            pool.shutdown()


class _Clients:
    """A client thread per node, inside its namespace: greedy requests, bounded in count and
    time, each recorded with how it ended."""

    def __init__(self, d: _Daemons, nodes: list[int]) -> None:
        self.d = d
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.active: set[int] = set()
        self.futures = []
        for i in nodes:
            self.add(i)

    def add(self, i: int) -> None:
        self.active.add(i)
        self.futures.append(self.d.pools[i].submit(self._loop, i))

    def _loop(self, i: int) -> None:
        for k in range(MAX_REQUESTS_PER_NODE):
            if self.stopping.is_set():
                return
            prompt = PROMPTS[k % len(PROMPTS)]
            r = self._one(i, prompt)
            with self.lock:
                self.requests.append(r)
            time.sleep(CLIENT_PAUSE_S if r.status == "ok" else ERROR_PAUSE_S)

    def _one(self, i: int, prompt: str) -> Request:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0}  # fmt: skip
        start = self.d.clock()
        base = dict(node=i, prompt=prompt, max_tokens=MAX_TOKENS, start=start,
                    deadline_s=DEADLINE_S)  # fmt: skip
        try:
            out = _http(self.d.url(i, "/v1/completions"), self.d.token, "POST", body,
                        DEADLINE_S)  # fmt: skip
            ids = tuple(int(x) for x in out["choices"][0]["token_ids"])
            return Request(**base, status="ok", end=self.d.clock(), token_ids=ids)
        except TimeoutError as exc:
            return Request(**base, status="timeout", end=self.d.clock(), error=str(exc))
        except urllib.error.HTTPError as exc:
            return Request(**base, status="error", end=self.d.clock(),
                           error=f"HTTP {exc.code}: {exc.read()[:200]!r}")  # fmt: skip
        except urllib.error.URLError as exc:
            status = "timeout" if isinstance(exc.reason, TimeoutError) else "error"
            return Request(**base, status=status, end=self.d.clock(), error=str(exc.reason))
        except (OSError, ValueError, KeyError) as exc:
            return Request(**base, status="error", end=self.d.clock(), error=repr(exc))

    def successes_since(self, i: int, t: float) -> int:
        with self.lock:
            return sum(r.node == i and r.status == "ok" and r.start >= t for r in self.requests)

    def stop(self) -> None:
        self.stopping.set()
        for f in self.futures:
            with contextlib.suppress(Exception):  # a client's crash is in its history already
                f.result(DEADLINE_S + 10)


class ChaosRun:
    def __init__(self, setting: ChaosSetting, workdir: Path, say: Callable[[str], None]) -> None:
        self.setting, self.workdir, self.say = setting, workdir, say
        self.t0 = time.monotonic()
        self.snapshots: list[Snapshot] = []
        self.faults: list[Fault] = []
        self.samples: list[dict[str, Any]] = []  # resources of each daemon over the run
        self.monitor_stop = threading.Event()

    def clock(self) -> float:
        return time.monotonic() - self.t0

    # ---- nemesis actions -----------------------------------------------------------------
    def _iptables(self, node: int, *args: str) -> None:
        run_command(self.tb.command(node, ["iptables", *args]))

    def _rules(self, s: Step) -> list[tuple[int, tuple[str, ...]]]:
        """(node, iptables rule) of a partition's cuts or a lossy link, both directions."""
        if s.kind == "lossy":
            drop = ("-m", "statistic", "--mode", "random", "--probability", f"{LOSS}", "-j",
                    "DROP")  # fmt: skip
            return [(s.nodes[0], ("INPUT", "-i", NODE_IF, *drop)),
                    (s.nodes[0], ("OUTPUT", "-o", NODE_IF, *drop))]  # fmt: skip
        rules = []
        for a, b in s.cuts:
            for x, y in ((a, b), (b, a)):
                rules.append((x, ("INPUT", "-s", self.tb.address(y), "-j", "DROP")))
                rules.append((x, ("OUTPUT", "-d", self.tb.address(y), "-j", "DROP")))
        return rules

    def _slow(self, node: int, on: bool) -> None:
        spec = self.tb.spec
        for ns, dev in ((spec.node_ns(node), NODE_IF), (spec.bridge_ns, spec.port(node))):
            if on:  # a tiny burst: 1 Mbit/s with no room to catch up
                run_command(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                             "rate", f"{SLOW_MBPS}mbit", "burst", "1600", "latency", "200ms"])
            else:
                run_command(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)

    def _migrating(self) -> bool:
        return any(int(((self._view(i) or {}).get("migration") or {}).get("pending", 0)) > 0
                   for i in list(self.d.procs) if self.d.alive(i))  # fmt: skip

    def apply(self, s: Step) -> None:
        """Start every part of the step at once; heal each after its own hold."""
        if s.kind == "join":
            start = self.clock()
            self.say(f"[{start:6.1f}s] step {s.step}: join node {s.nodes[0]}")
            self._start(s.nodes[0], s.step)
            self.clients.add(s.nodes[0])
            self.faults.append(Fault(s.step, s.kind, start, start, s.nodes))
            return
        if s.during == "migration":  # wait (bounded) for a migration to be under way
            deadline = time.monotonic() + MIGRATION_WAIT_S
            while time.monotonic() < deadline and not self._migrating():
                time.sleep(0.2)
        start = self.clock()
        for part in s.parts():
            self.say(f"[{start:6.1f}s] step {s.step}: {part.kind} nodes {list(part.nodes)} "
                     f"cuts {len(part.cuts)} for {part.hold:.1f}s"
                     f"{' during a migration' if s.during else ''}")  # fmt: skip
            self._begin(part)
        for part in sorted(s.parts(), key=lambda p: p.hold):
            time.sleep(max(0.0, start + part.hold - self.clock()))
            self._heal(part)
            self.faults.append(Fault(s.step, part.kind, start, self.clock(), part.nodes,
                                     part.cuts))  # fmt: skip

    def _begin(self, s: Step) -> None:
        d = self.d
        if s.cuts or s.kind == "lossy":
            for node, rule in self._rules(s):
                self._iptables(node, "-A", *rule)
        elif s.kind == "kill":
            d.signal(s.nodes[0], signal.SIGKILL)
        elif s.kind == "pause":
            d.signal(s.nodes[0], signal.SIGSTOP)
        elif s.kind == "leave":
            d.signal(s.nodes[0], signal.SIGTERM)
        elif s.kind == "slow":
            self._slow(s.nodes[0], True)

    def _heal(self, s: Step) -> None:
        d = self.d
        if s.cuts or s.kind == "lossy":
            for node, rule in self._rules(s):
                self._iptables(node, "-D", *rule)
        elif s.kind in ("kill", "leave"):
            d.wait_exit(s.nodes[0])
            self._start(s.nodes[0], s.step)
        elif s.kind == "pause":
            d.signal(s.nodes[0], signal.SIGCONT)
        elif s.kind == "slow":
            self._slow(s.nodes[0], False)

    def _start(self, node: int, step: int) -> None:
        """(Re)start a daemon; its boot, until /healthz says ready, is recorded as a "boot"
        interval (the node is not connected while it loads)."""
        start = self.clock()
        self.d.start(node)

        def watch() -> None:
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and not self.monitor_stop.is_set():
                with contextlib.suppress(Exception):
                    if self.d.call(node, "GET", "/healthz", timeout=2.0).get("ready"):
                        break
                time.sleep(0.2)
            self.faults.append(Fault(step, "boot", start, self.clock(), (node,)))

        threading.Thread(target=watch, daemon=True, name=f"chaos-boot-{node}").start()

    # ---- observing -----------------------------------------------------------------------
    def _view(self, i: int) -> dict[str, Any] | None:
        try:
            return self.d.call(i, "GET", "/v1/cluster", timeout=3.0)
        except Exception:  # down, paused or cut off: no snapshot this time
            return None

    def _monitor(self) -> None:
        n = 0
        while not self.monitor_stop.wait(SNAPSHOT_EVERY_S):
            self.d.poll()
            n += 1
            for i in list(self.d.procs):
                if self.d.alive(i) and (v := self._view(i)) is not None:
                    self.snapshots.append(Snapshot(self.clock(), i, v))
                if n % SAMPLE_EVERY == 0 and self.d.alive(i):
                    self.samples.append({"t": round(self.clock(), 1), "node": i,
                                         "pid": self.d.procs[i].pid,
                                         **_proc_resources(self.d.procs[i].pid)})  # fmt: skip

    def _socket_states(self) -> dict[int, dict[str, Any]]:
        """Per live node, its TCP sockets by state and by the other end's role (a peer's
        daemon port, a client of ours, or an outgoing call's local end): where growth went."""
        out: dict[int, dict[str, Any]] = {}
        for i in list(self.d.procs):
            if not self.d.alive(i):
                continue
            done = run_command(self.tb.command(i, ["ss", "-tanH"]), check=False)
            states: dict[str, int] = {}
            peers: dict[str, int] = {}
            for line in done.stdout.splitlines():
                cols = line.split()
                if len(cols) < 5:
                    continue
                states[cols[0]] = states.get(cols[0], 0) + 1
                local, remote = cols[3], cols[4]
                role = ("to a peer" if remote.endswith(f":{PORT}") else
                        "from a peer or client" if local.endswith(f":{PORT}") else "other")
                key = f"{cols[0]} {role}"
                peers[key] = peers.get(key, 0) + 1
            out[i] = {"states": states, "by_role": peers}
        return out

    def _converged(self, nodes: list[int]) -> list[Snapshot] | None:
        views = {i: self._view(i) for i in nodes}
        if any(v is None for v in views.values()):
            return None
        snaps = [Snapshot(self.clock(), i, v) for i, v in views.items() if v is not None]
        ids = {v["node_id"] for v in views.values() if v}
        ok = not check_convergence(snaps) and all(
            {m["node_id"] for m in v.get("members", []) if m.get("state") == "alive"} >= ids
            and int((v.get("migration") or {}).get("pending", 0)) == 0
            for v in views.values() if v)  # fmt: skip
        return snaps if ok else None

    def _wait(self, what: str, predicate: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, p in self.d.procs.items():
                if p.poll() is not None and p.pid not in self.d.asked:
                    raise TestbedError(f"daemon of node {i} exited {p.returncode} while "
                                       f"waiting for {what}:\n{self.d.log_tail(i)}")  # fmt: skip
            if (got := predicate()) is not None and got is not False:
                return got
            time.sleep(1.0)
        return None

    # ---- the run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from edgemoe.daemon.testbed.bench import build_model

        s = self.setting
        check_requirements(need_delay=False)
        shards = build_model(self.workdir, "tiny", self.say)
        self.say("greedy reference from the single-process model ...")
        reference = reference_tokens(shards.parent / "checkpoint", PROMPTS, MAX_TOKENS)
        schedule = make_schedule(s.seed, s.nodes, s.duration, join=s.join)
        spec = TestbedSpec(nodes=s.nodes + 1, family=FAMILY)
        with Testbed(spec) as tb:
            self.tb = tb
            self.say(f"chaos {spec.prefix}*: {s.nodes} nodes (+1 spare), seed {s.seed}, "
                     f"{len(schedule)} steps over {s.duration:g}s")  # fmt: skip
            run_dir = self.workdir / f"run-seed{s.seed}"
            shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run's state dirs (placement
            run_dir.mkdir(parents=True)  # log, holdings) must not leak into this one
            self.d = d = _Daemons(tb, s, shards, run_dir, self.clock)
            try:
                return self._run(schedule, reference, shards)
            finally:
                self.monitor_stop.set()
                d.stop_all()

    def _run(self, schedule: list[Step], reference: dict[str, list[int]],
             shards: Path) -> dict[str, Any]:  # fmt: skip
        s, d = self.setting, self.d
        nodes = list(range(s.nodes))
        for i in nodes:
            d.start(i)
        if self._wait("the first placement", lambda: self._converged(nodes),
                      START_TIMEOUT_S) is None:  # fmt: skip
            raise TestbedError("timed out waiting for the first placement:\n" + d.log_tail(0))
        for i in nodes:  # warm-up: one request each, then the baseline
            self.clients_warm(i)
        self.t0 = time.monotonic()  # the run's clock starts with the faults' schedule
        self.clients = _Clients(d, nodes)
        monitor = threading.Thread(target=self._monitor, daemon=True, name="chaos-monitor")
        monitor.start()
        warm: dict[int, tuple[int, dict[str, int]]] = {}
        for step in schedule:
            # a heal that came late (a leave's slow exit) still gets the schedule's shortest
            # quiet gap before the next fault: its heal-to-success time is its own
            healed = max((f.end for f in self.faults if f.kind != "boot"), default=0.0)
            while self.clock() < max(step.at, healed + GAP_S[0]):
                time.sleep(0.1)
            if not warm:  # warm-up: the clients' first seconds, before any fault
                warm = {i: (d.procs[i].pid, _proc_resources(d.procs[i].pid)) for i in nodes}
            self.apply(step)
        last = max((f.end for f in self.faults), default=0.0)
        live = [i for i in d.procs if d.alive(i)]
        self.say(f"[{self.clock():6.1f}s] last heal done; waiting for convergence")
        final = self._wait("convergence", lambda: self._converged(live), SETTLE_TIMEOUT_S) or []
        self._wait("a success on every node", lambda: all(
            self.clients.successes_since(i, last) for i in live), FINAL_SUCCESS_TIMEOUT_S)
        if not final:
            final = [Snapshot(self.clock(), i, v) for i in live if (v := self._view(i))]
        self.clients.stop()
        self.monitor_stop.set()
        monitor.join(10)
        busy = self._socket_states()
        time.sleep(POOL_IDLE_S)
        d.poll()
        resources = [Resources(i, w, _proc_resources(pid)) for i, (pid, w) in warm.items()
                     if d.alive(i) and d.procs[i].pid == pid]  # fmt: skip
        sockets = self._socket_states()
        end = self.clock()
        d.stop_all()
        shards_seen = [h for i in d.procs for h in shard_hashes(i, d.stores[i])]
        history = History(
            nodes=s.nodes, reference=reference, requests=self.clients.requests,
            faults=self.faults, snapshots=self.snapshots, final=final, shards=shards_seen,
            exits=d.exits, resources=resources, end=end)  # fmt: skip
        report = check(history)
        return {"seed": s.seed, "nodes": s.nodes, "duration": s.duration,
                "schedule": [st.to_dict() for st in schedule], **report,
                "sockets_at_end": sockets, "sockets_as_clients_stopped": busy,
                "resource_samples": self.samples,
                "stops_that_hung": d.hung_stops,
                "history": _history_json(history)}  # fmt: skip

    def clients_warm(self, i: int) -> None:
        body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "temperature": 0}  # fmt: skip
        self.d.call(i, "POST", "/v1/completions", body, timeout=DEADLINE_S * 4)


def _history_json(h: History) -> dict[str, Any]:
    return {"nodes": h.nodes, "reference": h.reference, "end": h.end,
            **{k: [asdict(x) for x in getattr(h, k)] for k in
               ("requests", "faults", "snapshots", "final", "shards", "exits", "resources")}}


def run_chaos(setting: ChaosSetting, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    if setting.nodes < 1 or setting.duration <= 0:
        raise TestbedError("nodes must be >= 1 and duration > 0")
    return ChaosRun(setting, workdir, say).run()
