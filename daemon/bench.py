"""`edgemoe bench rpc`: figures of the daemon's IO paths measured side by side on loopback.

1. Expert RPC (signed msgpack, batching worker, real experts) against a bare aiohttp echo of
   the same bytes: round trip and throughput, overhead ratio.
2. Shard streaming (signed, Range-capable, digest-verified, atomic install, fsync) against a
   plain aiohttp static-file copy of the same files (no hash, no fsync), both with
   `STREAMS_IN_FLIGHT` files at once: MB/s, in rounds that alternate which goes first; with
   `link_mbps`, once more across a shaped link between two namespaces (`testbed.stream`).
3. Tokens/s of one node holding every expert with 8 concurrent clients against 1 client, and
   its per-token latency against the plain transformers model in one process (both warmed by
   one whole generation, then measured in interleaved rounds; the ratio is the rounds' median).
4. Tokens/s of a 3-node cluster against one node holding everything, same model and prompts.

`ratios` holds the four figures issue 14 sets goals for, each measured side by side in one run.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import torch

from edgemoe.daemon.peers import PeerClient
from edgemoe.daemon.rpc import tensor_from_wire, tensor_to_wire
from edgemoe.daemon.store import ShardFetcher, ShardStore
from edgemoe.daemon.wire import pack, unpack
from edgemoe.model.manifest import Manifest

BENCH_NODE_ID = "be0c4be0c4be0c40"  # the benchmark's client signs as this (not a member)
PROMPTS = ("The edge servers", "Hello world", "Mixture of experts", "Peer to peer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, token: str | None = None, body: dict[str, Any] | None = None) -> Any:
    import json

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


class _Proc:
    """A child process (daemon or plain server) on a free port; stopped with SIGTERM."""

    def __init__(self, args: list[str], log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEMOE_")}
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env)
        self.log = log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _daemon(
    workdir: Path,
    name: str,
    secret: str,
    token: str,
    *,
    model_dir: Path | None,
    capacity: str,
    cluster_id: str,
    seeds: list[int],
) -> tuple[_Proc, str]:
    port = _free_port()
    args = [sys.executable, "-m", "edgemoe.cli", "daemon", "--state-dir", str(workdir / name),
            "--host", "127.0.0.1", "--port", str(port), "--secret", secret, "--api-token", token,
            "--cluster-id", cluster_id,
            "--capacity", capacity, "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    if model_dir is not None:
        args += ["--model-dir", str(model_dir)]
    for s in seeds:
        args += ["--seed-peer", f"127.0.0.1:{s}"]
    return _Proc(args, workdir / f"{name}.log"), f"http://127.0.0.1:{port}"


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (all threads); None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}")


def _holds_all(url: str, token: str, n: int) -> bool:
    view = _get(url + "/v1/cluster", token)
    return sum(len(v) for v in view["holdings"].values()) >= n and bool(view["holdings"])


ECHO_SERVER = textwrap.dedent(
    """
    import sys
    from aiohttp import web
    size = int(sys.argv[2])
    async def echo(request):
        await request.read()
        return web.Response(body=bytes(size))
    app = web.Application(client_max_size=1 << 28)
    app.router.add_post("/echo", echo)
    app.router.add_static("/files", sys.argv[3])
    host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
    web.run_app(app, host=host, port=int(sys.argv[1]), print=None, access_log=None)
    """
)


def _compute_fn(shard_dir: Path, body: dict[str, Any]) -> Callable[[], None]:
    """The same expert computation in-process: the part of the RPC that is not transport
    (timed interleaved with the calls, on one thread as the daemons run: `_rpc_figures`
    sets it outside the timed part)."""
    from edgemoe.model.local import LocalExperts

    local = LocalExperts(shard_dir).load_all()
    body = unpack(pack(body))  # as the server sees it
    args = [tensor_from_wire(body[k], dtypes=(body[k]["dtype"],), ndim=2, max_elements=1 << 30,
                             name=k) for k in ("hidden", "expert_ids", "weights")]  # fmt: skip

    def compute() -> None:
        with torch.inference_mode():
            local.forward(body["layer"], *args)

    return compute


async def _rpc_figures(
    url: str,
    echo_url: str,
    secret: str,
    manifest: Manifest,
    shard_dir: Path,
    rows: int,
    calls: int,
    pids: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Round trips of the RPC (sealed and not), the echo and the compute, interleaved; with
    `pids` (daemon, echo server) also CPU per call on both sides, which a loaded box stretches
    far less than wall times (a runnable but preempted process waits, it does not spend)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, manifest.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(manifest.num_experts, generator=g)[: manifest.top_k]
                       for _ in range(rows)])  # fmt: skip
    weights = torch.full(ids.shape, 1.0 / manifest.top_k)
    body = {"layer": 0, "hidden": tensor_to_wire(hidden), "expert_ids": tensor_to_wire(ids),
            "weights": tensor_to_wire(weights)}  # fmt: skip
    raw = pack(body)
    answer_bytes = len(pack({"out": tensor_to_wire(hidden)}))
    client = PeerClient(url, BENCH_NODE_ID, secret.encode())
    # the same RPC with bodies not sealed: only here, to show what the AEAD costs
    unsealed = PeerClient(url, BENCH_NODE_ID, secret.encode(), seal=False)
    plain = aiohttp.ClientSession()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the daemons run (OMP_NUM_THREADS=1)
    try:
        await client.hello()
        await unsealed.hello()
        for _ in range(10):
            await client.post("/v1/experts/forward", body)
            await unsealed.post("/v1/experts/forward", body)
            async with plain.post(echo_url, data=raw) as r:
                await r.read()

        async def rpc() -> None:
            await client.post("/v1/experts/forward", body)

        async def rpc_unsealed() -> None:
            await unsealed.post("/v1/experts/forward", body)

        async def echo() -> None:
            async with plain.post(echo_url, data=raw) as r:
                await r.read()

        out: dict[str, float] = {"request_bytes": len(raw), "answer_bytes": answer_bytes}
        kinds = (("rpc", rpc), ("rpc_unsealed", rpc_unsealed), ("echo", echo))
        lat: dict[str, list[float]] = {name: [] for name, _ in kinds}
        compute = _compute_fn(shard_dir, body)
        compute()
        lat["compute"] = []
        cpu: dict[str, float] = {name: 0.0 for name, _ in kinds}  # this thread's, per kind
        cpu["compute"] = 0.0
        before = [_process_cpu_s(pid) for pid in pids or ()]
        async def computed() -> None:
            compute()

        timed = [*kinds, ("compute", computed)]
        order = random.Random(0)
        for _ in range(calls):
            # interleaved, so a busy moment hits every kind alike, in a shuffled order, so each
            # kind follows each other about equally often: in a fixed order the sealed RPC
            # always came right after the in-process compute, and its seal ratio read 1.14-1.15
            # where the AEAD costs ~45 us of a ~6 ms call
            order.shuffle(timed)
            for name, fn in timed:
                t0, c0 = time.perf_counter(), time.thread_time()
                await fn()
                lat[name].append(time.perf_counter() - t0)
                cpu[name] += time.thread_time() - c0
        for name, seconds in cpu.items():
            out[f"{name}_client_cpu_ms"] = seconds / calls * 1e3
        after = [_process_cpu_s(pid) for pid in pids or ()]
        spent = [
            b - a for a, b in zip(before, after, strict=True) if a is not None and b is not None
        ]
        if len(spent) == 2:
            # the daemon served both RPC kinds: its CPU per call is their mean
            out["rpc_server_cpu_ms"] = spent[0] / (2 * calls) * 1e3
            out["echo_server_cpu_ms"] = spent[1] / calls * 1e3
            out["rpc_caller_cpu_ms"] = (
                out["rpc_client_cpu_ms"] + out["rpc_unsealed_client_cpu_ms"]
            ) / 2  # the same mean on the caller's side
            out["cpu_ratio"] = (out["rpc_server_cpu_ms"] + out["rpc_caller_cpu_ms"]) / (
                out["echo_server_cpu_ms"] + out["echo_client_cpu_ms"] + out["compute_client_cpu_ms"]
            )
        for name, fn in kinds:
            out[f"{name}_rtt_ms_p50"] = statistics.median(lat[name]) * 1e3
            out[f"{name}_rtt_ms_mean"] = statistics.fmean(lat[name]) * 1e3
            t0 = time.perf_counter()
            gate = asyncio.Semaphore(8)

            async def limited(fn: Callable[[], Any] = fn, gate: asyncio.Semaphore = gate) -> None:
                async with gate:
                    await fn()

            await asyncio.gather(*(limited() for _ in range(calls)))
            out[f"{name}_calls_per_s"] = calls / (time.perf_counter() - t0)
        out["compute_ms_p50"] = statistics.median(lat["compute"]) * 1e3
        out["rtt_overhead_ratio"] = out["rpc_rtt_ms_p50"] / out["echo_rtt_ms_p50"]
        out["seal_ratio"] = out["rpc_rtt_ms_p50"] / out["rpc_unsealed_rtt_ms_p50"]
        out["throughput_ratio"] = out["echo_calls_per_s"] / out["rpc_calls_per_s"]
        return out
    finally:
        torch.set_num_threads(threads)
        await client.close()
        await unsealed.close()
        await plain.close()


STREAMS_IN_FLIGHT = 4  # files transferred at once, by both sides of the streaming comparison


async def _in_flight(rels: list[str], fn: Callable[[str], Awaitable[None]]) -> None:
    gate = asyncio.Semaphore(STREAMS_IN_FLIGHT)

    async def one(rel: str) -> None:
        async with gate:
            await fn(rel)

    await asyncio.gather(*(one(rel) for rel in rels))


async def _stream_figures(
    url: str, files_url: str, secret: str, shard_dir: Path, workdir: Path, rounds: int = 7
) -> dict[str, Any]:
    """Every manifest file fetched through the daemon's path (signed, digest-verified while
    received, installed by rename, one fsync per file in the background) against a plain
    aiohttp copy of the same files (no signature, no hash, no fsync), `STREAMS_IN_FLIGHT`
    at once each. Rounds alternate which goes first, each into fresh directories, and each
    starts once the other's background fsyncs are done (so neither pays for the other's
    disk work); the ratio is the rounds' median."""
    manifest = Manifest.load(shard_dir)
    rels = sorted(manifest.files)
    total = sum(int(manifest.files[r]["bytes"]) for r in rels)
    client = PeerClient(url, BENCH_NODE_ID, secret.encode())
    session = aiohttp.ClientSession()

    async def ours(target: Path) -> float:
        store = ShardStore(target)
        store.install_manifest((shard_dir / "manifest.json").read_bytes(), None)
        fetcher = ShardFetcher(store)
        t0 = time.perf_counter()
        await _in_flight(rels, lambda rel: fetcher.fetch(rel, [client]))
        took = time.perf_counter() - t0
        await asyncio.to_thread(store.sync_pending)  # done before the next copy starts
        return took

    async def plain(target: Path) -> float:
        async def copy(rel: str) -> None:
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            async with session.get(f"{files_url}/{rel}") as resp:
                with path.open("wb") as fh:
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        fh.write(chunk)

        t0 = time.perf_counter()
        await _in_flight(rels, copy)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"edgemoe": [], "plain": []}
    try:
        await client.hello()
        for i in range(rounds):
            order = (("edgemoe", ours), ("plain", plain))
            for name, run in order if i % 2 == 0 else order[::-1]:
                target = workdir / f"{name}-{i}"
                times[name].append(await run(target))
                await asyncio.to_thread(shutil.rmtree, target, True)
    finally:
        await client.close()
        await session.close()
    per_round = [p / o for o, p in zip(times["edgemoe"], times["plain"], strict=True)]
    return {
        "files": len(rels),
        "bytes": total,
        "rounds": rounds,
        "edgemoe_mb_per_s": total * rounds / sum(times["edgemoe"]) / 1e6,
        "plain_http_mb_per_s": total * rounds / sum(times["plain"]) / 1e6,
        "ratio_per_round": per_round,
        "ratio": statistics.median(per_round),
        "seconds": times,
    }


