"""Event-driven latency simulator of a serving cluster (seeded, deterministic).

Every server serves its own requests (Poisson arrivals). A request is a prefill step (its
prompt tokens as one batch) followed by one decode step per generated token; each step walks
the MoE layers in order. At a layer the origin runs the dense part (attention, router, shared
experts); then it sends the hidden states its remote experts need, computes its local experts,
and the layer ends when the last result is back.

Rules (each has a hand-computed test in tests/sim/):
- Compute: every server has one queue that work joins when it *arrives* (a message when its
  last byte is in, the origin's own work when it becomes ready); nothing is booked ahead, so
  a holder fills the time a message spends on the wire with other work.
- Shared cores (`Cluster.shared_cores`, off by default): servers that are processes on one
  machine share its cores; a busy server's rate is its speed times min(1, cores / busy
  servers), re-rated whenever a server starts or finishes a batch.
- Batching (`SimConstants.batching`, on by default as a batching daemon does): when a server
  becomes free it runs everything waiting as one batch, paying each layer's and each
  expert's fixed cost once (`SimConstants` documents the cost model); off: one item at a time.
- Calls cost both ends: the holder pays `message_s` per message it receives, the caller
  `caller_message_s` per call once its answer is back, each in its compute queue, and each
  end `byte_s` per byte of the request and of the answer (same size: a row per token).
- Network: a message crosses the sender's NIC egress, the pair link and the receiver's NIC
  ingress, each a FIFO resource with its own rate shared by all flows through it (cut-through:
  the slowest stage sets the pace), then half the round trip. FIFO is in send order.
- Migration copies are sent in chunks, one after another per copy, through the same NICs and
  links as serving traffic, so they compete with it; the new placement serves once every
  copy has landed (make-before-break).

Transports:
- ``per-server`` (ours): one message per destination server per step, carrying each token's
  hidden state once; the holder runs all of that token's experts it holds and returns one
  weighted sum per token.
- ``per-expert`` (the paper's system): one call per (token, expert), in prefill as in decode
  (as the daemon's per-expert transport makes them: a 44-token prompt is hundreds of calls);
  each call is its own message, paying `message_s` at the holder and `caller_message_s` at
  the caller.

Constants come in as `SimConstants`; from `edgemoe.placement` only the `Placement` data type is
used (a test checks the imports).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgemoe.placement.problem import Placement
from edgemoe.sim.constants import SimConstants

TRANSPORTS = ("per-server", "per-expert")
CHUNK_BYTES = 1 << 20  # migration copies go out in 1 MiB chunks that interleave with serving


@dataclass(frozen=True)
class Cluster:
    """The physical side: speeds, links, NICs (None: a NIC never limits)."""

    compute_speed: np.ndarray  # [S]
    rtt_s: np.ndarray  # [S, S]
    bandwidth_bps: np.ndarray  # [S, S] per pair link
    hidden_size: int
    activation_bytes: int = 2
    nic_egress_bps: np.ndarray | None = None  # [S]
    nic_ingress_bps: np.ndarray | None = None  # [S]
    # None: every server has its own processor. A number: the servers are processes on one
    # machine with that many cores (a namespace testbed): while more servers are busy than
    # there are cores, each runs at speed * cores / busy (processor sharing); fewer, at speed.
    shared_cores: float | None = None


@dataclass(frozen=True)
class Request:
    """One request: its server, arrival time and routed expert ids int [T, L, K]."""

    server: int
    arrival_s: float
    expert_ids: np.ndarray


@dataclass(frozen=True)
class Copy:
    """One expert copy of a migration: `nbytes` from `src` to `dst`."""

    src: int
    dst: int
    nbytes: int


@dataclass(frozen=True)
class Change:
    """At `time_s`, start copying `copies`; `placement` serves once all have landed."""

    time_s: float
    placement: Placement
    copies: list[Copy]


@dataclass
class SimResult:
    """What one simulation measured."""

    latencies_s: np.ndarray
    bytes_between_servers: int
    local_pairs: int
    total_pairs: int
    migration_bytes: int = 0
    per_server_latency_s: dict[int, float] = field(default_factory=dict)
    switched_at_s: float | None = None
    # per request, arrival to the end of its prefill step (its first token): with the
    # latency, splits a request into prefill and decode as a testbed measures it
    first_token_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # per server, the compute seconds it was charged (at speed 1.0): what a testbed's CPU
    # seconds per node measure
    work_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # mean time from a remote call's dispatch to its answer processed by the caller (what
    # the daemon's edgemoe_expert_call_seconds measures), 0.0 without remote calls
    remote_call_mean_s: float = 0.0

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


# A work item in a compute queue: (layer, dense tokens, experts, rows, message seconds, done,
# arg). `experts` are the expert ids of `layer` it runs; `done` says what its completion
# triggers: the origin's dispatch, a local part done, a holder's answer sent, or (_ANSWER) the
# caller's handling of an answer done.
_DENSE, _LOCAL, _REMOTE, _ANSWER = 0, 1, 2, 3
# events: (time, seq, kind, a, b)
_EV_STEP, _EV_FREE, _EV_ARRIVE, _EV_RETURN, _EV_CHUNK = 0, 1, 2, 3, 4


class _Net:
    """NIC egress -> pair link -> NIC ingress, FIFO in send order, cut-through."""

    def __init__(self, cluster: Cluster) -> None:
        S = len(cluster.compute_speed)
        self.bw = np.asarray(cluster.bandwidth_bps, dtype=np.float64).tolist()
        self.half = (np.asarray(cluster.rtt_s, dtype=np.float64) / 2).tolist()
        inf = [float("inf")] * S
        eg, ig = cluster.nic_egress_bps, cluster.nic_ingress_bps
        self.eg = inf if eg is None else [float(x) for x in eg]
        self.ig = inf if ig is None else [float(x) for x in ig]
        self.eg_free = [0.0] * S
        self.ig_free = [0.0] * S
        self.link_free = [[0.0] * S for _ in range(S)]

    def send(self, t: float, s: int, d: int, nbytes: int) -> float:
        """Time the message's last byte reaches d (after half the round trip)."""
        bits = nbytes * 8.0
        s1 = max(t, self.eg_free[s])
        f = s1 + bits / self.eg[s]
        self.eg_free[s] = f
        s2 = max(s1, self.link_free[s][d])
        f = max(f, s2 + bits / self.bw[s][d])
        self.link_free[s][d] = f
        s3 = max(s2, self.ig_free[d])
        f = max(f, s3 + bits / self.ig[d])
        self.ig_free[d] = f
        return f + self.half[s][d]


