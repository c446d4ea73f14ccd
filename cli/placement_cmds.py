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


def _gap_table(rows: list[dict[str, Any]], strategies: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="objective gap to the MILP optimum (%)")
    table.add_column("seed: SxLxE top-k", no_wrap=True)
    for col in (*strategies, "edgemoe solve s"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["instance"], *(f"{row[s] * 100:.2f}" for s in strategies),
                      f"{row['edgemoe_solve_s']:.2f}")
    console = Console()
    console.print(table)
    gaps = [row["edgemoe"] * 100 for row in rows]
    within = sum(g <= 3.0 for g in gaps)
    console.print(f"edgemoe gap: max {max(gaps):.2f}%, mean {sum(gaps) / len(gaps):.2f}%, "
                  f"{within} of {len(gaps)} instances within 3%")


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
    ) -> None:
        """Every strategy on one scenario and seed; ratios to eplb and dancemoe."""
        from dataclasses import replace

        from edgemoe.placement import STRATEGIES
        from edgemoe.placement.problem import PlacementError
        from edgemoe.sim.bench import HEURISTICS, optimal_gaps, preset, run, scale_solve_times
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
        if strategies:
            chosen = [s.strip() for s in strategies.split(",") if s.strip()]
            bad = [s for s in chosen if s not in STRATEGIES]
            if bad:
                raise _fail(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)}")
            sc.strategies = chosen
        sc = replace(sc)
        try:
            doc = run(sc)
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
