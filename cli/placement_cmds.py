"""`edgemoe bench placement` and `edgemoe trace import-esft`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

RATIO_BASES = ("eplb", "dancemoe")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise _fail(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise _fail(f"{what} must be positive numbers, got {text!r}")
    return vals


def _table(doc: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    strategies = doc["strategies"]
    table = Table(title=title)
    for col in (
        "strategy",
        "transport",
        "mean s",
        "p50 s",
        "p99 s",
        "MB between",
        "local",
        "solve s",
        "/eplb lat",
        "/dancemoe lat",
        "/eplb MB",
        "/dancemoe MB",
    ):
        table.add_column(col, justify="left" if col in ("strategy", "transport") else "right")
    for name, r in strategies.items():
        ratios = []
        for base in RATIO_BASES:
            b = strategies.get(base if "+" not in name else f"{base}+per-expert")
            ratios.append(f"{r['latency_mean_s'] / b['latency_mean_s']:.3f}" if b else "-")
        for base in RATIO_BASES:
            b = strategies.get(base if "+" not in name else f"{base}+per-expert")
            ratios.append(
                f"{r['bytes_between_servers'] / max(b['bytes_between_servers'], 1):.3f}"
                if b
                else "-"
            )
        table.add_row(
            name,
            r["transport"],
            f"{r['latency_mean_s']:.3f}",
            f"{r['latency_p50_s']:.3f}",
            f"{r['latency_p99_s']:.3f}",
            f"{r['bytes_between_servers'] / 1e6:.1f}",
            f"{r['local_share']:.3f}",
            f"{r['solve_s']:.3f}",
            *ratios,
        )
    console = Console(width=max(Console().width, 150))
    console.print(table)
    e, d = strategies.get("edgemoe"), strategies.get("dancemoe+per-expert")
    if e and d:
        console.print(
            f"whole system, edgemoe (per-server) vs dancemoe+per-expert: latency "
            f"{e['latency_mean_s'] / d['latency_mean_s']:.3f}x, bytes "
            f"{e['bytes_between_servers'] / max(d['bytes_between_servers'], 1):.3f}x"
        )
    for row in doc["scenario"].get("scale_solve_s", []):
        times = ", ".join(f"{k}={v:.3f}" for k, v in row.items()
                          if k != "servers" and not k.endswith("_objective_s"))
        line = f"solve s (best of 3) at servers={row['servers']}: {times}"
        if "edgemoe_objective_s" in row and "layers_objective_s" in row:
            e, lay = row["edgemoe_objective_s"], row["layers_objective_s"]
            line += f"; objective edgemoe {e * 1e3:.3f} ms = {e / max(lay, 1e-15):.3f}x layers"
        console.print(line)
    gap = doc["scenario"].get("optimal_gap")
    if gap is not None:
        console.print(f"edgemoe objective gap to optimal: {gap * 100:.2f}%")
    for name, why in doc["scenario"].get("skipped", {}).items():
        console.print(f"{name}: skipped ({why})")
    for name, why in doc["scenario"].get("migration_refused", {}).items():
        console.print(f"{name}: migration not possible, kept its placement ({why})")
    if doc["scenario"].get("replaced_at_s") is not None:
        console.print(f"drift: switch at {doc['scenario']['switch_s']:.1f} s, re-placed at "
                      f"{doc['scenario']['replaced_at_s']:.1f} s from decayed statistics")


def _gap_table(rows: list[dict[str, Any]], strategies: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="objective gap to the MILP optimum (%)")
    table.add_column("seed: SxLxE top-k", no_wrap=True)
    for col in ("edgemoe_own", *strategies, "edgemoe solve s"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["instance"],
                      *(f"{row[s] * 100:.2f}" for s in ("edgemoe_own", *strategies)),
                      f"{row['edgemoe_solve_s']:.2f}")
    console = Console()
    console.print(table)
    for key, what in (("edgemoe_own", "edgemoe, own starts only"),
                      ("edgemoe", "edgemoe, with the baselines' placements among its starts")):
        gaps = [row[key] * 100 for row in rows]
        within = sum(g <= 3.0 for g in gaps)
        console.print(f"{what}: gap max {max(gaps):.2f}%, mean {sum(gaps) / len(gaps):.2f}%, "
                      f"{within} of {len(gaps)} instances within 3%")
    console.print("the baselines' columns are their placements' cost on edgemoe's objective, "
                  "which they do not optimise")


def _plot(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["strategies"])
    lat = [doc["strategies"][n]["latency_mean_s"] for n in names]
    mb = [doc["strategies"][n]["bytes_between_servers"] / 1e6 for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].bar(names, lat, color="tab:blue")
    axes[0].set_ylabel("mean request latency (s)")
    axes[1].bar(names, mb, color="tab:orange")
    axes[1].set_ylabel("MB between servers")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"placement benchmark: {doc['scenario']['name']}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _constants(path: Path | None) -> Any:
    from edgemoe.sim.constants import SimConstants, load

    if path is None:
        return SimConstants()
    try:
        return load(path)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _run_sweep(quick: bool, consts: Any, trace: Path | None, json_out: Path | None,
               plot: Path | None, minutes: float = 0.0, budget_of: str = "",
               resume: Path | None = None) -> None:
    from dataclasses import replace

    from rich.console import Console

    from edgemoe.bench.sweep import METRICS, QUICK, Grid, bounded, label, sweep
    from edgemoe.stats.traces import TraceError, default_trace_path

    path = str(trace or default_trace_path())
    if not Path(path).is_file():
        raise _fail(f"trace not found at {path}; pass --trace or set EDGEMOE_TRACES")
    console = Console(width=max(Console().width, 150))
    short = {"latency_mean_s": "mean", "latency_p50_s": "p50", "latency_p99_s": "p99"}

    def progress(i: int, n: int, row: dict[str, Any]) -> None:
        r = row["ratios"]
        console.print(f"[{i}/{n}] {label(row)}: " + ", ".join(
            f"{short[m]} {r[m]['ratio']:.3f} (vs {r[m]['best']})" for m in METRICS)
            + f"; system {row.get('system_mean', float('nan')):.3f}"
            + f"; picked {','.join(sorted(set(row['chosen'])))}")

    grid = QUICK if quick else Grid()
    if budget_of == "quick":  # the full grid's axes at the quick grid's per-run budget
        grid = replace(grid, max_requests=QUICK.max_requests, max_tokens=QUICK.max_tokens,
                       max_samples=QUICK.max_samples)
    previous = None
    if resume is not None:
        try:
            previous = json.loads(resume.read_text())
        except (OSError, ValueError) as exc:
            raise _fail(f"--resume {resume}: {exc}") from None

    def save(doc: dict[str, Any]) -> None:
        if json_out:
            json_out.write_text(json.dumps(doc, indent=2))

    try:
        doc = (bounded(grid, consts, path, minutes, progress, previous, save) if minutes
               else sweep(grid, consts, path, progress))
    except (TraceError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if not doc:
        raise _fail("--minutes ran out before the first setting, or --resume's grid is done")
    _sweep_table(doc, console)
    if "done" in doc:
        d = doc["done"]
        console.print(f"partial: {d['cells']} of {d['of']} cells ({d['settings']} of "
                      f"{d.get('of_settings', '?')} settings) in {d['elapsed_s']:.0f} s")
    if json_out:
        json_out.write_text(json.dumps(doc, indent=2))
    if plot:
        _sweep_plot(doc, plot)


def _sweep_table(doc: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    from edgemoe.bench.sweep import METRICS, label

    table = Table(title="edgemoe / best other strategy (per-server transport), by cell")
    for col in ("cell", "mean", "p50", "p99", "best (mean)", "system mean", "system bytes"):
        table.add_column(col, justify="left" if col == "cell" else "right")
    for row in doc["cells"]:
        r = row["ratios"]
        table.add_row(label(row), *(f"{r[m]['ratio']:.3f}" for m in METRICS),
                      r["latency_mean_s"]["best"], f"{row.get('system_mean', 0):.3f}",
                      f"{row.get('system_bytes', 0):.3f}")
    console.print(table)
    for m, w in doc["worst"].items():
        console.print(f"worst {m}: {w['ratio']:.3f} at {w['cell']}")


def _sweep_plot(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from edgemoe.bench.sweep import METRICS

    cells = doc["cells"]
    rows = sorted({(c["capacities"], c["speeds"], c["memory_ratio"]) for c in cells})
    cols = sorted({(c["bandwidth_mbps"], c["rtt_ms"], c["load"]) for c in cells})
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.8 * len(cols), 1.5 + 0.4 * len(rows) + 2))
    for k, (ax, m) in enumerate(zip(axes, METRICS, strict=True)):
        grid = np.full((len(rows), len(cols)), np.nan)
        for c in cells:
            i = rows.index((c["capacities"], c["speeds"], c["memory_ratio"]))
            j = cols.index((c["bandwidth_mbps"], c["rtt_ms"], c["load"]))
            grid[i, j] = c["ratios"][m]["ratio"]
        im = ax.imshow(grid, cmap="RdYlGn_r", vmin=0.5, vmax=1.5, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(f"edgemoe / best other, {m.split('_')[1]}")
        ax.set_xticks(range(len(cols)), [f"{b:g}Mb {r:g}ms L{ld:g}" for b, r, ld in cols],
                      rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), [f"{c} {s} m{mr:g}" for c, s, mr in rows] if k == 0
                      else [""] * len(rows), fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the application."""
    trace = typer.Typer(help="Routing traces: import and inspect.")
    app.add_typer(trace, name="trace")

    @trace.command("import-esft")
    def import_esft_cmd(
        out: Annotated[Path, typer.Argument(help="npz file to write")],
        task_dir: Annotated[
            list[Path],
            typer.Argument(help="ESFT results/expert_scores/<task> folders (task = folder name)"),
        ],
        top_k: Annotated[int, typer.Option(help="experts per token")] = 6,
    ) -> None:
        """Pack ESFT expert_weights_<layer>.txt files into one trace npz."""
        from edgemoe.stats.traces import TraceError, import_esft

        try:
            sizes = import_esft({d.name: d for d in task_dir}, out, top_k=top_k)
        except (TraceError, OSError) as exc:
            raise _fail(str(exc)) from None
        for task, n in sizes.items():
            typer.echo(f"{task}: {n} tokens")
        typer.echo(f"wrote {out}")

    @bench.command("calibrate")
    def bench_calibrate(
        json_out: Annotated[Path | None, typer.Option(
            "--json", help="write the constants file here (for --constants)")] = None,
        hidden: Annotated[int, typer.Option(help="model hidden size")] = 2048,
        expert_width: Annotated[int, typer.Option(help="routed expert width")] = 1408,
        dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
        repeat: Annotated[int, typer.Option(help="runs per figure (the best counts)")] = 5,
    ) -> None:
        """Measure the simulator's constants on this machine (model runtime, loopback RPC)."""
        from dataclasses import replace

        from edgemoe.bench.calibrate import LITE, calibrate

        if dtype not in ("float32", "bfloat16"):
            raise _fail(f"--dtype must be float32 or bfloat16, got {dtype!r}")
        if hidden <= 0 or expert_width <= 0 or repeat <= 0:
            raise _fail("--hidden, --expert-width and --repeat must be positive")
        consts = calibrate(replace(LITE, hidden_size=hidden, expert_width=expert_width), dtype,
                           repeat)
        for key, value in consts.to_dict().items():
            typer.echo(f"{key}: {value}")
        if json_out:
            consts.save(json_out)
            typer.echo(f"wrote {json_out}")

    @bench.command("placement")
    def bench_placement(
        scenario: Annotated[str, typer.Option(help="paper, paper4, drift, scale or gap")] = "paper",
        json_out: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
        plot: Annotated[Path | None, typer.Option(help="PNG bar chart")] = None,
        trace: Annotated[Path | None, typer.Option(help="trace npz (or EDGEMOE_TRACES)")] = None,
        streams: Annotated[str | None, typer.Option(help="streams, one per server: a,b,c")] = None,
        capacities: Annotated[str | None, typer.Option(help="relative capacities: 1,1,2")] = None,
        memory_ratio: Annotated[float | None, typer.Option(help="cluster memory / model")] = None,
        bandwidth_mbps: Annotated[float | None, typer.Option()] = None,
        rtt_ms: Annotated[float | None, typer.Option()] = None,
        expert_mb: Annotated[float | None, typer.Option()] = None,
        hidden: Annotated[int | None, typer.Option()] = None,
        seed: Annotated[int | None, typer.Option()] = None,
        rate: Annotated[float | None, typer.Option(help="requests/s per server")] = None,
        strategies: Annotated[str | None, typer.Option(help="subset, e.g. eplb,edgemoe")] = None,
        servers: Annotated[str, typer.Option(help="scale: server counts")] = "16,32,64,128,256",
        load: Annotated[float | None, typer.Option(
            help="share of each server's saturating rate (replaces --rate)")] = None,
        speeds: Annotated[str | None, typer.Option(help="compute speed per server: 2,1,1")] = None,
        constants: Annotated[Path | None, typer.Option(
            help="simulator constants (JSON from `bench calibrate`)")] = None,
        sweep: Annotated[bool, typer.Option(
            "--sweep", help="edgemoe / best other strategy over the grid of issue 13")] = False,
        quick: Annotated[bool, typer.Option("--quick", help="--sweep on a reduced grid")] = False,
        max_requests: Annotated[int, typer.Option(
            help="per stream and window (0: all)")] = 0,
        max_tokens: Annotated[int, typer.Option(help="per request, its first (0: all)")] = 0,
        judge: Annotated[bool, typer.Option(
            help="edgemoe picks among candidates on the simulated profile window")] = True,
        minutes: Annotated[float, typer.Option(
            help="--sweep: stop starting settings after this long (0: the whole grid); "
            "settings then run in a seeded shuffled order")] = 0.0,
        budget: Annotated[str, typer.Option(
            help="--sweep per-run budget: grid (its own) or quick (the --quick grid's)")] = "grid",
        resume: Annotated[Path | None, typer.Option(
            help="--sweep --minutes: continue this earlier run's JSON (same grid and "
            "constants): its cells kept, its settings skipped")] = None,
    ) -> None:
        """Every strategy on one scenario and seed; ratios to eplb and dancemoe."""
        consts = _constants(constants)
        if sweep or quick:
            if minutes < 0 or budget not in ("grid", "quick"):
                raise _fail("--minutes must not be negative; --budget is grid or quick")
            if resume is not None and not minutes:
                raise _fail("--resume continues a bounded run: give --minutes too")
            _run_sweep(quick, consts, trace, json_out, plot, minutes,
                       "quick" if budget == "quick" else "", resume)
            return
        from dataclasses import replace

        from edgemoe.bench.placement import (
            HEURISTICS,
            optimal_gaps,
            preset,
            run,
            scale_solve_times,
        )
        from edgemoe.placement import STRATEGIES
        from edgemoe.placement.problem import PlacementError
        from edgemoe.stats.traces import TraceError, default_trace_path

        if scenario == "gap":  # small random instances where the MILP proves the optimum
            rows = optimal_gaps()
            _gap_table(rows, HEURISTICS)
            if json_out:
                json_out.write_text(json.dumps({"scenario": {"name": "gap"}, "gaps": rows},
                                               indent=2))
            return
        try:
            sizes = [int(x) for x in servers.split(",")] if scenario == "scale" else []
            sc = preset(scenario, servers=16 if scenario == "scale" else 64)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        if trace is not None:
            sc.trace = str(trace)
        elif not sc.synthetic:
            sc.trace = str(default_trace_path())
            if "EDGEMOE_TRACES" not in os.environ and not Path(sc.trace).is_file():
                raise _fail(f"trace not found at {sc.trace}; pass --trace or set EDGEMOE_TRACES")
        if streams:
            sc.name = f"{scenario}+custom"
            sc.streams = [s.strip() for s in streams.split(",") if s.strip()]
            if capacities is None and len(sc.capacities) != len(sc.streams):
                sc.capacities = [1.0] * len(sc.streams)
        if capacities:
            sc.capacities = _floats(capacities, "--capacities")
        for flag, val in (
            ("memory_ratio", memory_ratio),
            ("bandwidth_mbps", bandwidth_mbps),
            ("rtt_ms", rtt_ms),
            ("expert_mb", expert_mb),
        ):
            if val is not None:
                if val <= 0:
                    raise _fail(f"--{flag.replace('_', '-')} must be positive")
                setattr(sc, flag, val)
        if hidden is not None:
            sc.hidden = hidden
        if seed is not None:
            sc.seed = seed
        if rate is not None:
            sc.request_rate = rate
        if load is not None:
            if load <= 0:
                raise _fail("--load must be positive")
            sc.load = load
        if speeds:
            sc.speeds = _floats(speeds, "--speeds")
        if max_requests < 0 or max_tokens < 0:
            raise _fail("--max-requests and --max-tokens must not be negative")
        sc.max_requests, sc.max_tokens, sc.judge = max_requests, max_tokens, judge
        if strategies:
            chosen = [s.strip() for s in strategies.split(",") if s.strip()]
            bad = [s for s in chosen if s not in STRATEGIES]
            if bad:
                raise _fail(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)}")
            sc.strategies = chosen
        sc = replace(sc)
        try:
            doc = run(sc, consts)
            if scenario == "scale":
                doc["scenario"]["scale_solve_s"] = scale_solve_times(sizes, sc.seed)
        except (TraceError, PlacementError, ValueError) as exc:
            raise _fail(str(exc)) from None
        e = doc["strategies"].get("edgemoe")
        o = doc["strategies"].get("optimal")
        if e and o:
            doc["scenario"]["optimal_gap"] = e["objective_s"] / max(o["objective_s"], 1e-15) - 1
        _table(doc, f"placement benchmark: {sc.name}")
        if json_out:
            json_out.write_text(json.dumps(doc, indent=2))
        if plot:
            _plot(doc, plot)
