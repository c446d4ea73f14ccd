"""Placement benchmark: every strategy on the same scenario, inputs and seed, in one run.

A scenario gives each server one stream; the first half of every stream's requests is the
profiling window (counts and the co-activation sample the strategies see), the second half is
replayed through the simulator. Plain strategy names use our per-server transport;
``<name>+per-expert`` is the same placement with the paper's per-expert calls.

Load is a share of each server's saturating rate, defined from work no strategy can change:
a request's dense and expert compute with every expert local and no batching
(`request_work_s`), so 1.0 keeps a server's compute busy all the time even before any
remote call. `edgemoe` may pick among candidate placements (its own, `balanced`, the
`spread` variants and the baselines' own placements) by simulating draws of the profiling
window (never the test window): the simulator reaches it as an injected judge
(`profile_judge`), so edgemoe.placement never imports edgemoe.sim.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from edgemoe.placement import STRATEGIES, get_strategy
from edgemoe.placement.dancemoe import DanceMoE
from edgemoe.placement.instances import random_problem
from edgemoe.placement.latency import LatencyAware
from edgemoe.placement.migration import plan_migration
from edgemoe.placement.problem import Placement, PlacementError, Problem, objective
from edgemoe.sim.constants import SimConstants
from edgemoe.sim.simulator import (
    Change,
    Cluster,
    Copy,
    Request,
    poisson_requests,
    simulate,
)
from edgemoe.stats.drift import activation_distance
from edgemoe.stats.synthetic import synthetic_streams
from edgemoe.stats.traces import Stream, default_trace_path, load_stream

HEURISTICS = ("uniform", "layers", "eplb", "dancemoe", "edgemoe")
JUDGE_SCREEN = 1.10  # the judge's first draws keep candidates this close to the best
JUDGE_SCREEN_DRAWS = 1  # draws every candidate runs before the screen
DRIFT_THRESHOLD = 0.15  # the daemon's default (daemon.config.DEFAULT_DRIFT_THRESHOLD)
Judge = Callable[[list[Placement]], list[float]]


@dataclass
class Scenario:
    """Everything a benchmark run depends on (JSON-able through `describe`)."""

    name: str
    streams: list[str] = field(default_factory=list)
    trace: str = ""
    capacities: list[float] = field(default_factory=lambda: [1.0, 1.0, 2.0])
    memory_ratio: float = 1.2
    bandwidth_mbps: float = 500.0
    rtt_ms: float = 1.0
    expert_mb: float = 17.3
    hidden: int = 2048
    seed: int = 0
    request_rate: float = 0.2  # requests per second per server (when `load` is None)
    load: float | None = None  # share of each server's saturating rate (overrides the rate)
    speeds: list[float] = field(default_factory=list)  # compute speed per server (default 1)
    nic: bool = True  # each server's NIC (egress and ingress at the link rate) is shared
    max_requests: int = 0  # per stream and window (0: all); keeps sweeps affordable
    max_tokens: int = 0  # per request, its first tokens (0: all)
    judge: bool = True  # edgemoe picks among its candidates on the simulated profile window
    judge_requests: int = 0  # requests per stream in each judge draw (0: the test window's)
    judge_seeds: int = 4  # profile-window draws the judge averages over (fewer: more a gamble)
    half_life_s: float = 300.0  # the recorder's: what the daemon's statistics decay with
    max_samples: int = 50_000  # co-activation sample rows per server
    drift: dict[int, str] = field(default_factory=dict)  # server -> stream it switches to
    synthetic: dict[str, int] = field(default_factory=dict)  # layers/experts/top_k/tokens
    strategies: list[str] = field(default_factory=lambda: [*HEURISTICS, "optimal"])
    optimal_max_vars: int = 60_000
    optimal_time_s: float = 20.0

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def preset(name: str, servers: int = 64) -> Scenario:
    """The named scenarios of issue 3."""
    if name == "paper":
        return Scenario("paper", streams=["intent", "law", "summary"])
    if name == "paper4":
        return Scenario("paper4", streams=["intent", "law", "summary", "translation"],
                        capacities=[1.0, 1.0, 2.0, 2.0])
    if name == "drift":
        return Scenario("drift", streams=["intent", "law", "summary"], drift={0: "translation"})
    if name == "scale":
        return Scenario("scale", capacities=[1.0] * servers, expert_mb=44.0, hidden=7168,
                        synthetic={"layers": 58, "experts": 256, "top_k": 8, "tokens": 128},
                        strategies=list(HEURISTICS), request_rate=0.5)
    raise ValueError(f"unknown scenario {name!r}; choose paper, paper4, drift or scale")


def build_problem(sc: Scenario, profile: list[Stream], rng: np.random.Generator,
                  request_rate: np.ndarray | None = None) -> Problem:
    """The strategies' inputs from the profiling window; `request_rate` requests/s per server
    (default: the scenario's flat rate)."""
    S = len(profile)
    L, K = profile[0].expert_ids.shape[1:]
    E = int(sc.synthetic["experts"]) if sc.synthetic else int(
        max(int(p.expert_ids.max()) for p in profile) + 1)
    expert_bytes = int(sc.expert_mb * 1e6)
    caps = np.asarray(sc.capacities, dtype=np.float64)
    if len(caps) != S:
        raise ValueError(f"{len(caps)} capacities for {S} servers")
    total = sc.memory_ratio * L * E * expert_bytes
    cap_bytes = caps / caps.sum() * total
    # round every server to whole experts, keeping the cluster at >= L*E slots
    slots = np.floor(cap_bytes / expert_bytes).astype(np.int64)
    while slots.sum() < L * E:
        slots[int(np.argmax(cap_bytes / expert_bytes - slots))] += 1
    counts = np.zeros((S, L, E))
    ss, ls, sets = [], [], []
    for s, p in enumerate(profile):
        ids = p.expert_ids
        for l in range(L):
            counts[s, l] = np.bincount(ids[:, l].ravel(), minlength=E)[:E]
        T = len(ids)
        tok, lay = np.meshgrid(np.arange(T), np.arange(L), indexing="ij")
        tok, lay = tok.ravel(), lay.ravel()
        if len(tok) > sc.max_samples:
            pick = np.sort(rng.choice(len(tok), sc.max_samples, replace=False))
            tok, lay = tok[pick], lay[pick]
        ss.append(np.full(len(tok), s))
        ls.append(lay)
        sets.append(ids[tok, lay])
    bw = np.full((S, S), sc.bandwidth_mbps * 1e6)
    rtt = np.full((S, S), sc.rtt_ms * 1e-3)
    np.fill_diagonal(rtt, 0.0)
    req_rate = np.full(S, sc.request_rate) if request_rate is None else request_rate
    rate = np.array([len(p.expert_ids) / max(p.num_requests, 1) for p in profile]) * req_rate
    return Problem(capacity_bytes=slots.astype(np.float64) * expert_bytes,
                   compute_speed=_speeds(sc, S), rtt_s=rtt, bandwidth_bps=bw, num_layers=L,
                   num_experts=E, top_k=K, expert_bytes=expert_bytes, hidden_size=sc.hidden,
                   counts=counts, sample_server=np.concatenate(ss),
                   sample_layer=np.concatenate(ls), sample_sets=np.concatenate(sets),
                   request_rate=rate)


def _speeds(sc: Scenario, S: int) -> np.ndarray:
    if not sc.speeds:
        return np.ones(S)
    if len(sc.speeds) != S:
        raise ValueError(f"{len(sc.speeds)} compute speeds for {S} servers")
    return np.asarray(sc.speeds, dtype=np.float64)


def _streams(sc: Scenario) -> tuple[list[Stream], dict[int, Stream]]:
    if sc.synthetic:
        syn = sc.synthetic
        drift_src = {s: int(v) for s, v in sc.drift.items()} if sc.drift else None
        streams = synthetic_streams(len(sc.capacities), syn["layers"], syn["experts"],
                                    syn["top_k"], syn["tokens"], sc.seed, drift=drift_src)
        return streams, {}
    path = sc.trace or str(default_trace_path())
    cache: dict[str, Stream] = {}
    streams = []
    for n in sc.streams:
        if n not in cache:
            cache[n] = load_stream(path, n)
        streams.append(cache[n])
    drifted = {s: load_stream(path, n) for s, n in sc.drift.items()}
    return streams, drifted


def _requests(streams: list[Stream], sc: Scenario) -> list[list[np.ndarray]]:
    """Each stream's requests, at most `max_requests` of them, each its first `max_tokens`."""
    out = []
    for st in streams:
        n = st.num_requests if not sc.max_requests else min(sc.max_requests, st.num_requests)
        reqs = []
        for r in range(n):
            ids = st.expert_ids[st.req_offsets[r]:st.req_offsets[r + 1]]
            reqs.append(ids[:sc.max_tokens] if sc.max_tokens else ids)
        out.append(reqs)
    return out


def request_work_s(ids: np.ndarray, c: SimConstants) -> float:
    """Compute seconds of one request at speed 1 with every expert local and no batching:
    what no placement can remove (the load's yardstick)."""
    T, L, K = ids.shape
    P = min(max(int(T * c.prompt_fraction), 1), T)
    D = T - P
    distinct = sum(len(np.unique(ids[:P, l])) for l in range(L))
    return (L * (c.dense_fixed_s + P * c.dense_token_s) + distinct * c.expert_fixed_s
            + L * P * K * c.expert_row_s
            + D * L * (c.dense_fixed_s + c.dense_token_s + K * (c.expert_fixed_s
                                                               + c.expert_row_s)))


def _rates(sc: Scenario, reqs: list[list[np.ndarray]], c: SimConstants) -> np.ndarray:
    """Requests/s per server: the flat rate, or `load` times each server's saturating rate."""
    S = len(reqs)
    if sc.load is None:
        return np.full(S, sc.request_rate)
    speed = _speeds(sc, S)
    work = np.array([np.mean([request_work_s(r, c) for r in rs]) for rs in reqs])
    return sc.load * speed / work


def make_cluster(sc: Scenario, problem: Problem) -> Cluster:
    """The simulated machines: the problem's links, each server's NIC at the link rate."""
    nic = np.full(problem.num_servers, sc.bandwidth_mbps * 1e6) if sc.nic else None
    return Cluster(problem.compute_speed, problem.rtt_s, problem.bandwidth_bps,
                   problem.hidden_size, nic_egress_bps=nic, nic_ingress_bps=nic)


def profile_draws(pool: list[list[np.ndarray]], sizes: list[int], rates: np.ndarray,
                  seed: int, n: int) -> list[list[Request]]:
    """`n` request sets shaped like the test window, from the profiling window only: per
    server `sizes[s]` of its profiling requests picked at random (with replacement only where
    the window is smaller), on fresh Poisson arrivals."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        picked = [[reqs[j] for j in rng.choice(len(reqs), size, replace=size > len(reqs))]
                  for reqs, size in zip(pool, sizes, strict=True)]
        out.append(poisson_requests(picked, rates, seed + 1 + k))
    return out


def draw_scores(mean: np.ndarray, p99: np.ndarray) -> np.ndarray:
    """float [candidates]: per draw, the worse of a candidate's mean and p99 over the best
    candidate's in that draw, averaged over the draws ([candidates, draws] in)."""
    r = np.maximum(mean / np.maximum(mean.min(0), 1e-12), p99 / np.maximum(p99.min(0), 1e-12))
    return r.mean(1)


def profile_judge(cluster: Cluster, draws: list[list[Request]], c: SimConstants,
                  transport: str = "per-server", screen: float = JUDGE_SCREEN,
                  screen_draws: int = JUDGE_SCREEN_DRAWS) -> Judge:
    """A judge for `LatencyAware`: simulate each candidate on every draw (`profile_draws`)
    and score it by what a benchmark cell measures, its ratio to the best in the same draw
    (the worse of mean and p99: a draw's p99 is its slowest requests, as in the test
    window), averaged over the draws; lower is better. A pooled mean hides how often a
    candidate loses a draw; this average counts each loss. After `screen_draws` draws only
    candidates within `screen` of the best stay in (the others score inf): the later draws
    are spent where the choice is close.
    """
    def judge(candidates: list[Placement]) -> list[float]:
        stats: list[list[tuple[float, float]]] = [[] for _ in candidates]
        alive = list(range(len(candidates)))
        scores = np.zeros(len(candidates))
        for k, requests in enumerate(draws):
            for i in alive:
                lat = simulate(cluster, candidates[i], requests, transport=transport,
                               constants=c).latencies_s
                stats[i].append((float(lat.mean()), float(np.percentile(lat, 99))))
            got = np.array([stats[i] for i in alive])  # [alive, draws so far, 2]
            scores = draw_scores(got[:, :, 0], got[:, :, 1])
            if k + 1 == screen_draws:
                keep = scores <= screen
                alive = [i for i, kept in zip(alive, keep, strict=True) if kept]
                scores = scores[keep]
        out = [float("inf")] * len(candidates)
        for i, s in zip(alive, scores, strict=True):
            out[i] = float(s)
        return out
    return judge


def _place(name: str, sc: Scenario, problem: Problem, judge: Judge | None = None,
           solved: dict[str, Placement] | None = None) -> tuple[Placement, str]:
    """The strategy's placement and, for a judged edgemoe, which candidate won. `solved`
    keeps each strategy's own placement for a caller that varies only the load (every
    strategy here depends on the rates' shares alone, which a load factor keeps)."""
    solved = {} if solved is None else solved
    strat = get_strategy(name)
    if name == "optimal":
        strat.max_vars = sc.optimal_max_vars  # type: ignore[attr-defined]
        strat.time_limit_s = sc.optimal_time_s  # type: ignore[attr-defined]
    if name not in solved:
        solved[name] = strat.place(problem)
    pl = solved[name]
    if name == "edgemoe" and judge is not None:
        assert isinstance(strat, LatencyAware)
        strat.judge = judge
        if "candidate:edgemoe" not in solved:  # the judge's candidates, kept like the rest
            solved.update({f"candidate:{n}": c for n, c in strat.candidates(problem, pl).items()})
        cands = {k.split(":", 1)[1]: v for k, v in solved.items() if k.startswith("candidate:")}
        return strat.judged(problem, pl, cands), strat.chosen
    return pl, name


def run(sc: Scenario, constants: SimConstants | None = None,
        solved: dict[str, Placement] | None = None) -> dict[str, Any]:
    """Run every strategy on the scenario; the JSON document of issue 3. `solved`: see
    `_place` (the sweep passes one per setting and seed, shared across loads)."""
    c = constants or SimConstants()
    rng = np.random.default_rng(sc.seed)
    streams, drifted = _streams(sc)
    splits = [st.split(0.5) for st in streams]
    profile = [p for p, _ in splits]
    test = [t for _, t in splits]
    reqs = _requests(test, sc)
    prof_reqs = _requests(profile, sc)
    rates = _rates(sc, prof_reqs, c)  # from the profile window: what an operator could know
    problem = build_problem(sc, profile, rng, rates)
    cluster = make_cluster(sc, problem)
    requests = poisson_requests(reqs, rates, sc.seed)
    judge = None
    if sc.judge:  # draws shaped like the test window, from the whole profiling window
        pool = _requests(profile, replace(sc, max_requests=0))
        sizes = [sc.judge_requests or len(r) for r in reqs]
        judge = profile_judge(cluster, profile_draws(pool, sizes, rates, sc.seed + 1000,
                                                     max(sc.judge_seeds, 1)), c)
    replace_s, after, switch_s = None, None, None
    if drifted:  # the drifting server's new task follows its old one in its request list
        for s, st in drifted.items():
            n_old = len(reqs[s])
            reqs[s] = reqs[s] + _requests([st.split(0.5)[1]], sc)[0]
        requests = poisson_requests(reqs, rates, sc.seed)
        replace_s, after = decayed_replacement(sc, problem, prof_reqs, requests, rates, rng)
        own = sorted(r.arrival_s for r in requests if r.server == s)
        switch_s = own[n_old]
    out: dict[str, Any] = {"scenario": {**sc.describe(), "servers": problem.num_servers,
                                        "slots": problem.slots.tolist(),
                                        "requests": len(requests),
                                        "rates_per_s": rates.tolist(),
                                        "switch_s": switch_s, "replaced_at_s": replace_s,
                                        "constants": c.to_dict()},
                           "strategies": {}}
    for name in sc.strategies:
        try:
            pl, chosen = _place(name, sc, problem, judge, solved)
        except PlacementError as exc:
            out["scenario"].setdefault("skipped", {})[name] = str(exc)
            continue
        changes: list[Change] = []
        if after is not None and replace_s is not None:
            last = max(r.arrival_s for r in requests)  # (the list is not in arrival order)
            target = _migrate(name, sc, after, pl, horizon_s=max(last - replace_s, 1.0))
            if target is not pl and (target.holders != pl.holders).any():
                try:
                    plan = plan_migration(pl.holders, target.holders, problem.expert_bytes,
                                          budget_bytes=10 * problem.expert_bytes * max(
                                              problem.num_servers, 1) * 100,
                                          capacity_slots=problem.slots)
                except PlacementError as exc:  # the daemon would keep serving the current one
                    out["scenario"].setdefault("migration_refused", {})[name] = str(exc)
                else:
                    copies = [Copy(m.src, m.dst, m.bytes) for m in plan.moves
                              if m.kind == "copy"]
                    changes.append(Change(replace_s, target, copies))
        transports = ["per-server"]
        if name in ("eplb", "dancemoe", "edgemoe"):
            transports.append("per-expert")
        for tr in transports:
            res = simulate(cluster, pl, requests, transport=tr, constants=c, changes=changes)
            key = name if tr == "per-server" else f"{name}+per-expert"
            out["strategies"][key] = {
                "latency_mean_s": res.mean_s, "latency_p50_s": res.p50_s,
                "latency_p99_s": res.p99_s, "bytes_between_servers": res.bytes_between_servers,
                "local_share": res.local_share, "solve_s": pl.solve_s, "transport": tr,
                "objective_s": objective(problem, pl),
                "migration_bytes": res.migration_bytes,
                "chosen": chosen,
            }
    return out


def _decayed_counts(reqs: list[tuple[float, np.ndarray]], t: float, half_life_s: float,
                    E: int) -> np.ndarray:
    """float [L, E]: the recorder's counts at `t`: each request's selections weighted by
    2^(-age / half-life) (as if counted at its arrival)."""
    L = reqs[0][1].shape[1]
    out = np.zeros((L, E))
    for a, ids in reqs:
        if a > t:
            continue
        w = 2.0 ** (-(t - a) / half_life_s)
        for l in range(L):
            out[l] += w * np.bincount(ids[:, l].ravel(), minlength=E)[:E]
    return out


def decayed_replacement(sc: Scenario, problem: Problem, prof_reqs: list[list[np.ndarray]],
                        requests: list[Request], rates: np.ndarray, rng: np.random.Generator
                        ) -> tuple[float | None, Problem | None]:
    """When the daemon would re-place, and the statistics it would have then (no oracle).

    Each server's history is its profiling requests (one per 1/rate before time 0) and its
    requests so far; counts decay with the recorder's half-life. At every arrival on a
    drifting server the drift measure (`edgemoe.stats.drift`, the daemon's) compares the
    decayed counts with those the placement was made from; the first time it reaches the
    daemon's threshold, every server's decayed counts and a co-activation sample drawn in
    proportion to the same weights form the new problem.
    """
    S, E = problem.num_servers, problem.num_experts
    hist: list[list[tuple[float, np.ndarray]]] = []
    for s in range(S):
        n = len(prof_reqs[s])
        past = [(-(n - k) / rates[s], ids) for k, ids in enumerate(prof_reqs[s])]
        now = sorted((r.arrival_s, r.expert_ids) for r in requests if r.server == s)
        hist.append(past + now)
    base = [_decayed_counts(h, 0.0, sc.half_life_s, E) for h in hist]
    when = None
    for s in sc.drift:
        for a, _ in hist[s]:
            if a <= 0:
                continue
            if activation_distance(_decayed_counts(hist[s], a, sc.half_life_s, E),
                                   base[s]) >= DRIFT_THRESHOLD:
                when = a if when is None else min(when, a)
                break
    if when is None:
        return None, None
    counts = np.stack([_decayed_counts(h, when, sc.half_life_s, E) for h in hist])
    ss, ls, sets = [], [], []
    L = problem.num_layers
    for s, h in enumerate(hist):
        rows = [(2.0 ** (-(when - a) / sc.half_life_s), ids) for a, ids in h if a <= when]
        w = np.concatenate([np.full(len(ids) * L, x) for x, ids in rows])
        flat = np.concatenate([ids.reshape(-1, ids.shape[2]) for _, ids in rows])
        lay = np.concatenate([np.tile(np.arange(L), len(ids)) for _, ids in rows])
        k = min(sc.max_samples, len(w))
        pick = np.sort(rng.choice(len(w), k, replace=False, p=w / w.sum()))
        ss.append(np.full(k, s))
        ls.append(lay[pick])
        sets.append(flat[pick])
    after = replace(problem, counts=counts, sample_server=np.concatenate(ss),
                    sample_layer=np.concatenate(ls), sample_sets=np.concatenate(sets))
    return when, after


def _migrate(name: str, sc: Scenario, problem: Problem, current: Placement,
             horizon_s: float) -> Placement:
    """Each strategy's own rule: ours and the paper's weigh cost; the baselines re-place."""
    if name == "edgemoe":
        return LatencyAware().migrate(problem, current, horizon_s)
    if name == "dancemoe":
        return DanceMoE().migrate(problem, current, horizon_s)
    return _place(name, sc, problem)[0]


def scale_solve_times(sizes: list[int], seed: int = 0,
                      strategies: tuple[str, ...] = HEURISTICS,
                      repeat: int = 3) -> list[dict[str, Any]]:
    """Solve time of every heuristic on DeepSeek-V3 shape (58 x 256, top-8) per server count,
    the best of `repeat` runs (other jobs on a small box only ever add time), and edgemoe's
    objective there next to `layers`' (the same placement every run: it is deterministic)."""
    rows = []
    for n in sizes:
        sc = replace(preset("scale", n), seed=seed)
        rng = np.random.default_rng(seed)
        streams, _ = _streams(sc)
        problem = build_problem(sc, streams, rng)
        row: dict[str, Any] = {"servers": n}
        for name in strategies:
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                pl, _ = _place(name, sc, problem)
                times.append(time.perf_counter() - t0)
            row[name] = min(times)
            if name in ("edgemoe", "layers"):
                row[f"{name}_objective_s"] = objective(problem, pl)
        rows.append(row)
    return rows


def gap_instances() -> list[tuple[str, Problem]]:
    """The small instances the optimal gap is reported on: 6 of 3 servers x 2 layers x 6
    experts (top-2, heterogeneous links and speeds), 6 of 4 x 3 x 8 (top-3, every other one
    homogeneous)."""
    out = []
    for seed in range(12):
        if seed < 6:
            p = random_problem(seed, S=3, L=2, E=6, K=2, samples=80)
        else:
            p = random_problem(seed, S=4, L=3, E=8, K=3, samples=150, hetero=seed % 2 == 0)
        out.append((f"{seed}: {p.num_servers}x{p.num_layers}x{p.num_experts} k{p.top_k}", p))
    return out


def optimal_gaps(strategies: tuple[str, ...] = HEURISTICS) -> list[dict[str, Any]]:
    """Every heuristic's objective over the MILP optimum's, minus 1, on `gap_instances`.

    ``edgemoe_own`` is edgemoe with its own starts only: the default also starts from (and
    polishes) the baselines' placements, which makes "never worse than a baseline on the
    objective" true by construction; the baselines optimise other things (their figures are
    what their placements cost on this objective, not how far they are from their goals).
    """
    rows = []
    for name, problem in gap_instances():
        best = objective(problem, get_strategy("optimal").place(problem))
        row: dict[str, Any] = {"instance": name, "optimal_objective_s": best}
        own = LatencyAware(baseline_starts=False).place(problem)
        row["edgemoe_own"] = objective(problem, own) / max(best, 1e-15) - 1
        for strat in strategies:
            t0 = time.perf_counter()
            pl = get_strategy(strat).place(problem)
            row[f"{strat}_solve_s"] = time.perf_counter() - t0
            row[strat] = objective(problem, pl) / max(best, 1e-15) - 1
        rows.append(row)
    return rows


__all__ = ["HEURISTICS", "STRATEGIES", "Scenario", "optimal_gaps", "preset", "run",
           "scale_solve_times"]
