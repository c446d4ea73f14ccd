"""`edgemoe bench testbed`: strategies side by side on real daemons in network namespaces."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_STRATEGIES = "edgemoe,dancemoe,dancemoe+per-expert,eplb,layers"


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise _fail(f"{what}: expected numbers separated by commas, got {text!r}") from None


def results_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    s = report["setting"]
    bw = f"{s['bandwidth_mbps']:g} Mbit/s" if s["bandwidth_mbps"] else "unshaped"
    table = Table(title=(
        f"testbed: {s['nodes']} nodes ({', '.join(s['streams'])}), {bw}, "
        f"{s['delay_ms']:g} ms a side; {s['requests']} x {s['tokens']} tokens per node"
    ))  # fmt: skip
    for col in ("strategy", "tokens/s", "decode p50 ms", "decode p99 ms", "request s",
                "KB/token", "calls/token", "local share", "sim request s",
                "measured/sim"):  # fmt: skip
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name, r in report["strategies"].items():
        table.add_row(
            name, f"{r['tokens_per_s']:.2f}", f"{1000 * r['decode_latency_p50_s']:.1f}",
            f"{1000 * r['decode_latency_p99_s']:.1f}", f"{r['request_latency_mean_s']:.2f}",
            f"{r['bytes_between_nodes_per_token'] / 1000:.1f}",
            f"{r['remote_calls_per_token']:.1f}", f"{r['local_share']:.0%}",
            f"{r['simulated_request_latency_mean_s']:.2f}", f"x{r['measured_over_simulated']:.2f}",
        )  # fmt: skip
    return table


def strategy_ratios(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """edgemoe / each other strategy, from this run's numbers: measured and simulated (the
    simulator agrees when `sim_over_measured` is near 1)."""
    res = report["strategies"]
    if "edgemoe" not in res:
        return {}
    e = res["edgemoe"]
    out = {}
    for name, r in res.items():
        if name == "edgemoe" or not r["tokens_per_s"]:
            continue
        measured = e["request_latency_mean_s"] / r["request_latency_mean_s"]
        simulated = e["simulated_request_latency_mean_s"] / r["simulated_request_latency_mean_s"]
        out[name] = {
            "tokens_per_s": e["tokens_per_s"] / r["tokens_per_s"],
            "decode_latency_p50_s": e["decode_latency_p50_s"] / r["decode_latency_p50_s"],
            "bytes_between_nodes_per_token": e["bytes_between_nodes_per_token"]
            / max(r["bytes_between_nodes_per_token"], 1),
            "request_latency_mean_s": measured,
            "simulated_request_latency_mean_s": simulated,
            "sim_over_measured": simulated / measured,
        }
    return out


def node_lines(report: dict[str, Any]) -> list[str]:
    """Where each strategy's work went: per node, over the measured window."""
    return [
        f"{name} node {i}: {n['tokens_per_s']:.2f} tokens/s, decode p50 "
        f"{1000 * n['decode_latency_p50_s']:.0f} ms, CPU {n['cpu_s']:.1f} s (delay helper "
        f"{n.get('helper_cpu_s', 0.0):.1f} s), holds "
        f"{n['held']:.0f} experts, made {n['calls']:.0f} calls, served {n['served_calls']:.0f} "
        f"calls / {n['served_rows']:.0f} rows for peers"
        for name, r in report["strategies"].items() for i, n in enumerate(r.get("nodes") or [])
    ]


def breakdown_lines(report: dict[str, Any]) -> list[str]:
    """Per strategy, a request's parts measured and simulated: time to the first token (the
    prefill), the mean decode step and the mean remote expert call; and the other load on
    the box while it was measured."""
    return [
        f"{name}: first token {1000 * r['first_token_mean_s']:.0f} ms (sim "
        f"{1000 * r['simulated_first_token_mean_s']:.0f}), decode step "
        f"{1000 * r['decode_step_mean_s']:.1f} ms "
        f"(sim {1000 * r['simulated_decode_step_mean_s']:.1f}), remote call "
        f"{1000 * r.get('remote_call_mean_s', float('nan')):.1f} ms "
        f"(sim {1000 * r.get('simulated_remote_call_mean_s', float('nan')):.1f})"
        f"; box busy {r['box_busy_cores']:.2f} cores, other load {r['other_cores']:.2f}"
        for name, r in report["strategies"].items()
    ]


def ratio_lines(ratios: dict[str, dict[str, float]]) -> list[str]:
    return [
        f"edgemoe / {name}: tokens/s x{r['tokens_per_s']:.2f}, decode p50 "
        f"x{r['decode_latency_p50_s']:.2f}, bytes/token x{r['bytes_between_nodes_per_token']:.2f}"
        f", request latency measured x{r['request_latency_mean_s']:.2f} simulated "
        f"x{r['simulated_request_latency_mean_s']:.2f} (sim/measured {r['sim_over_measured']:.2f})"
        for name, r in ratios.items()
    ]


