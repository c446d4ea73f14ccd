"""The simulator beside the testbed: edgemoe.sim's prediction of the very run just measured.

Same nodes, capacities (through the placement the daemons decided), links (per-node NIC rate
each way, 2 x the one-way delay per round trip), transport, and the same replayed rows: each
node's requests are built by the daemon's own replay (`load_replay`), request after request
from index 0, so the sim's request j of node i routes exactly as the daemon's did. Constants
come from `edgemoe.bench.calibrate` run first, here, at the testbed model's shape.

What edgemoe.sim does not take, wrapped here: (1) the testbed's clients are closed loops
(each node sends its next request when the last one ends), the simulator takes arrival
times, so arrivals are iterated to a fixed point (arrival j+1 = end of request j); (2) the
daemons' routing choice for a replicated expert is not in /v1/cluster, so a remote expert is
routed to its first listed holder; (3) nodes share this machine's cores: each simulated
server runs at speed min(1, cores / nodes), the constants measured on one thread as each
daemon runs (OMP_NUM_THREADS=1); (4) calibrate's `message_s` is a bare signed msgpack
echo: the cost of one message through the daemons' wire (sealed bodies, signed headers,
batching worker) is measured on the testbed itself (`with_wire_cost`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.sim.constants import SimConstants

FIXED_POINT_ROUNDS = 30
FIXED_POINT_TOLERANCE_S = 1e-3
MIN_CORES = 0.25  # a floor for the cores left to the testbed (other load measured very high)


def calibrate_for(shards: Path) -> SimConstants:
    """`bench calibrate` at the shape of the testbed's model (its hidden size, expert width,
    shared experts, top-k, attention and dtype), on one thread as the daemons run, timed in
    that thread's CPU seconds: the work alone, which a loaded box does not inflate (wall
    time under load measured dense costs 10-20x the quiet figure); the simulator's shared
    cores, given the load measured beside each strategy, price the contention."""
    import time

    import torch

    from edgemoe.bench.calibrate import LITE_ATTENTION, calibrate
    from edgemoe.model.manifest import Manifest
    from edgemoe.model.tiny import TinyShape

    cfg = Manifest.load(shards).config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return calibrate(TinyShape(
            layers=2, experts=8, top_k=int(cfg["num_experts_per_tok"]),
            shared_experts=int(cfg.get("n_shared_experts") or 0),
            hidden_size=int(cfg["hidden_size"]), expert_width=int(cfg["moe_intermediate_size"]),
        ), str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), repeat=3,
            attention={k: cfg[k] for k in LITE_ATTENTION if k in cfg},
            clock=time.thread_time)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def with_wire_cost(c: SimConstants, call_s: float, rtt_s: float) -> SimConstants:
    """`c` with the per-call costs from a one-row expert call through the daemons' own wire
    (its round trip less the link's and the expert's compute): calibrate measures a bare
    signed msgpack echo, which leaves out the daemons' sealing, request signing and batching
    worker. The call's cost is split evenly between the holder (`message_s`) and the caller
    (`caller_message_s`), as the daemons' CPU seconds split it (fit: 1.3 ms served, 1.1 made)."""
    wire = call_s - rtt_s - c.expert_fixed_s - c.expert_row_s
    if not wire > c.message_s + c.caller_message_s:  # nan or below the bare echo: keep
        return c
    return c.with_call_cost(wire, f"{c.source}; per-call costs: testbed expert call")


def fit_call_costs(c: SimConstants, rows: Sequence[tuple[float, float, float, float]]
                   ) -> SimConstants:  # fmt: skip
    """`c` with `caller_message_s`, `message_s` and `byte_s` fitted by least squares to the
    testbed's own CPU: one row per node and strategy, (CPU seconds of its daemon and delay
    helper less the compute the simulator charges it, calls it made, calls it served, bytes
    of hidden states its calls moved: both ways, made and served), with an intercept for what
    follows none of them (gossip, the generation loop). The daemons' CPU is the measurement
    the simulator lacks: a probe call times one call on an idle cluster, not what thousands
    cost under load. On quiet runs the bytes term cut the fit's residual 3x (0.22-0.36 s to
    0.08-0.11 s a node): the strategies that move twice the bytes (dancemoe, eplb) spend
    CPU the per-call costs alone did not price. Without enough distinct rows, or with a
    negative coefficient, the bytes are left out (`byte_s` 0); `c` unchanged when the calls
    alone cannot be fitted either."""
    y = np.array([r[0] for r in rows], dtype=np.float64)
    for columns in (3, 2):  # calls and bytes, then calls alone
        if len(rows) < columns + 2:
            continue
        x = np.array([[1.0, *r[1 : 1 + columns]] for r in rows], dtype=np.float64)
        if np.linalg.matrix_rank(x) < columns + 1:
            continue
        coef = np.linalg.lstsq(x, y, rcond=None)[0][1:]
        if not (coef >= 0).all():
            continue
        made, served, per_byte = (*coef, 0.0)[:3]
        return dataclasses.replace(
            c, caller_message_s=float(made), message_s=float(served), byte_s=float(per_byte),
            source=f"{c.source.split('; ')[0]}; per-call costs: fit of {len(rows)} node CPU "
                   f"rows{', with bytes' if columns == 3 else ''}")  # fmt: skip
    return c


