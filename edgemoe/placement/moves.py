"""edgemoe's improvement moves: coordinate descent sweeps, pair re-solves and a
first-improvement local search on the exact objective.

Coordinate descent sweeps, best start first: each server re-solves its DP given the others
(its "must keep" set = experts nobody else holds), kept only if the total objective improves;
a re-solve with unchanged inputs is not repeated. Small instances also try pair moves (two
servers choose again in both orders); then a local search (add, relocate, replace, exchange,
complete a set, gather a layer). Evaluation is incremental (`layer_costs.LayerCosts`): a move
re-routes its layers and re-costs only the sample rows whose route changed. All search is
bounded by counted work units (`sweep_work`, `search_work`), not by wall-clock time, so every
node recomputes the same placement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from edgemoe.placement.layer_costs import LayerCosts
from edgemoe.placement.problem import Problem
from edgemoe.placement.starts import Starts


def flip(holders: np.ndarray, flips: tuple[tuple[int, int, int, bool], ...]
          ) -> dict[int, np.ndarray]:
    """{layer: new holders [S, E]} after setting holders[s, l, e] = v for each flip."""
    out: dict[int, np.ndarray] = {}
    for s, l, e, v in flips:
        out.setdefault(l, holders[:, l].copy())[s, e] = v
    return out



class Moves(Starts):
    """Improvement moves of `LatencyAware` (a mixin: sweeps and pair moves re-solve servers
    with the starts' per-server choice)."""

    set_moves: bool
    _work: float
    _own_sets_cache: dict[int, list[tuple[int, np.ndarray]]]

    def _pairs(self, problem: Problem, ev: LayerCosts) -> None:
        """Large-neighbourhood moves: two servers drop everything and choose again in both
        orders, the others fixed (they can swap whole responsibilities, which single-server
        moves cannot); kept when the total objective improves."""
        S = problem.num_servers
        with self._budget(ev) as end:
            for _ in range(self.sweeps + 1):
                improved = False
                for s in range(S):
                    for t in range(s + 1, S):
                        for pair in ((s, t), (t, s)):
                            if ev.work >= end:
                                return
                            trial = self._sequential(problem, np.array(pair), ev.holders)
                            changed = np.flatnonzero((trial != ev.holders).any((0, 2)))
                            improved |= ev.improve({l: trial[:, l] for l in changed})
                if not improved:
                    break

    def _sweep(self, problem: Problem, ev: LayerCosts) -> None:
        """Coordinate descent: each server re-solves given the others (keeping the experts only
        it holds), kept when the total objective improves; within the shared budget."""
        S = problem.num_servers
        slots = problem.slots
        solved: dict[tuple[int, bytes], np.ndarray] = {}  # a server's choice given its required
        with self._budget(ev) as end:
            for _ in range(self.sweeps):
                improved = False
                for s in np.lexsort((np.arange(S), slots)):
                    if ev.work >= end:  # large instances: the budget ends the sweeps
                        return
                    required = ~np.delete(ev.holders, s, axis=0).any(0)
                    key = (int(s), np.packbits(required).tobytes())
                    if key not in solved:
                        solved[key] = self._server_holdings(problem, s, required, int(slots[s]))
                        ev.work += problem.num_layers * problem.num_experts  # ~ its DP
                    new = solved[key]
                    changed = np.flatnonzero((new != ev.holders[s]).any(1))
                    trials = {l: ev.holders[:, l].copy() for l in changed}
                    for l, h in trials.items():
                        h[s] = new[l]
                    improved |= ev.improve(trials)
                if not improved:
                    break

    def _local_search(self, problem: Problem, ev: LayerCosts) -> None:
        """First-improvement local search on the exact objective within the shared budget."""
        with self._budget(ev) as end:
            improved = True
            while improved and ev.work < end:
                improved = False
                for s in range(problem.num_servers):
                    while ev.work < end and self._improve_server(problem, ev, s, end):
                        improved = True

    @contextlib.contextmanager
    def _budget(self, ev: LayerCosts) -> Iterator[float]:
        """The shared budget as an end mark on `ev`'s work counter; whatever ends the phase,
        what it left is the next phase's budget."""
        end = ev.work + self._work
        try:
            yield end
        finally:
            self._work = max(end - ev.work, 0.0)

    def _improve_server(self, problem: Problem, ev: LayerCosts, s: int, end: float) -> bool:
        for changes in self._moves(problem, ev.holders, s):
            if ev.work >= end:
                return False
            if ev.improve(changes):
                return True
        return False

    def _moves(self, problem: Problem, holders: np.ndarray, s: int
               ) -> Iterator[dict[int, np.ndarray]]:
        """Server s's candidate moves, most promising first, as {layer: new holders [S, E]}.

        add: s fills a free slot; relocate: s hands a sole copy to a server with room;
        replace: s drops a copy someone else also holds and takes an expert it lacks;
        exchange: s and t trade one expert each (moves sole copies). Drops go least used
        first, additions most used by s first.
        """
        S, _, E = holders.shape
        counts = problem.counts[s]
        held, lacks = np.argwhere(holders[s]), np.argwhere(~holders[s])
        held = held[np.argsort(counts[held[:, 0], held[:, 1]], kind="stable")][: 4 * E]
        lacks = lacks[np.argsort(-counts[lacks[:, 0], lacks[:, 1]], kind="stable")][: 4 * E]
        room = holders.reshape(S, -1).sum(1) < problem.slots

        def moved(*flips: tuple[int, int, int, bool]) -> dict[int, np.ndarray]:
            return flip(holders, flips)

        if room[s]:
            for li, ei in lacks:
                yield moved((s, li, ei, True))
        if self.set_moves:
            yield from self._set_moves(problem, holders, s, held)
            yield from self._gather_moves(problem, holders, s, held)
        for lo, eo in held:
            sole = holders[:, lo, eo].sum() == 1
            if sole:
                for t in np.flatnonzero(room):
                    if t != s:
                        yield moved((s, lo, eo, False), (int(t), lo, eo, True))
            for li, ei in lacks:
                if not sole:
                    yield moved((s, lo, eo, False), (s, li, ei, True))
                    continue
                for t in np.flatnonzero(holders[:, li, ei] & ~holders[:, lo, eo]):
                    yield moved((s, lo, eo, False), (s, li, ei, True),
                                (int(t), li, ei, False), (int(t), lo, eo, True))

    def _set_moves(self, problem: Problem, holders: np.ndarray, s: int, held: np.ndarray
                   ) -> Iterator[dict[int, np.ndarray]]:
        """s completes one of its own top-k sets that misses two or more experts (a single
        expert is what replace does), making room by dropping its least used copies that
        another server also holds: a set is only worth something whole, so the experts it
        misses must arrive together."""
        free = int(problem.slots[s] - holders[s].sum())
        spare = [(int(l), int(e)) for l, e in held if holders[:, l, e].sum() > 1]
        for l, members in self._own_sets(problem, s):
            missing = [int(e) for e in members if not holders[s, l, e]]
            need = len(missing) - free
            if len(missing) < 2:
                continue
            drops = [(lo, eo) for lo, eo in spare if not (lo == l and eo in members)][:max(need, 0)]
            if len(drops) < need:
                continue
            yield flip(holders, tuple((s, lo, eo, False) for lo, eo in drops)
                        + tuple((s, l, e, True) for e in missing))

    def _gather_moves(self, problem: Problem, holders: np.ndarray, s: int, held: np.ndarray
                      ) -> Iterator[dict[int, np.ndarray]]:
        """t hands s its part of layer l that s lacks and takes back as many of s's least used
        experts of other layers (those t lacks): layers gather on one server, so a remote
        (token, layer) sends one message instead of several."""
        S, L, _ = holders.shape
        free = int(problem.slots[s] - holders[s].sum())
        for t in range(S):
            if t == s:
                continue
            for l in range(L):
                give = np.flatnonzero(holders[t, l] & ~holders[s, l])
                if not len(give):
                    continue
                back = [(int(lo), int(eo)) for lo, eo in held
                        if lo != l and not holders[t, lo, eo]][:max(len(give) - free, 0)]
                if len(back) < len(give) - free:
                    continue
                yield flip(holders, tuple((s, l, int(e), True) for e in give)
                            + tuple((t, l, int(e), False) for e in give)
                            + tuple((s, lo, eo, False) for lo, eo in back)
                            + tuple((t, lo, eo, True) for lo, eo in back))

    def _own_sets(self, problem: Problem, s: int) -> list[tuple[int, np.ndarray]]:
        """s's distinct sampled (layer, top-k set)s, heaviest first (at most 4 E), kept for the
        problem being solved (`_prepare` starts afresh)."""
        cache = self._own_sets_cache
        if s not in cache:
            m = np.flatnonzero(problem.sample_server == s)
            if not len(m):
                cache[s] = []
            else:
                rows = np.concatenate([problem.sample_layer[m, None],
                                       np.sort(problem.sample_sets[m], axis=1)], axis=1)
                uniq, inv = np.unique(rows, axis=0, return_inverse=True)
                w = np.bincount(inv.ravel(), self._weights[m], minlength=len(uniq))
                top = np.lexsort((np.arange(len(uniq)), -w))[: 4 * problem.num_experts]
                cache[s] = [(int(uniq[i, 0]), uniq[i, 1:]) for i in top]
        return cache[s]