def _tokens_per_s(
    urls: list[str], token: str, model: str, prompts: int, max_tokens: int
) -> dict[str, float]:
    """One client per entry of `urls` sends `prompts` prompts one after another; all clients
    at once (the same URL may appear several times: one node, several clients)."""

    def work(url: str) -> tuple[int, float]:
        n = 0
        t0 = time.perf_counter()
        for i in range(prompts):
            out = _get(url + "/v1/completions", token, {
                "model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0})  # fmt: skip
            n += len(out["choices"][0]["token_ids"])
        return n, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(work, urls))
    wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in results)
    return {
        "nodes": len(set(urls)),
        "clients": len(urls),
        "tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall,
        "ms_per_token": wall / max(1, tokens) * 1e3 * len(urls),
        "per_request_tokens_per_s": statistics.fmean(n / s for n, s in results),
    }


class _PlainModel:
    """The plain transformers model in this process, one thread (as the daemons run), greedy:
    the reference the daemon's per-token latency is compared with."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def ms_per_token(self, prompts: int, max_tokens: int) -> float:
        """The same prompts as `_tokens_per_s`, one after another: wall ms per new token."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                tokens, t0 = 0, time.perf_counter()
                for i in range(prompts):
                    ids = self.tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt")[
                        "input_ids"
                    ]
                    out = self.model.generate(
                        ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=max_tokens, temperature=None, top_p=None, top_k=None,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )  # fmt: skip
                    tokens += out.shape[1] - ids.shape[1]
                return (time.perf_counter() - t0) / max(1, tokens) * 1e3
        finally:
            torch.set_num_threads(threads)


