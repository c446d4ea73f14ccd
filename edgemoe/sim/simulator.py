"""Event-driven latency simulator of a serving cluster (seeded, deterministic).

Every server serves its own requests (Poisson arrivals). A request is a prefill step (its
prompt tokens as one batch) followed by one decode step per generated token; each step walks
the MoE layers in order. At a layer the origin server runs the dense part and shared experts
(its compute queue), sends the hidden states its remote experts need (link s->d, FIFO,
serialised by bandwidth, half the round trip each way), the holder computes them (its compute
queue) and sends results back; meanwhile the origin computes its local experts. The layer ends
when the slowest part returns: that is what a decode step waits for.

Transports:
- ``per-server`` (ours): one message per destination server per step, carrying each token's
  hidden state once; the holder runs all of that token's experts it holds and returns one
  weighted sum per token.
- ``per-expert`` (the paper's system): one call per (token, expert); each carries the hidden
  state and returns that expert's output, and each call pays the per-call overhead.

Events are layer steps, processed in time order from a heap; a step reserves the queues it
touches when it starts (FIFO in dispatch order, a standard simplification).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from edgemoe.placement.migration import Move
from edgemoe.placement.problem import Placement

TRANSPORTS = ("per-server", "per-expert")


@dataclass(frozen=True)
class Cluster:
    """The physical side the simulator needs (a subset of a placement Problem)."""

    compute_speed: np.ndarray  # [S]
    rtt_s: np.ndarray  # [S, S]
    bandwidth_bps: np.ndarray  # [S, S]
    hidden_size: int
    activation_bytes: int = 2


@dataclass(frozen=True)
class Timing:
    """Compute times at speed 1.0 (seconds)."""

    dense_step_s: float = 2e-4  # dense part of one layer, per step
    dense_token_s: float = 2e-5  # plus per token in the step (prefill batches)
    expert_s: float = 5e-5  # one expert's weights streamed once per step that uses it
    expert_token_s: float = 2e-6  # plus per (token, expert) pair
    call_overhead_s: float = 1e-4  # handling one message at the receiver
    prompt_fraction: float = 0.5  # share of a request's tokens that form its prompt


@dataclass(frozen=True)
class Request:
    """One request: its server, arrival time and routed expert ids int [T, L, K]."""

    server: int
    arrival_s: float
    expert_ids: np.ndarray


@dataclass(frozen=True)
class Change:
    """At `time_s`, migrate to `placement` by copying `moves` (make-before-break)."""

    time_s: float
    placement: Placement
    moves: list[Move]
    expert_bytes: int


@dataclass
class SimResult:
    """What one simulation measured."""

    latencies_s: np.ndarray
    bytes_between_servers: int
    local_pairs: int
    total_pairs: int
    migration_bytes: int = 0
    per_server_latency_s: dict[int, float] = field(default_factory=dict)

    @property
    def mean_s(self) -> float:
        return float(self.latencies_s.mean()) if len(self.latencies_s) else 0.0

    @property
    def p50_s(self) -> float:
        return float(np.percentile(self.latencies_s, 50)) if len(self.latencies_s) else 0.0

    @property
    def p99_s(self) -> float:
        return float(np.percentile(self.latencies_s, 99)) if len(self.latencies_s) else 0.0

    @property
    def local_share(self) -> float:
        return self.local_pairs / self.total_pairs if self.total_pairs else 0.0


def poisson_requests(streams: list[list[np.ndarray]], rate_per_s: np.ndarray,
                     seed: int) -> list[Request]:
    """Requests of every server with exponential inter-arrival times (seeded)."""
    rng = np.random.default_rng(seed)
    out: list[Request] = []
    for s, reqs in enumerate(streams):
        gaps = rng.exponential(1.0 / float(rate_per_s[s]), size=len(reqs))
        times = np.cumsum(gaps)
        out.extend(Request(s, float(t), ids) for t, ids in zip(times, reqs, strict=True))
    return out


class _Plan:
    """Dispatch of one request under one placement: prefill per layer, decode per token."""

    __slots__ = ("decode_counts", "prefill")

    def __init__(self, ids: np.ndarray, prompt: int, route_s: np.ndarray, s: int,
                 transport: str, S: int) -> None:
        _T, L, K = ids.shape
        dest = route_s[np.arange(L)[None, :, None], ids]  # [T, L, K]
        # prefill: (tokens, local distinct, local pairs, dests, fully local tokens) per layer
        self.prefill: list[tuple[int, int, int, list[tuple[int, int, int, int, int, int]], int]]
        self.prefill = []
        pd, pe = dest[:prompt], ids[:prompt]
        for l in range(L):
            d_l, e_l = pd[:, l], pe[:, l]
            local = d_l == s
            loc = int(local.sum())
            dests = []
            if loc < prompt * K:
                for d in np.unique(d_l[~local]).tolist():
                    m = d_l == d
                    pairs = int(m.sum())
                    distinct = len(np.unique(e_l[m]))
                    tok = int(m.any(1).sum())
                    if transport == "per-server":
                        dests.append((d, 1, tok, tok, distinct, pairs))
                    else:  # one call per expert carrying its tokens; outputs per pair
                        dests.append((d, distinct, pairs, pairs, distinct, pairs))
            distinct_loc = len(np.unique(e_l[local])) if loc else 0
            self.prefill.append((prompt, distinct_loc, loc, dests, int(local.all(1).sum())))
        # decode: remote (token, expert) counts per destination, [T - prompt][L][S]
        dec = dest[prompt:]
        cnt = (dec[..., None] == np.arange(S)).sum(2)  # [n, L, S]
        cnt[..., s] = 0
        self.decode_counts: list[list[list[int]]] = cnt.tolist()


def simulate(cluster: Cluster, placement: Placement, requests: list[Request], *,
             transport: str = "per-server", timing: Timing | None = None,
             changes: list[Change] | None = None) -> SimResult:
    """Run every request to completion and measure latency, bytes and locality."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    tm = timing or Timing()
    S = len(cluster.compute_speed)
    speed = [float(x) for x in cluster.compute_speed]
    rtt = np.asarray(cluster.rtt_s, dtype=np.float64).tolist()
    bw = np.asarray(cluster.bandwidth_bps, dtype=np.float64).tolist()
    msg = cluster.hidden_size * cluster.activation_bytes
    per_server = transport == "per-server"
    free = [0.0] * S
    link = [[0.0] * S for _ in range(S)]
    pending = sorted(changes or [], key=lambda c: c.time_s)
    active = placement
    activate_at: float | None = None
    next_placement: Placement | None = None
    total_bytes = 0
    migration_bytes = 0
    local_pairs = 0
    total_pairs = 0
    heap: list[tuple[float, int, int, int, int]] = []  # (time, seq, request, block, layer)
    prompts = []
    for i, r in enumerate(requests):
        T = len(r.expert_ids)
        prompts.append(min(max(int(T * tm.prompt_fraction), 1), T))
        heapq.heappush(heap, (r.arrival_s, i, i, 0, 0))
    seq = len(requests)
    latency = np.zeros(len(requests))
    plans: dict[int, _Plan] = {}

    while heap:
        t, _, i, b, l = heapq.heappop(heap)
        while pending and pending[0].time_s <= t:
            ch = pending.pop(0)
            done_at = ch.time_s
            for mv in ch.moves:
                if mv.kind != "copy":
                    continue
                start = max(ch.time_s, link[mv.src][mv.dst])
                end = start + mv.bytes * 8.0 / bw[mv.src][mv.dst]
                link[mv.src][mv.dst] = end
                done_at = max(done_at, end + rtt[mv.src][mv.dst])
                migration_bytes += mv.bytes
            next_placement, activate_at = ch.placement, done_at
        if activate_at is not None and next_placement is not None and t >= activate_at:
            active, next_placement, activate_at = next_placement, None, None
            plans.clear()  # routes changed: replan requests at their next step
        r = requests[i]
        s = r.server
        plan = plans.get(i)
        if plan is None:
            plan = plans[i] = _Plan(r.expert_ids, prompts[i], active.route[s], s, transport, S)
        if b == 0:
            n_tok, loc_distinct, loc, dests, fully = plan.prefill[l]
        else:
            row = plan.decode_counts[b - 1][l]
            K = r.expert_ids.shape[2]
            if per_server:
                dests = [(d, 1, 1, 1, c, c) for d, c in enumerate(row) if c]
            else:
                dests = [(d, c, c, c, c, c) for d, c in enumerate(row) if c]
            n_tok = 1
            loc = loc_distinct = K - sum(row)
            fully = int(loc == K)
        # dense part (and shared experts) on the origin
        t0 = max(t, free[s]) + (tm.dense_step_s + tm.dense_token_s * n_tok) / speed[s]
        free[s] = t0
        done = t0
        for d, msgs, out_v, back_v, distinct, pairs in dests:
            nbytes = out_v * msg
            ts = max(t0, link[s][d]) + nbytes * 8.0 / bw[s][d]
            link[s][d] = ts
            arrive = ts + rtt[s][d] / 2
            work = msgs * tm.call_overhead_s + distinct * tm.expert_s + pairs * tm.expert_token_s
            tc = max(arrive, free[d]) + work / speed[d]
            free[d] = tc
            back = back_v * msg
            tb = max(tc, link[d][s]) + back * 8.0 / bw[d][s]
            link[d][s] = tb
            done = max(done, tb + rtt[d][s] / 2)
            total_bytes += nbytes + back
        if loc:
            work = loc_distinct * tm.expert_s + loc * tm.expert_token_s
            tl = max(t0, free[s]) + work / speed[s]
            free[s] = tl
            done = max(done, tl)
        local_pairs += fully
        total_pairs += n_tok
        seq += 1
        L = r.expert_ids.shape[1]
        if l + 1 < L:
            heapq.heappush(heap, (done, seq, i, b, l + 1))
        elif b < len(r.expert_ids) - prompts[i]:
            heapq.heappush(heap, (done, seq, i, b + 1, 0))
        else:
            latency[i] = done - r.arrival_s
            plans.pop(i, None)
    by_server: dict[int, float] = {}
    servers = np.array([r.server for r in requests])
    for s in range(S):
        m = servers == s
        if m.any():
            by_server[s] = float(latency[m].mean())
    return SimResult(latency, int(total_bytes + migration_bytes), local_pairs, total_pairs,
                     migration_bytes, by_server)