def placement_of(view: dict[str, Any], node_ids: Sequence[str], layers: int,
                 experts: int) -> Any:  # fmt: skip
    """The decided placement of /v1/cluster as edgemoe's `Placement` (node i = namespace i)."""
    from edgemoe.placement.problem import Placement

    index = {n: i for i, n in enumerate(node_ids)}
    S = len(node_ids)
    holders = np.zeros((S, layers, experts), dtype=bool)
    first = np.full((layers, experts), -1, dtype=np.int64)
    for key, names in view["placement"]["holders"].items():
        layer, expert = (int(x) for x in key.split("/"))
        for name in names:
            holders[index[name], layer, expert] = True
        first[layer, expert] = index[names[0]]
    route = np.where(holders, np.arange(S)[:, None, None], first[None, :, :])
    return Placement(holders=holders, route=route, strategy=view["placement"]["strategy"])


def replayed_requests(trace: Path, streams: Sequence[str], shards: Path, skip: int,
                      count: int, prompt_tokens: int, tokens: int) -> list[list[np.ndarray]]:
    """Per node, its requests skip..skip+count-1 as the daemon replays them: expert ids
    [prompt_tokens + tokens - 1, layers, top_k] (the prefill's rows, then one per decode
    step: the first generated token comes from the prefill)."""
    import torch

    from edgemoe.daemon.replay import load_replay
    from edgemoe.model.manifest import Manifest

    manifest = Manifest.load(shards)
    out = []
    for stream in streams:
        replay = load_replay(trace, stream, manifest)
        node = []
        for j in range(skip + count):
            with replay.request():
                steps = [prompt_tokens] + [1] * (tokens - 1)
                rows = [np.stack([replay.route(layer, n, device=torch.device("cpu"),
                                               dtype=torch.float32)[0].numpy()
                                  for layer in range(manifest.num_layers)], axis=1)
                        for n in steps]  # fmt: skip
            if j >= skip:
                node.append(np.concatenate(rows).astype(np.int64))
        out.append(node)
    return out


@dataclass(frozen=True)
class Predicted:
    """edgemoe.sim's figures for one strategy's measured window."""

    request_mean_s: float
    first_token_mean_s: float
    decode_step_mean_s: float
    work_s: np.ndarray  # per node, compute seconds charged (at speed 1.0)
    remote_call_mean_s: float  # a remote call, dispatch to answer


def simulated_latency(
    placement: Any, requests: list[list[np.ndarray]], *, constants: SimConstants,
    bandwidth_mbps: float | None, delay_ms: float, hidden_size: int, activation_bytes: int,
    transport: str, prompt_tokens: int, cores: float | None = None,
) -> Predicted:
    """What edgemoe.sim predicts for closed-loop clients (one per node). `cores`: the CPU
    the testbed's processes had (the machine's cores less what other load took): the
    simulated servers share them (`Cluster.shared_cores`), as the namespaces' daemons do."""
    from edgemoe.sim.simulator import Cluster, Request, simulate

    S = len(requests)
    rtt = np.full((S, S), 2 * delay_ms / 1000.0)
    np.fill_diagonal(rtt, 0.0)
    nic = None if not bandwidth_mbps else np.full(S, bandwidth_mbps * 1e6)
    cores = float(os.cpu_count() or 1) if cores is None else max(cores, MIN_CORES)
    cluster = Cluster(
        compute_speed=np.ones(S), rtt_s=rtt, bandwidth_bps=np.full((S, S), np.inf),
        hidden_size=hidden_size, activation_bytes=activation_bytes, nic_egress_bps=nic,
        nic_ingress_bps=nic, shared_cores=cores,
    )  # fmt: skip
    length = len(requests[0][0])
    c = dataclasses.replace(constants, prompt_fraction=min(prompt_tokens / length, 0.999))
    arrivals = [np.zeros(len(reqs)) for reqs in requests]
    for _ in range(FIXED_POINT_ROUNDS):
        reqs = [Request(i, float(arrivals[i][j]), ids)
                for i, node in enumerate(requests) for j, ids in enumerate(node)]  # fmt: skip
        res = simulate(cluster, placement, reqs, transport=transport, constants=c)
        moved = 0.0
        k = 0
        for i, node in enumerate(requests):
            ends = arrivals[i] + res.latencies_s[k : k + len(node)]
            nxt = np.concatenate([[0.0], ends[:-1]])
            moved = max(moved, float(np.abs(nxt - arrivals[i]).max()))
            arrivals[i] = nxt
            k += len(node)
        if moved < FIXED_POINT_TOLERANCE_S:
            break
    steps = max(length - prompt_tokens, 1)
    return Predicted(res.mean_s, float(res.first_token_s.mean()),
                     float(((res.latencies_s - res.first_token_s) / steps).mean()), res.work_s,
                     res.remote_call_mean_s)
