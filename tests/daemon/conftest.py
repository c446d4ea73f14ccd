"""Real daemon processes on 127.0.0.1 for the daemon tests: a tiny model, its shard directory,
the single-process reference tokens, and helpers to start, query and stop nodes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SECRET = "test-cluster-secret-0123456789abcdef"
TOKEN = "test-api-token-0123456789"
PROMPTS = ("Hello world", "The edge servers")
MAX_NEW = 20
LONG_NEW = 160  # long enough to be in flight when a node dies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    """One `edgemoe daemon` process."""

    name: str
    state_dir: Path
    port: int
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    env: dict[str, str] = field(default_factory=dict)
    model_dir: Path | None = None  # its own copy of the shards (a model dir is one daemon's)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "edgemoe.cli", "daemon", "--state-dir", str(self.state_dir),
               "--port", str(self.port), "--host", "127.0.0.1", *self.args]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEMOE_")}
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        env.update(self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = TOKEN,
        timeout: float = 60.0,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            payload, status = exc.read(), exc.code
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            try:
                status, body = self.request("GET", "/healthz", token=None, timeout=2)
                if status == 200 and body.get("ready"):
                    self.node_id = body["node_id"]
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{self.name} not ready in {timeout}s:\n{self.log()}")

    def cluster(self) -> dict[str, Any]:
        status, body = self.request("GET", "/v1/cluster", timeout=10)
        assert status == 200, body
        return body

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, AssertionError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@dataclass(frozen=True)
class TinyModel:
    model_dir: Path
    shard_dir: Path
    reference: dict[str, list[int]]
    long_reference: list[int]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny Mixtral, sharded, and greedy reference tokens from plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgemoe.model.shard import shard_checkpoint
    from edgemoe.model.tiny import write_tiny_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    model_dir = write_tiny_model("mixtral", root / "model", seed=3)
    shard_checkpoint(model_dir, root / "shards")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    reference = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False)
        reference[prompt] = out[0, ids["input_ids"].shape[1] :].tolist()
    ids = tok(PROMPTS[1], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=LONG_NEW, do_sample=False)
    long_reference = out[0, ids["input_ids"].shape[1] :].tolist()
    return TinyModel(model_dir, root / "shards", reference, long_reference)


@contextmanager
def running(node: Node, timeout: float = 180) -> Iterator[Node]:
    """A started node, ready (the first epoch decided), stopped on the way out."""
    node.start()
    try:
        node.wait_ready(timeout)
        yield node
    finally:
        node.stop()


def make_node(
    tmp: Path,
    name: str,
    *,
    shard_dir: Path | None,
    cluster_id: str,
    capacity: str,
    extra: list[str] | None = None,
    mdns: bool = True,
) -> Node:
    state = tmp / name
    state.mkdir(parents=True, exist_ok=True)
    args = ["--secret", SECRET, "--api-token", TOKEN, "--cluster-id", cluster_id,
            "--capacity", capacity, "--device", "cpu", "--log-level", "info"]  # fmt: skip
    model_dir = None
    if shard_dir is not None:
        model_dir = tmp / f"{name}-model"
        if not model_dir.exists():
            shutil.copytree(shard_dir, model_dir)
        args += ["--model-dir", str(model_dir)]
    if mdns:
        args += ["--interface", "127.0.0.1"]
    node = Node(name, state, free_port(), args + (extra or []), tmp / f"{name}.log")
    node.model_dir = model_dir
    return node


@dataclass
class Cluster:
    nodes: list[Node]
    tmp: Path
    cluster_id: str

    def stop(self) -> None:
        """SIGTERM one node after the other: each hands its experts to those still running."""
        for node in self.nodes:
            node.stop()


def placed(cluster: Cluster) -> dict | None:
    """The common view once every node agrees on an epoch whose placement is in force: each
    node announces exactly what it is assigned (new copies loaded, old ones dropped), and every
    node has heard every announcement."""
    views = [n.cluster() for n in cluster.nodes]
    ids = {n.node_id for n in cluster.nodes}
    v = views[0]
    held = {k for ks in v["holdings"].values() for k in ks}
    alive = {m["node_id"] for m in v["members"] if m["state"] == "alive"}
    assigned = {i: {k for k, hs in v["placement"]["holders"].items() if i in hs} for i in ids}
    if (
        alive == ids
        and v["epoch"] >= 1
        and all(w["epoch"] == v["epoch"] for w in views)
        and set(v["placement"]["holders"]) == held
        and len(held) == v["model"]["num_layers"] * v["model"]["num_experts"]
        and all(v["holdings"].get(i) for i in ids)
        # every node has heard every node's holdings: a node that has not routes the experts
        # it does not hold to nobody, fetches them and computes them here
        and all(set(w["holdings"].get(i, [])) == assigned[i] for w in views for i in ids)
        and all(w["migration"]["pending"] == 0 for w in views)
    ):
        return v
    return None


def three_nodes(tmp: Path, tiny: TinyModel, cluster_id: str) -> list[Node]:
    """Three daemons found by mDNS, each for 60% of the experts; only the first has the shards."""
    return [
        make_node(tmp, "seed", shard_dir=tiny.shard_dir, cluster_id=cluster_id, capacity="60%"),
        make_node(tmp, "b", shard_dir=None, cluster_id=cluster_id, capacity="60%"),
        make_node(tmp, "c", shard_dir=None, cluster_id=cluster_id, capacity="60%"),
    ]


SMALL_CLUSTER = "small"


@pytest.fixture(scope="session")
def small(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """The whole model on one node (no mDNS) whose capacity is 60% of the experts: a cluster
    whose memory is below its model."""
    node = make_node(tmp_path_factory.mktemp("small"), "small", shard_dir=tiny.shard_dir,
                     cluster_id=SMALL_CLUSTER, capacity="60%", mdns=False)  # fmt: skip
    with running(node):
        yield node


@pytest.fixture(scope="module")
def cluster3(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three daemons found by mDNS alone; only the first has the shard directory."""
    tmp = tmp_path_factory.mktemp("cluster3")
    cid = f"t3-{os.getpid()}"
    nodes = three_nodes(tmp, tiny, cid)
    for node in nodes:
        node.start()
    cluster = Cluster(nodes, tmp, cid)
    try:
        for node in nodes:
            node.wait_ready(180)  # ready = model loaded and the first epoch decided
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def solo(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One daemon holding the whole model, no mDNS (seed of the file-transfer tests)."""
    node = make_node(
        tmp_path_factory.mktemp("solo"),
        "solo",
        shard_dir=tiny.shard_dir,
        cluster_id="solo",
        capacity="100%",
        mdns=False,
    )
    node.start()
    try:
        node.wait_ready(180)
        wait_for(
            lambda: len(node.cluster()["holdings"].get(node.node_id, [])) == 16,
            60,
            "the solo node to hold every expert",
        )
        yield node
    finally:
        node.stop()


@dataclass
class PeersWithoutClients:
    """The router's view of peers when no call can reach any (the PeerBook edge): `alive`
    says whether membership still counts them alive (a peer whose calls fail but that has
    not been declared dead) or not (a node alone)."""

    alive: bool

    def client(self, node_id: str) -> Any:
        return None

    def is_alive(self, node_id: str) -> bool:
        return self.alive

    def report_failure(self, node_id: str) -> None:
        return None
