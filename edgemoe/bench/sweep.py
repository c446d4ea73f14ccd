"""`bench placement --sweep`: edgemoe's ratio to the best other strategy over a grid.

A cell is one network (bandwidth with its round trip), memory ratio, capacity split, compute
speeds and load; its seeds run the same setting with other arrivals and co-activation samples.
Per cell and metric (mean, p50, p99 request latency, each averaged over the seeds) the ratio is
edgemoe's over the best of uniform, layers, eplb and dancemoe, all on the per-server transport
(same transport: the placement gain); ``system`` is edgemoe's mean over dancemoe with the
per-expert transport (the paper's system: placement and transport gains together).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgemoe.bench.placement import Scenario, run
from edgemoe.placement.problem import Placement
from edgemoe.sim.constants import SimConstants

NETWORKS = ((20.0, 20.0), (100.0, 2.0), (500.0, 1.0), (10000.0, 0.1))  # (Mbit/s, RTT ms)
MEMORY = (1.05, 1.2, 2.0, 3.0)
CAPACITIES = {"1:1:2": [1.0, 1.0, 2.0], "8:1:1": [8.0, 1.0, 1.0], "1x6": [1.0] * 6}
STREAMS = {3: ["intent", "law", "summary"],
           6: ["intent", "law", "summary", "translation", "intent", "law"]}
SPEEDS = {"equal": None, "hetero": (2.0, 1.0, 0.5)}  # cycled over the servers
LOADS = (0.1, 0.4, 0.8)
BASELINES = ("uniform", "layers", "eplb", "dancemoe")
METRICS = ("latency_mean_s", "latency_p50_s", "latency_p99_s")


@dataclass(frozen=True)
class Grid:
    """The axes of a sweep and the per-run budget (requests per stream, tokens each)."""

    networks: tuple[tuple[float, float], ...] = NETWORKS
    memory: tuple[float, ...] = MEMORY
    capacities: tuple[str, ...] = tuple(CAPACITIES)
    speeds: tuple[str, ...] = tuple(SPEEDS)
    loads: tuple[float, ...] = LOADS
    seeds: tuple[int, ...] = (0, 1, 2)
    max_requests: int = 8
    max_tokens: int = 96
    max_samples: int = 20_000

    def cells(self) -> list[dict[str, Any]]:
        return [{"bandwidth_mbps": n[0], "rtt_ms": n[1], "memory_ratio": m, "capacities": c,
                 "speeds": sp, "load": ld}
                for n, m, c, sp, ld in itertools.product(self.networks, self.memory,
                                                         self.capacities, self.speeds,
                                                         self.loads)]


QUICK = Grid(networks=((20.0, 20.0), (10000.0, 0.1)), memory=(1.2,),
             capacities=("1:1:2", "8:1:1"), speeds=("equal", "hetero"), loads=(0.1, 0.8),
             seeds=(0,), max_requests=3, max_tokens=48, max_samples=5_000)


def scenario(cell: dict[str, Any], seed: int, grid: Grid, trace: str = "") -> Scenario:
    caps = CAPACITIES[cell["capacities"]]
    S = len(caps)
    pattern = SPEEDS[cell["speeds"]]
    speeds = [] if pattern is None else [pattern[s % len(pattern)] for s in range(S)]
    return Scenario(
        name="sweep", streams=STREAMS[S], trace=trace, capacities=caps,
        memory_ratio=cell["memory_ratio"], bandwidth_mbps=cell["bandwidth_mbps"],
        rtt_ms=cell["rtt_ms"], seed=seed, load=cell["load"], speeds=speeds,
        max_requests=grid.max_requests, max_tokens=grid.max_tokens,
        max_samples=grid.max_samples,
        strategies=[*BASELINES, "edgemoe"])


def run_cell(cell: dict[str, Any], grid: Grid, constants: SimConstants, trace: str = "",
             solved: dict[int, dict[str, Placement]] | None = None) -> dict[str, Any]:
    """One cell over its seeds: every strategy's metrics averaged, and edgemoe's ratios.
    `solved` {seed: placements} carries placements between cells that differ in load only."""
    per: dict[str, dict[str, list[float]]] = {}
    chosen = []
    solved = {} if solved is None else solved
    for seed in grid.seeds:
        doc = run(scenario(cell, seed, grid, trace), constants, solved.setdefault(seed, {}))
        chosen.append(doc["strategies"]["edgemoe"].get("chosen", "edgemoe"))
        for name, row in doc["strategies"].items():
            for m in (*METRICS, "bytes_between_servers"):
                per.setdefault(name, {}).setdefault(m, []).append(row[m])
    avg = {n: {m: float(np.mean(v)) for m, v in ms.items()} for n, ms in per.items()}
    ratios = {}
    for m in METRICS:
        best = min(BASELINES, key=lambda n: avg[n][m])
        ratios[m] = {"ratio": avg["edgemoe"][m] / max(avg[best][m], 1e-15), "best": best}
    sys_base = avg.get("dancemoe+per-expert")
    out = {**cell, "ratios": ratios, "chosen": chosen, "strategies": avg}
    if sys_base:
        out["system_mean"] = avg["edgemoe"]["latency_mean_s"] / sys_base["latency_mean_s"]
        out["system_bytes"] = (avg["edgemoe"]["bytes_between_servers"]
                               / max(sys_base["bytes_between_servers"], 1))
    return out


SETTING = ("bandwidth_mbps", "rtt_ms", "memory_ratio", "capacities", "speeds")  # a cell but load


def _setting(cell: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(cell[k] for k in SETTING)


def _document(grid: Grid, constants: SimConstants, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A sweep's JSON document: the grid, the constants, the cells run and the worst of each
    metric."""
    worst = {m: max(rows, key=lambda r, m=m: r["ratios"][m]["ratio"]) for m in METRICS}
    return {"grid": dict(grid.__dict__), "constants": constants.to_dict(), "cells": rows,
            "worst": {m: {"ratio": w["ratios"][m]["ratio"], "cell": label(w)}
                      for m, w in worst.items()}}


