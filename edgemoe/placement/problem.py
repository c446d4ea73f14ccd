"""The placement problem as arrays, the `Placement` result, validation and the shared cost model.

Shapes (S servers, L MoE layers, E routed experts per layer, K top-k, R co-activation samples):

- ``capacity_bytes`` float [S]: expert memory of each server.
- ``compute_speed`` float [S]: relative speed (1.0 = reference); expert and dense times
  divide by it.
- ``rtt_s`` float [S, S], ``bandwidth_bps`` float [S, S] (bits/s): links; the diagonal is ignored.
- ``counts`` float [S, L, E]: each server's (decayed) expert activation counts.
- ``sample_server`` int [R], ``sample_layer`` int [R], ``sample_sets`` int [R, K]: the
  co-activation sample, one row per observed (token, layer) top-k set, tagged by the server
  whose request produced it.
- ``request_rate`` float [S]: tokens per second each server serves (weights servers).

The cost model (``objective``) is what `edgemoe` and `optimal` minimise: the expected time a
(token, layer) waits for its slowest remote call, where a call from s to d costs
``call_cost[s, d] = rtt + 2 * hidden_bytes * 8 / bandwidth + expert_time / speed[d]`` and
s calls, for each of its remote experts, the holder given by ``route``; plus a fan-out term:
every distinct remote server the set touches adds
``fanout_cost[s, d] = call_overhead / speed[d] + 2 * hidden_bytes * 8 / bandwidth``, the
holder time and link time one more message occupies (the per-server transport sends a
token's hidden state once per destination). Without it one destination and seven cost the
same, although under load the extra messages queue at holders and on links.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class PlacementError(ValueError):
    """An invalid problem or placement; the message says what is wrong."""


@dataclass(frozen=True)
class Problem:
    """Inputs of a placement decision (see the module docstring for shapes)."""

    capacity_bytes: np.ndarray
    compute_speed: np.ndarray
    rtt_s: np.ndarray
    bandwidth_bps: np.ndarray
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int
    hidden_size: int
    counts: np.ndarray
    sample_server: np.ndarray
    sample_layer: np.ndarray
    sample_sets: np.ndarray
    request_rate: np.ndarray
    expert_time_s: float = 5e-5
    call_overhead_s: float = 1e-4
    activation_bytes: int = 2
    server_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        validate_problem(self)

    @property
    def num_servers(self) -> int:
        return len(self.capacity_bytes)

    @property
    def slots(self) -> np.ndarray:
        """int [S]: how many experts each server can hold."""
        return (np.asarray(self.capacity_bytes, dtype=np.float64) // self.expert_bytes).astype(
            np.int64
        )

    @property
    def message_bytes(self) -> int:
        """Bytes of one token's hidden state on the wire."""
        return int(self.hidden_size * self.activation_bytes)

    def call_cost(self) -> np.ndarray:
        """float [S, S]: seconds of one remote call s -> d for one token; 0 on the diagonal."""
        bw = np.asarray(self.bandwidth_bps, dtype=np.float64)
        with np.errstate(divide="ignore"):
            transfer = 2.0 * self.message_bytes * 8.0 / bw
        cost = np.asarray(self.rtt_s, dtype=np.float64) + transfer
        cost = cost + self.expert_time_s / np.asarray(self.compute_speed)[None, :]
        np.fill_diagonal(cost, 0.0)
        return cost

    def fanout_cost(self) -> np.ndarray:
        """float [S, S]: seconds one more message s -> d occupies (holder and link); 0 on the
        diagonal."""
        bw = np.asarray(self.bandwidth_bps, dtype=np.float64)
        with np.errstate(divide="ignore"):
            transfer = 2.0 * self.message_bytes * 8.0 / bw
        cost = transfer + self.call_overhead_s / np.asarray(self.compute_speed)[None, :]
        np.fill_diagonal(cost, 0.0)
        return cost

    def sample_weights(self) -> np.ndarray:
        """float [R]: weight of each sample so a server's samples sum to its request rate share."""
        s = self.sample_server
        per = np.bincount(s, minlength=self.num_servers).astype(np.float64)
        rate = np.asarray(self.request_rate, dtype=np.float64)
        total = rate.sum()
        share = rate / total if total > 0 else np.full(self.num_servers, 1.0 / self.num_servers)
        w = np.zeros(len(s))
        nz = per[s] > 0
        w[nz] = share[s[nz]] / per[s[nz]]
        return w


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise PlacementError(message)