def _batch_cost(items: list[tuple], c: SimConstants) -> float:
    layers: set[int] = set()
    experts: set[tuple[int, int]] = set()
    tokens = rows = 0
    msg_s = 0.0
    for layer, tok, ids, r, m, _, _ in items:
        if tok:
            layers.add(layer)
            tokens += tok
        if ids:
            experts.update((layer, e) for e in ids)
            rows += r
        msg_s += m
    return (len(layers) * c.dense_fixed_s + tokens * c.dense_token_s
            + len(experts) * c.expert_fixed_s + rows * c.expert_row_s + msg_s)


def _group(ids: list[list[int]], dest: list[list[int]], s: int
           ) -> tuple[dict[int, dict[int, int]], dict[int, int], int, int]:
    """Per destination {expert: rows} and tokens; fully local tokens; all tokens."""
    if len(ids) == 1:  # a decode step (most calls): one token
        one: dict[int, dict[int, int]] = {}
        for e, d in zip(ids[0], dest[0], strict=True):
            if d in one:
                one[d][e] = one[d].get(e, 0) + 1
            else:
                one[d] = {e: 1}
        return one, dict.fromkeys(one, 1), int(len(one) == 1 and s in one), 1
    by: dict[int, dict[int, int]] = {}
    tok: dict[int, int] = {}
    fully = 0
    for row_e, row_d in zip(ids, dest, strict=True):
        seen = set()
        for e, d in zip(row_e, row_d, strict=True):
            m = by.setdefault(d, {})
            m[e] = m.get(e, 0) + 1
            if d not in seen:
                seen.add(d)
                tok[d] = tok.get(d, 0) + 1
        if seen == {s}:
            fully += 1
    return by, tok, fully, len(ids)


