"""`eplb`: DeepSeek EPLB's policy generalised to unequal server capacities.

EPLB replicates the most loaded experts (each new replica goes to the expert with the highest
load per replica) and packs replicas onto devices greedily, heaviest first, onto the least
loaded device with room. As in the DanceMoE paper's baseline, capacities differ: a server gets
slots in every layer in proportion to its memory, and "least loaded" is load per slot. Load is
the cluster-wide activation count: EPLB balances load, it does not look at locality.
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.placement.problem import Placement, Problem, make_placement


def per_layer_slots(slots: np.ndarray, num_layers: int, num_experts: int) -> np.ndarray:
    """int [S, L]: each server's slots split evenly over layers, remainders dealt to the layer
    with the fewest slots so far (so every layer gets at least total // L)."""
    S = len(slots)
    base = np.minimum(slots // num_layers, num_experts)
    out = np.repeat(base[:, None], num_layers, axis=1).astype(np.int64)
    for s in range(S):
        rest = int(slots[s] - out[s].sum())
        while rest > 0:
            room = out[s] < num_experts
            if not room.any():
                break
            tot = out.sum(0)
            l = int(np.argmin(np.where(room, tot, np.iinfo(np.int64).max)))
            out[s, l] += 1
            rest -= 1
    return out


def replicate(load: np.ndarray, replicas: int, max_copies: int) -> np.ndarray:
    """int [E]: copies per expert; extra copies go to the highest load per copy (EPLB)."""
    cnt = np.ones(len(load), dtype=np.int64)
    for _ in range(replicas - len(load)):
        per = np.where(cnt < max_copies, load / cnt, -np.inf)
        e = int(np.argmax(per))
        if per[e] == -np.inf:
            break
        cnt[e] += 1
    return cnt


class Eplb:
    """Replicate hot experts, then balanced packing per layer."""

    name = "eplb"

    def place(self, problem: Problem) -> Placement:
        t0 = time.perf_counter()
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        cap = per_layer_slots(problem.slots, L, E)
        load_all = problem.counts.sum(0) + 1e-9  # [L, E]
        holders = np.zeros((S, L, E), dtype=bool)
        for l in range(L):
            load = load_all[l]
            cnt = replicate(load, int(cap[:, l].sum()), S)
            per = load / cnt
            items = np.repeat(np.arange(E), cnt)
            order = np.lexsort((items, -per[items]))
            used = np.zeros(S, dtype=np.int64)
            srv_load = np.zeros(S)
            pending: list[int] = []
            for i in order:
                e = int(items[i])
                ok = (used < cap[:, l]) & ~holders[:, l, e]
                if not ok.any():
                    pending.append(e)
                    continue
                norm = np.where(ok, srv_load / np.maximum(cap[:, l], 1), np.inf)
                s = int(np.argmin(norm))
                holders[s, l, e] = True
                used[s] += 1
                srv_load[s] += per[e]
            for e in pending:  # a first copy that found no room in this layer's split
                if holders[:, l, e].any():
                    continue
                free = problem.slots - holders.reshape(S, -1).sum(1)
                s = int(np.argmax(free))
                if free[s] <= 0:  # evict a duplicate of this layer from the fullest server
                    dup = holders[:, l, :].sum(0) > 1
                    s = int(np.argmax((holders[:, l, :] & dup[None]).sum(1)))
                    victim = int(np.argmax(holders[s, l] & dup))
                    holders[s, l, victim] = False
                holders[s, l, e] = True
        return make_placement(problem, holders, self.name, time.perf_counter() - t0)