def validate_problem(p: Problem) -> None:
    """Raise PlacementError with a clear message when the problem is inconsistent."""
    S = len(p.capacity_bytes)
    L, E, K = p.num_layers, p.num_experts, p.top_k
    _need(S >= 1, "at least one server is needed")
    _need(L >= 1 and E >= 1, f"model shape must be positive (layers={L}, experts={E})")
    _need(1 <= K <= E, f"top_k must be in 1..{E}, got {K}")
    _need(p.expert_bytes > 0, f"expert_bytes must be positive, got {p.expert_bytes}")
    _need(p.hidden_size > 0, f"hidden_size must be positive, got {p.hidden_size}")
    _need(p.expert_time_s >= 0, "expert_time_s must not be negative")
    _need(p.call_overhead_s >= 0, "call_overhead_s must not be negative")
    cap = np.asarray(p.capacity_bytes, dtype=np.float64)
    _need(cap.shape == (S,), "capacity_bytes must be [S]")
    _need(bool(np.all(cap >= 0)), f"negative capacity: {cap.tolist()}")
    speed = np.asarray(p.compute_speed, dtype=np.float64)
    _need(speed.shape == (S,), f"compute_speed must be [{S}], got {speed.shape}")
    _need(bool(np.all(speed > 0)), "compute_speed must be positive")
    for name in ("rtt_s", "bandwidth_bps"):
        a = np.asarray(getattr(p, name))
        _need(a.shape == (S, S), f"{name} must be [{S}, {S}] (one row and column per server), "
              f"got {a.shape}: a link names an unknown server")
    off = ~np.eye(S, dtype=bool)
    _need(bool(np.all(np.asarray(p.rtt_s)[off] >= 0)), "negative round-trip time")
    _need(bool(np.all(np.asarray(p.bandwidth_bps)[off] > 0)), "bandwidth must be positive")
    slots = int((cap // p.expert_bytes).sum())
    _need(
        slots >= L * E,
        f"cluster capacity holds {slots} experts but the model has {L * E} "
        f"({L} layers x {E}); every expert must be held once",
    )
    _need(p.counts.shape == (S, L, E), f"counts must be [{S}, {L}, {E}], got {p.counts.shape}")
    _need(bool(np.all(p.counts >= 0)), "counts must not be negative")
    R = len(p.sample_server)
    _need(p.sample_layer.shape == (R,), "sample_layer must be [R] like sample_server")
    _need(p.sample_sets.ndim == 2 and p.sample_sets.shape[0] == R, "sample_sets must be [R, K]")
    if R:
        _need(int(p.sample_server.min()) >= 0 and int(p.sample_server.max()) < S,
              "a sample names an unknown server")
        _need(int(p.sample_layer.min()) >= 0 and int(p.sample_layer.max()) < L,
              "a sample names an unknown layer")
        _need(int(p.sample_sets.min()) >= 0 and int(p.sample_sets.max()) < E,
              "a sample names an unknown expert")
    rate = np.asarray(p.request_rate, dtype=np.float64)
    _need(rate.shape == (S,) and bool(np.all(rate >= 0)), "request_rate must be [S], >= 0")
    _need(not p.server_names or len(p.server_names) == S, "server_names must name every server")


@dataclass(frozen=True)
class Placement:
    """holders bool [S, L, E]; route int [S, L, E]: the server s calls for (l, e)."""

    holders: np.ndarray
    route: np.ndarray
    strategy: str = ""
    solve_s: float = 0.0

    def held_by(self, server: int) -> set[tuple[int, int]]:
        ls, es = np.nonzero(self.holders[server])
        return {(int(a), int(b)) for a, b in zip(ls, es, strict=True)}


def validate_placement(p: Problem, pl: Placement) -> None:
    """Raise PlacementError unless capacities hold, every expert is held, routes hit holders."""
    S, L, E = p.num_servers, p.num_layers, p.num_experts
    _need(pl.holders.shape == (S, L, E), f"holders must be [{S}, {L}, {E}]")
    _need(pl.route.shape == (S, L, E), f"route must be [{S}, {L}, {E}]")
    used = pl.holders.reshape(S, -1).sum(1)
    over = np.nonzero(used > p.slots)[0]
    _need(len(over) == 0, f"servers {over.tolist()} hold {used[over].tolist()} experts, "
          f"capacity {p.slots[over].tolist()}")
    missing = np.argwhere(~pl.holders.any(0))
    _need(len(missing) == 0, f"{len(missing)} experts have no holder, e.g. (layer, expert) "
          f"{tuple(int(x) for x in missing[0]) if len(missing) else ()}")
    r = pl.route
    _need(bool(np.all((r >= 0) & (r < S))), "route names an unknown server")
    li, ei = np.meshgrid(np.arange(L), np.arange(E), indexing="ij")
    ok = pl.holders[r, li[None], ei[None]]
    _need(bool(ok.all()), "a route points at a server that does not hold the expert")


def layer_routes(cost: np.ndarray, holders_l: np.ndarray, prefer: np.ndarray | None = None,
                 experts: np.ndarray | None = None) -> np.ndarray:
    """int [S, E]: for one layer, every server calls itself if it holds e, else its cheapest
    holder (cost [S, S], holders_l bool [S, E]). With `experts` (int [M]) only those columns
    are computed: int [S, M].

    Ties (equal link cost) are spread over holders by expert index so no single holder takes
    every call: deterministic and load-balancing in the common homogeneous case. With `prefer`
    float [S, E] (e.g. each server's activation counts) a tie goes instead to the holder that
    holds most of the server's preferred mass in this layer, so a token's remote experts
    gather on few servers (fewer messages).
    """
    S, E = holders_l.shape
    cols = np.arange(E) if experts is None else np.asarray(experts, dtype=np.int64)
    h = holders_l[:, cols]
    route = np.broadcast_to(h.argmax(0), (S, len(cols))).copy()  # a sole holder: no choice
    multi = np.flatnonzero(h.sum(0) > 1)
    if len(multi):
        route[:, multi] = _choose_holders(cost, holders_l, cols[multi], prefer)
    own = np.nonzero(h)
    route[own[0], own[1]] = own[0]
    return route


def _choose_holders(cost: np.ndarray, holders_l: np.ndarray, multi: np.ndarray,
                    prefer: np.ndarray | None) -> np.ndarray:
    """int [S, len(multi)]: `layer_routes`' choice for the experts `multi` that have several
    holders, among the servers D holding any of them ([S, D, len(multi)] work)."""
    S = len(holders_l)
    h = holders_l[:, multi]
    D = np.flatnonzero(h.any(1))  # ascending, so position order is server order
    hD = h[D]
    if prefer is None:
        c = np.where(hD[None, :, :], cost[:, D, None], np.inf)  # [s, D, M]
        best = c.min(1)
        tie = np.isclose(c, best[:, None, :]) & hD[None]
        n_tie = tie.sum(1)  # [s, M]
        pick = (multi[None, :] + np.arange(S)[:, None]) % np.maximum(n_tie, 1)
        order = np.cumsum(tie, axis=1, dtype=np.int32) - 1  # rank among tied holders
        return D[(tie & (order == pick[:, None, :])).argmax(1)]
    # one preference order of holders per caller: cost (to 10 ns), mass, index
    mass = prefer @ holders_l[D].T.astype(np.float64)  # [s, D]
    level = np.round(np.asarray(cost, dtype=np.float64)[:, D] * 1e8)
    d = np.broadcast_to(np.arange(len(D)), (S, len(D)))
    order = np.lexsort((d, -mass, level), axis=-1)
    rank = np.empty((S, len(D)), dtype=np.int32)
    np.put_along_axis(rank, order, d.astype(np.int32), axis=-1)
    return D[np.where(hD[None, :, :], rank[:, :, None], len(D)).argmin(1)]


def nearest_routes(p: Problem, holders: np.ndarray, prefer: np.ndarray | None = None
                   ) -> np.ndarray:
    """int [S, L, E]: `layer_routes` for every layer (`prefer` float [S, L, E] or None)."""
    S, L, E = holders.shape
    cost = p.call_cost()
    route = np.empty((S, L, E), dtype=np.int64)
    for l in range(L):
        route[:, l] = layer_routes(cost, holders[:, l], None if prefer is None
                                   else prefer[:, l])
    return route


def make_placement(p: Problem, holders: np.ndarray, strategy: str, solve_s: float,
                   route: np.ndarray | None = None) -> Placement:
    """A validated placement; nearest-holder routing unless `route` is given."""
    if route is None:
        route = nearest_routes(p, holders)
    pl = Placement(holders=holders.astype(bool), route=route, strategy=strategy,
                   solve_s=solve_s)
    validate_placement(p, pl)
    return pl


def set_costs(cost: np.ndarray, fan: np.ndarray, s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """float [R]: slowest call plus one `fan` per distinct remote destination of each row.

    s int [R] origins, d int [R, K] the server each expert of the row is called on.
    """
    ss = s[:, None]
    slowest = cost[ss, d].max(1)
    d = np.sort(d, axis=1)
    first = np.ones(d.shape, dtype=bool)
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    return slowest + (fan[ss, d] * first).sum(1)


def sample_costs(p: Problem, route: np.ndarray) -> np.ndarray:
    """float [R]: for each co-activation sample, its slowest remote call plus fan-out."""
    if len(p.sample_server) == 0:
        return np.zeros(0)
    s = p.sample_server
    d = route[s[:, None], p.sample_layer[:, None], p.sample_sets]  # [R, K]
    return set_costs(p.call_cost(), p.fanout_cost(), s, d)


def objective(p: Problem, pl: Placement) -> float:
    """Expected seconds a (token, layer) waits for remote experts (lower is better)."""
    return float((sample_costs(p, pl.route) * p.sample_weights()).sum())


def local_share(p: Problem, holders: np.ndarray) -> float:
    """Weighted share of samples whose whole top-k set is held by their own server."""
    s = p.sample_server[:, None]
    local = holders[s, p.sample_layer[:, None], p.sample_sets].all(1)
    return float((local * p.sample_weights()).sum())