def _per_token_figures(
    url: str, token: str, model: str, model_dir: Path, prompts: int, max_tokens: int, rounds: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """One client of the node holding every expert against the plain model, side by side:
    each warmed by one whole generation first, then `rounds` interleaved rounds of the same
    prompts (a busy moment of the shared box hits both alike). Returns the node's figures over
    all its rounds and the comparison (per-round ms/token, their ratios, the median ratio)."""
    plain = _PlainModel(model_dir)
    _tokens_per_s([url], token, model, 1, max_tokens)
    plain.ms_per_token(1, max_tokens)
    runs, plain_ms = [], []
    for _ in range(rounds):
        runs.append(_tokens_per_s([url], token, model, prompts, max_tokens))
        plain_ms.append(plain.ms_per_token(prompts, max_tokens))
    wall = sum(r["tokens"] / r["aggregate_tokens_per_s"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    single = {
        "nodes": 1,
        "clients": 1,
        "tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall,
        "ms_per_token": wall / max(1, tokens) * 1e3,
        "per_request_tokens_per_s": statistics.fmean(r["per_request_tokens_per_s"] for r in runs),
    }
    per_round = [r["ms_per_token"] / p for r, p in zip(runs, plain_ms, strict=True)]
    compare = {
        "rounds": rounds,
        "daemon_ms_per_token": [r["ms_per_token"] for r in runs],
        "transformers_ms_per_token": plain_ms,
        "ratio_per_round": per_round,
        "ratio_median": statistics.median(per_round),
    }
    return single, compare


def ratios(figures: dict[str, Any]) -> dict[str, float]:
    """The four goal ratios of issue 14 from one run's figures (and the streaming ratio over a
    shaped link when it was measured)."""
    r, s, t = figures["rpc"], figures["streaming"], figures["tokens"]
    return {
        "rpc_p50_over_echo_plus_compute": r["rpc_rtt_ms_p50"]
        / (r["echo_rtt_ms_p50"] + r["compute_ms_p50"]),
        "stream_over_plain_http": s["ratio"],
        "batched_8_over_single_tokens_per_s": t["one_node_8_clients"]["aggregate_tokens_per_s"]
        / t["one_node_1_client"]["aggregate_tokens_per_s"],
        "daemon_all_local_over_transformers": t["per_token"]["ratio_median"],
    } | ({"stream_over_plain_http_link": figures["streaming_link"]["ratio"]}
         if "streaming_link" in figures else {})  # fmt: skip


def run_rpc_bench(
    workdir: Path,
    *,
    arch: str,
    rows: int,
    calls: int,
    scale: int,
    prompts: int,
    max_tokens: int,
    echo: Callable[[str], None],
    token_rounds: int = 3,
    link_mbps: float | None = None,
    link_delay_ms: float = 0.0,
) -> dict[str, Any]:
    """Run the comparisons; print them with `echo` and return the figures (with `ratios`).
    With `link_mbps` (root) the streaming comparison runs a second time over a shaped link
    between two namespaces (`testbed.stream`)."""
    from edgemoe.model.shard import shard_checkpoint
    from edgemoe.model.tiny import write_tiny_model

    workdir.mkdir(parents=True, exist_ok=True)
    secret, token = secrets.token_hex(32), secrets.token_urlsafe(24)
    model_dir = write_tiny_model(arch, workdir / "model", seed=0, scale=scale)
    manifest, _ = shard_checkpoint(model_dir, workdir / "shards")
    shard_dir = workdir / "shards"
    echo(
        f"model: {arch} x{scale}, {manifest.num_layers} MoE layers x {manifest.num_experts} "
        f"experts, expert {manifest.expert_bytes / 1e6:.2f} MB, hidden {manifest.hidden_size}"
    )
    run_id = secrets.token_hex(3)
    solo, url = _daemon(workdir, "solo", secret, token, model_dir=shard_dir, capacity="100%",
                        cluster_id=f"bench-solo-{run_id}", seeds=[])  # fmt: skip
    n_experts = manifest.num_layers * manifest.num_experts
    echo_port = _free_port()
    answer = len(pack({"out": tensor_to_wire(torch.zeros(rows, manifest.hidden_size))}))
    plain = _Proc([sys.executable, "-c", ECHO_SERVER, str(echo_port), str(answer),
                   str(shard_dir)], workdir / "plain.log")  # fmt: skip
    procs = [solo, plain]
    figures: dict[str, Any] = {}
    try:
        _wait(lambda: _holds_all(url, token, n_experts), 180, "the single node to load")
        base = f"http://127.0.0.1:{echo_port}"
        _wait(lambda: urllib.request.urlopen(base + "/files/manifest.json").status == 200, 30,
              "the plain HTTP server")  # fmt: skip
        pids = (solo.proc.pid, plain.proc.pid)
        figures["rpc"] = asyncio.run(
            _rpc_figures(url, base + "/echo", secret, manifest, shard_dir, rows, calls, pids)
        )
        r = figures["rpc"]
        echo(
            f"expert RPC, {rows} tokens ({r['request_bytes']} B out, {r['answer_bytes']} B back):"
            f" p50 {r['rpc_rtt_ms_p50']:.2f} ms vs echo {r['echo_rtt_ms_p50']:.2f} ms "
            f"(x{r['rtt_overhead_ratio']:.2f}; the expert computation alone takes "
            f"{r['compute_ms_p50']:.2f} ms); {r['rpc_calls_per_s']:.0f} vs "
            f"{r['echo_calls_per_s']:.0f} calls/s at 8 in flight (x{r['throughput_ratio']:.2f})"
        )
        echo(
            f"expert RPC sealed (ChaCha20-Poly1305) vs not: p50 {r['rpc_rtt_ms_p50']:.2f} ms vs "
            f"{r['rpc_unsealed_rtt_ms_p50']:.2f} ms (x{r['seal_ratio']:.2f})"
        )
        if "cpu_ratio" in r:
            echo(
                f"expert RPC CPU per call: daemon {r['rpc_server_cpu_ms']:.2f} ms (sealed and "
                f"not) + caller {r['rpc_caller_cpu_ms']:.2f} ms vs echo server "
                f"{r['echo_server_cpu_ms']:.2f} + echo client {r['echo_client_cpu_ms']:.2f} + "
                f"compute {r['compute_client_cpu_ms']:.2f} ms (x{r['cpu_ratio']:.2f}; the box's "
                "other load stretches CPU far less than wall time)"
            )
        figures["streaming"] = asyncio.run(
            _stream_figures(url, base + "/files", secret, shard_dir, workdir)
        )
        s = figures["streaming"]
        echo(
            f"shard streaming, {s['files']} files, {s['bytes'] / 1e6:.1f} MB, {s['rounds']} "
            f"alternating rounds: {s['edgemoe_mb_per_s']:.1f} MB/s verified vs plain HTTP copy "
            f"{s['plain_http_mb_per_s']:.1f} MB/s (no hash, no fsync); per round "
            f"{', '.join(f'x{r:.2f}' for r in s['ratio_per_round'])}, median x{s['ratio']:.2f}"
        )
        if link_mbps is not None:
            from edgemoe.daemon.testbed.stream import stream_over_link

            figures["streaming_link"] = k = stream_over_link(
                shard_dir, workdir, mbps=link_mbps, delay_ms=link_delay_ms
            )
            echo(
                f"shard streaming over a shaped link ({link_mbps:g} Mbit/s, {link_delay_ms:g} ms a"
                f" side, two namespaces): {k['edgemoe_mb_per_s']:.1f} MB/s verified vs plain "
                f"HTTP copy {k['plain_http_mb_per_s']:.1f} MB/s; per round "
                f"{', '.join(f'x{r:.2f}' for r in k['ratio_per_round'])}, median x{k['ratio']:.2f}"
            )
        model = _get(url + "/v1/models", token)["data"][0]["id"]
        single, per_token = _per_token_figures(url, token, model, model_dir, prompts,
                                               max_tokens, token_rounds)  # fmt: skip
        eight = _tokens_per_s([url] * 8, token, model, prompts, max_tokens)
        rounds_text = ", ".join(
            f"{d:.1f}/{p:.1f}" for d, p in zip(per_token["daemon_ms_per_token"],
                                              per_token["transformers_ms_per_token"], strict=True)
        )  # fmt: skip
        echo(
            f"one node holding all, {prompts} prompts x {max_tokens} tokens per client: 1 client "
            f"{single['aggregate_tokens_per_s']:.1f} tok/s; ms/token vs plain transformers in one "
            f"process, {token_rounds} interleaved rounds: {rounds_text} (median "
            f"x{per_token['ratio_median']:.2f}); 8 clients "
            f"{eight['aggregate_tokens_per_s']:.1f} tok/s aggregate "
            f"(x{eight['aggregate_tokens_per_s'] / single['aggregate_tokens_per_s']:.2f})"
        )
        solo.stop()
        cid = f"bench-{run_id}"
        nodes = [_daemon(workdir, "c0", secret, token, model_dir=shard_dir, capacity="40%",
                         cluster_id=cid, seeds=[])]  # fmt: skip
        seed_port = int(nodes[0][1].rsplit(":", 1)[1])
        nodes += [_daemon(workdir, f"c{i}", secret, token, model_dir=None, capacity="40%",
                          cluster_id=cid, seeds=[seed_port]) for i in (1, 2)]  # fmt: skip
        procs += [p for p, _ in nodes]
        urls = [u for _, u in nodes]
        _wait(lambda: all(_get(u + "/healthz")["ready"] for u in urls), 180, "the 3 nodes")
        _wait(lambda: _placed(urls, token, n_experts), 180, "a placement over 3 nodes")
        three = _tokens_per_s(urls, token, model, prompts, max_tokens)
        views = [_get(u + "/v1/cluster", token) for u in urls]
        three["local_share"] = statistics.fmean(v["local_share"] for v in views)
        three["remote_mb"] = sum(v["remote_bytes"] for v in views) / 1e6
        figures["tokens"] = {
            "one_node_1_client": single,
            "one_node_8_clients": eight,
            "per_token": per_token,
            "three_nodes": three,
        }
        figures["ratios"] = ratios(figures)
        echo(
            f"3 nodes (each 40% of the experts, one client each, {prompts} prompts x "
            f"{max_tokens} tokens): {three['aggregate_tokens_per_s']:.1f} tok/s aggregate, "
            f"{three['per_request_tokens_per_s']:.1f} per stream "
            f"(x{three['aggregate_tokens_per_s'] / single['aggregate_tokens_per_s']:.2f} of one "
            f"node with one client); local share {three['local_share']:.2f}, "
            f"{three['remote_mb']:.1f} MB of expert RPC"
        )
        for name, value in figures["ratios"].items():
            echo(f"ratio {name} = {value:.3f}")
    finally:
        for p in procs:
            p.stop()
    return figures


def _placed(urls: list[str], token: str, n_experts: int) -> bool:
    """All nodes on one epoch whose placement is in force (each announces what it is assigned,
    nothing is migrating), so the measurement does not include the migration."""
    views = [_get(u + "/v1/cluster", token) for u in urls]
    v = views[0]
    alive = [m["node_id"] for m in v["members"] if m["state"] == "alive"]
    held = {k for ks in v["holdings"].values() for k in ks}
    holders = v["placement"]["holders"]
    return (
        len(alive) == 3
        and v["epoch"] >= 1
        and len(held) == n_experts
        and all(
            v["holdings"].get(n)
            and set(v["holdings"][n]) == {k for k, h in holders.items() if n in h}
            for n in alive
        )
        and all(w["epoch"] == v["epoch"] and w["migration"]["pending"] == 0 for w in views)
    )