def bench_testbed(
    streams: Annotated[str, typer.Option(help="One routing stream per node (comma list).")] = (
        "intent,law,summary"
    ),
    bandwidth_mbps: Annotated[
        float, typer.Option(help="Per-node link rate, each direction (0: unshaped).")
    ] = 500.0,
    delay_ms: Annotated[float, typer.Option(help="One-way delay added per node.")] = 1.0,
    capacities: Annotated[
        str, typer.Option(help="Relative expert memory per node (comma list).")
    ] = "1,1,2",
    total_capacity: Annotated[
        float, typer.Option(help="All nodes' expert memory together, x the model's experts.")
    ] = 1.2,
    strategies: Annotated[
        str, typer.Option(help="Strategies to compare (comma list).")
    ] = DEFAULT_STRATEGIES,
    profile_requests: Annotated[
        int, typer.Option(help="Replayed requests per node before re-placing.")
    ] = 4,
    requests: Annotated[int, typer.Option(help="Measured requests per node.")] = 4,
    tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 16,
    seed: Annotated[int, typer.Option(help="Model seed.")] = 0,
    shape: Annotated[
        str, typer.Option(help="lite: DeepSeek-V2-Lite-shaped, tiny experts; tiny: 2x8.")
    ] = "lite",
    layers: Annotated[
        int | None, typer.Option(help="MoE layers of the model [default: the shape's].")
    ] = None,
    trace: Annotated[
        Path | None, typer.Option(help="Routing trace npz [default: shared/traces].")
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Keep model, configs and logs here (reused).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of tokens/s and p50.")] = None,
    remove_leftovers: Annotated[
        bool, typer.Option(help="Only remove namespaces left by crashed testbed runs.")
    ] = False,
) -> None:
    """Real daemons in network namespaces over shaped links, replaying real routing.

    Per strategy: start one daemon per namespace (only node 0 has the shards), wait for the
    placement, replay each node's stream for a profiling window, re-place (migrate), then
    measure; beside each, edgemoe.sim's prediction of the same run (constants from `bench
    calibrate`, run first). A strategy NAME+per-expert runs its daemons with the per-expert
    transport (one call per (token, expert): dancemoe+per-expert is DanceMoE as published).
    Needs root, iproute2, iptables and the netfilterqueue package; removes every namespace,
    qdisc, rule and process it made on exit, errors and Ctrl-C.
    """
    from rich.console import Console

    from edgemoe.daemon.config import STRATEGIES, TRANSPORTS
    from edgemoe.daemon.testbed import TestbedError
    from edgemoe.daemon.testbed.bench import BenchSetting, run_testbed_bench, split_strategy
    from edgemoe.daemon.testbed.lifecycle import remove_leftovers as remove
    from edgemoe.stats.traces import TraceError, default_trace_path

    out = Console(width=max(Console().width, 150))  # the table's 10 columns, unwrapped
    if remove_leftovers:
        names = remove()
        out.print(f"removed {len(names)} namespaces: {', '.join(names) or 'none left'}")
        return
    chosen = tuple(s.strip() for s in strategies.split(",") if s.strip())
    unknown = [s for s in chosen if split_strategy(s)[0] not in STRATEGIES
               or split_strategy(s)[1] not in TRANSPORTS]  # fmt: skip
    if unknown or not chosen:
        raise _fail(f"unknown strategy {unknown[0] if unknown else '(none)'}; choose from "
                    f"{', '.join(STRATEGIES)}, each optionally +per-expert")  # fmt: skip
    setting = BenchSetting(
        trace=trace or default_trace_path(),
        streams=tuple(s.strip() for s in streams.split(",") if s.strip()),
        capacities=_floats(capacities, "capacities"), total_capacity=total_capacity,
        bandwidth_mbps=bandwidth_mbps or None, delay_ms=delay_ms, strategies=chosen,
        profile_requests=profile_requests, requests=requests, tokens=tokens, seed=seed,
        shape=shape, layers=layers,
    )  # fmt: skip
    tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="edgemoe-testbed-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_testbed_bench(setting, work, out.print)
    except (TestbedError, TraceError) as exc:
        raise _fail(str(exc), code=1) from None
    finally:
        if tmp:
            shutil.rmtree(work, ignore_errors=True)
    report["ratios"] = {"edgemoe_over": strategy_ratios(report)}
    out.print(results_table(report))
    lines = node_lines(report) + breakdown_lines(report)
    for line in lines + ratio_lines(report["ratios"]["edgemoe_over"]):
        out.print(line)
    for name, r in report["strategies"].items():
        if r.get("failures"):
            out.print(f"{name}: {len(r['failures'])} requests failed in the daemon and were "
                      f"sent again; first: {r['failures'][0]}")  # fmt: skip
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        out.print(f"wrote {json_out}")
    if plot is not None:
        _plot(report, plot)
        out.print(f"wrote {plot}")


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["strategies"])
    res = report["strategies"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(names, [res[n]["tokens_per_s"] for n in names])
    a.set_ylabel("tokens/s (all nodes)")
    b.bar(names, [1000 * res[n]["decode_latency_p50_s"] for n in names], label="p50")
    b.plot(names, [1000 * res[n]["decode_latency_p99_s"] for n in names], "k^", label="p99")
    b.set_ylabel("decode step, ms")
    b.legend()
    s = report["setting"]
    fig.suptitle(f"testbed: {s['bandwidth_mbps']} Mbit/s, {s['delay_ms']} ms a side")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the application."""
    bench.command("testbed")(bench_testbed)