def sweep(grid: Grid, constants: SimConstants, trace: str = "",
          progress: Any = None) -> dict[str, Any]:
    """Every cell of the grid; `progress(i, n, row)` after each."""
    cells = grid.cells()
    rows = []
    memo: dict[tuple, dict[int, dict[str, Placement]]] = {}
    for i, cell in enumerate(cells):
        rows.append(run_cell(cell, grid, constants, trace, memo.setdefault(_setting(cell), {})))
        if progress:
            progress(i + 1, len(cells), rows[-1])
    return _document(grid, constants, rows)


def label(cell: dict[str, Any]) -> str:
    return (f"{cell['bandwidth_mbps']:g}Mb/{cell['rtt_ms']:g}ms mem{cell['memory_ratio']:g} "
            f"{cell['capacities']} {cell['speeds']} load{cell['load']:g}")


def quick(grid: Grid = QUICK, **changes: Any) -> Grid:
    return replace(grid, **changes)


def bounded(grid: Grid, constants: SimConstants, trace: str, minutes: float,
            progress: Any = None, previous: dict[str, Any] | None = None,
            save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The grid's settings in a seeded shuffled order (a partial run then samples every axis,
    not the first network only), each with all its loads, until `minutes` have passed; `save`
    gets the document (`sweep`'s, with what was done) after each setting. `previous`, a
    document of an earlier bounded run of the same grid and constants, is continued: its cells
    kept, its settings skipped (the whole grid takes hours here: it can run in pieces).
    Empty when no setting was started."""
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    elapsed = 0.0
    if previous is not None:
        same = json.loads(json.dumps({"grid": dict(grid.__dict__),
                                      "constants": constants.to_dict()}))
        if json.loads(json.dumps({k: previous.get(k) for k in same})) != same:
            raise ValueError("the document to resume is of another grid or other constants")
        rows = list(previous["cells"])
        elapsed = float(previous.get("done", {}).get("elapsed_s", 0.0))
    cells = grid.cells()
    settings: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for cell in cells:
        settings.setdefault(_setting(cell), []).append(cell)
    done = {_setting(r) for r in rows}
    keys = list(settings)
    doc: dict[str, Any] = {}
    for g in np.random.default_rng(0).permutation(len(keys)):
        key = keys[int(g)]
        if key in done:
            continue
        if time.monotonic() - t0 > minutes * 60:
            break
        solved: dict[int, dict[str, Placement]] = {}
        for cell in settings[key]:
            rows.append(run_cell(cell, grid, constants, trace, solved))
            if progress:
                progress(len(rows), len(cells), rows[-1])
        done.add(key)
        doc = {**_document(grid, constants, rows),
               "done": {"cells": len(rows), "of": len(cells), "settings": len(done),
                        "of_settings": len(keys),
                        "elapsed_s": elapsed + time.monotonic() - t0, "budget_min": minutes}}
        if save:
            save(doc)
    return doc