def simulate(cluster: Cluster, placement: Placement, requests: list[Request], *,
             transport: str = "per-server", constants: SimConstants | None = None,
             changes: list[Change] | None = None) -> SimResult:
    """Run every request to completion and measure latency, bytes and locality."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    c = constants or SimConstants()
    per_server = transport == "per-server"
    S = len(cluster.compute_speed)
    speed = [float(x) for x in cluster.compute_speed]
    msg = cluster.hidden_size * cluster.activation_bytes
    net = _Net(cluster)
    queue: list[deque] = [deque() for _ in range(S)]
    running: list[list[tuple] | None] = [None] * S
    work = [0.0] * S
    cores = cluster.shared_cores
    if cores is not None and not cores > 0:
        raise ValueError(f"shared_cores must be > 0, got {cores}")
    # shared cores: per busy server its work left, when that was counted, its rate, and the
    # version of its pending _EV_FREE (an older one is stale after a re-rate)
    left = [0.0] * S
    since = [0.0] * S
    rate = [0.0] * S
    version_of = [0] * S
    busy: set[int] = set()

    def rerate(t: float) -> None:
        share = min(1.0, cores / len(busy)) if busy else 1.0  # type: ignore[operator]
        for srv in busy:
            left[srv] = max(left[srv] - (t - since[srv]) * rate[srv], 0.0)
            since[srv] = t
            new = speed[srv] * share
            if new != rate[srv]:
                rate[srv] = new
                version_of[srv] += 1
                push(t + left[srv] / new, _EV_FREE, srv, version_of[srv])
    heap: list[tuple[float, int, int, int, object]] = []
    seq = 0

    def push(t: float, kind: int, a: int, b: object = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, a, b))

    def enqueue(t: float, srv: int, item: tuple) -> None:
        queue[srv].append(item)
        if running[srv] is None:
            start(t, srv)

    def start(t: float, srv: int) -> None:
        q = queue[srv]
        if c.batching:
            batch = list(q)
            q.clear()
        else:
            batch = [q.popleft()]
        running[srv] = batch
        cost = _batch_cost(batch, c)
        work[srv] += cost
        if cores is None:
            push(t + cost / speed[srv], _EV_FREE, srv, 0)
            return
        busy.add(srv)
        left[srv], since[srv], rate[srv] = cost, t, 0.0
        rerate(t)

    n = len(requests)
    prompts = [min(max(int(len(r.expert_ids) * c.prompt_fraction), 1), len(r.expert_ids))
               for r in requests]
    ids_l = [None] * n  # expert ids as nested lists, made on first step
    dest_l: list[list | None] = [None] * n
    block = [0] * n
    layer = [0] * n
    pending = [0] * n
    latency = np.zeros(n)
    first_token = np.zeros(n)
    sent_at = np.zeros(n)  # when request i's current layer sent its remote calls
    call_time = [0.0, 0]  # summed dispatch-to-answer seconds, calls answered
    counters = {"bytes": 0, "local": 0, "total": 0, "migration": 0}
    active = placement
    plan_version = [0] * n
    version = 0
    pending_change: list[Change] = sorted(changes or [], key=lambda ch: ch.time_s)
    copies_left = 0
    switched_at: float | None = None
    target: Placement | None = None

    for i, r in enumerate(requests):
        push(r.arrival_s, _EV_STEP, i)
    for ch in pending_change:
        push(ch.time_s, _EV_CHUNK, -1, ch)

    def dense(t: float, i: int) -> None:
        r = requests[i]
        if ids_l[i] is None or plan_version[i] != version:
            ids_l[i] = ids_l[i] or r.expert_ids.tolist()
            route = active.route[r.server]
            dest_l[i] = route[np.arange(r.expert_ids.shape[1])[None, :, None],
                              r.expert_ids].tolist()
            plan_version[i] = version
        tok = prompts[i] if block[i] == 0 else 1
        enqueue(t, r.server, (layer[i], tok, (), 0, 0, _DENSE, i))

    def step_rows(i: int) -> tuple[list, list]:
        l = layer[i]
        rows = range(prompts[i]) if block[i] == 0 else [prompts[i] + block[i] - 1]
        ids, dst = ids_l[i], dest_l[i]
        return [ids[t][l] for t in rows], [dst[t][l] for t in rows]

    def dispatch(t: float, i: int) -> None:
        """Dense part done: send to holders, run local experts."""
        s = requests[i].server
        l = layer[i]
        ids, dst = step_rows(i)
        by, tok, fully, total = _group(ids, dst, s)
        counters["local"] += fully
        counters["total"] += total
        waits = 0
        for d, experts in by.items():
            if d == s:
                enqueue(t, s, (l, 0, tuple(experts), sum(experts.values()), 0, _LOCAL, i))
                waits += 1
                continue
            if per_server:
                out = tok[d] * msg
                arrive = net.send(t, s, d, out)
                counters["bytes"] += out
                push(arrive, _EV_ARRIVE, d, (l, 0, tuple(experts), sum(experts.values()),
                                             c.message_s + 2 * out * c.byte_s, _REMOTE,
                                             (i, out)))  # fmt: skip
                waits += 1
            else:
                for e, rows in experts.items():  # one call per (token, expert), prefill too
                    for _ in range(rows):
                        arrive = net.send(t, s, d, msg)
                        counters["bytes"] += msg
                        push(arrive, _EV_ARRIVE, d, (l, 0, (e,), 1,
                                                     c.message_s + 2 * msg * c.byte_s,
                                                     _REMOTE, (i, msg)))  # fmt: skip
                        waits += 1
        pending[i] = waits
        sent_at[i] = t
        if waits == 0:
            layer_done(t, i)

    def layer_done(t: float, i: int) -> None:
        r = requests[i]
        L = r.expert_ids.shape[1]
        if layer[i] + 1 < L:
            layer[i] += 1
            dense(t, i)
            return
        if block[i] == 0:
            first_token[i] = t - r.arrival_s
        if block[i] < len(r.expert_ids) - prompts[i]:
            block[i] += 1
            layer[i] = 0
        else:
            latency[i] = t - r.arrival_s
            ids_l[i] = dest_l[i] = None
            return
        dense(t, i)

    def send_chunk(t: float, cp: Copy, left: int) -> None:
        """The next chunk goes out when the last one has been serialised (a full pipe)."""
        part = min(CHUNK_BYTES, left)
        arrive = net.send(t, cp.src, cp.dst, part)
        counters["migration"] += part
        if left > part:
            push(arrive - net.half[cp.src][cp.dst], _EV_CHUNK, 0, (cp, left - part))
        else:
            push(arrive, _EV_CHUNK, 0, (cp, 0))

    def answered(t: float, i: int) -> None:
        call_time[0] += t - sent_at[i]
        call_time[1] += 1

    def part_done(t: float, i: int) -> None:
        pending[i] -= 1
        if pending[i] == 0:
            layer_done(t, i)

    while heap:
        t, _, kind, a, b = heapq.heappop(heap)
        if kind == _EV_STEP:
            dense(t, a)
        elif kind == _EV_FREE:
            if cores is not None:
                if b != version_of[a]:
                    continue  # re-rated since: a later event ends this batch
                busy.discard(a)
                rate[a] = 0.0
            batch = running[a]
            assert batch is not None
            running[a] = []  # busy while its continuations run, so they batch together
            for item in batch:
                what, arg = item[5], item[6]
                if what == _DENSE:
                    dispatch(t, arg)
                elif what in (_LOCAL, _ANSWER):
                    if what == _ANSWER:
                        answered(t, arg)
                    part_done(t, arg)
                else:
                    i, back = arg
                    s = requests[i].server
                    counters["bytes"] += back
                    push(net.send(t, a, s, back), _EV_RETURN, i, back)
            running[a] = None
            if queue[a]:
                start(t, a)
            elif cores is not None:
                rerate(t)  # one fewer busy: the others speed up
        elif kind == _EV_ARRIVE:
            enqueue(t, a, b)  # type: ignore[arg-type]
        elif kind == _EV_RETURN:
            # the caller writes the request and reads the answer: both the same size
            opened = c.caller_message_s + 2 * b * c.byte_s  # type: ignore[operator]
            if opened > 0:
                enqueue(t, requests[a].server, (layer[a], 0, (), 0, opened, _ANSWER, a))
            else:
                answered(t, a)
                part_done(t, a)
        else:  # migration: a change starts (a == -1) or a copy's chunk has landed
            if a == -1:
                ch = b  # type: ignore[assignment]
                target = ch.placement
                copies_left = len(ch.copies)
                for cp in ch.copies:
                    send_chunk(t, cp, cp.nbytes)
                if copies_left == 0:
                    active, version = target, version + 1
                    switched_at = t
            else:
                cp, left = b  # type: ignore[misc]
                if left > 0:
                    send_chunk(t, cp, left)
                else:
                    copies_left -= 1
                    if copies_left == 0 and target is not None:
                        active, version = target, version + 1
                        switched_at = t

    servers = np.array([r.server for r in requests])
    by_server = {s: float(latency[servers == s].mean()) for s in range(S)
                 if (servers == s).any()}
    return SimResult(latency, counters["bytes"] + counters["migration"], counters["local"],
                     counters["total"], counters["migration"], by_server, switched_at,
                     first_token, np.array(work),
                     call_time[0] / call_time[1] if call_time[1] else 0.0)
