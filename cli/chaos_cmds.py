"""`edgemoe bench chaos`: a seeded nemesis against real daemons while clients generate."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer


def summary_lines(report: dict[str, Any]) -> list[str]:
    avail = report["availability_with_majority"]
    worst = report["worst_heal_to_success_s"]
    after = report.get("worst_heal_to_success_after_boot_s")
    back = report.get("worst_heal_to_success_once_back_s")
    lines = [
        f"seed {report['seed']}: {report['nodes']} nodes, {report['duration']:g}s, "
        f"{len(report['schedule'])} steps; requests {report['requests']}, succeeded "
        f"{report['succeeded']}, failed with a clear error {report['failed_clearly']}, wrong "
        f"{report['wrong']}, hung {report['hung']}",
        f"availability with a majority connected: "
        f"{'n/a' if avail is None else f'{avail:.1%}'} of {report['with_majority']}; worst "
        f"heal to first success {_secs(worst)} ({_secs(back)} from when the node itself was "
        f"back, not dead, frozen or gone; {_secs(after)} less its boot too; boots "
        f"{report.get('boots_s', [])} s; "
        f"{report.get('heals_cut_short', 0)} heals cut short by a later fault, longest "
        f"{_secs(report.get('worst_cut_short_lower_bound_s'))} before it); epochs decided "
        f"{report['epochs_decided']}; shards checked {report['shards_checked']}",
    ]
    internal = report["internal_errors"]
    if internal:
        lines.append(f"{len(internal)} internal errors (HTTP 500), first: {internal[0]}")
    faults = report["history"]["faults"]
    for v in report["violations"]:
        lines.append(f"VIOLATION (seed {report['seed']}, {_step_of(v, faults)}): {v}")
    lines.append(f"violations: {len(report['violations'])}")
    return lines


def _secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}s"


def _step_of(violation: str, faults: list[dict[str, Any]]) -> str:
    """The last step that began before the time the violation names (`at 12.3s`)."""
    import re

    m = re.search(r"at (\d+(?:\.\d+)?)s", violation)
    if m is None or not faults:
        return "after the run"
    t = float(m.group(1))
    before = sorted((f for f in faults if f["start"] <= t and f["kind"] != "boot"),
                    key=lambda f: f["start"])
    return f"step {before[-1]['step']} ({before[-1]['kind']})" if before else "before step 0"


def bench_chaos(
    nodes: Annotated[int, typer.Option(help="Daemons in the cluster (one more joins).")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the nemesis' schedule.")] = 0,
    duration: Annotated[float, typer.Option(help="Seconds during which faults start.")] = 120.0,
    join: Annotated[bool, typer.Option(help="A fresh node joins midway.")] = True,
    workdir: Annotated[
        Path | None, typer.Option(help="Keep model, configs, state dirs and logs here.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report.")] = None,
    remove_leftovers: Annotated[
        bool, typer.Option(help="Only remove namespaces left by crashed chaos runs.")
    ] = False,
) -> None:
    """Partitions, kill -9, SIGSTOP pauses, leaves, 1 Mbit/s links and a join, seeded, on real
    daemons in network namespaces while every node's client generates greedily; then a checker
    over the histories, `/v1/cluster` snapshots and disks. Exit 1 on any violation (the seed and
    step are printed). Needs root, iproute2 and iptables; removes all it made on exit."""
    from edgemoe.daemon.chaos.runner import ChaosSetting, run_chaos
    from edgemoe.daemon.chaos.runner import remove_leftovers as remove
    from edgemoe.daemon.testbed import TestbedError

    if remove_leftovers:
        names = remove()
        typer.echo(f"removed {len(names)} namespaces: {', '.join(names) or 'none left'}")
        return
    if nodes < 1 or duration <= 0:
        typer.echo("error: --nodes must be >= 1 and --duration > 0", err=True)
        raise typer.Exit(2)
    tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="edgemoe-chaos-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_chaos(ChaosSetting(nodes=nodes, seed=seed, duration=duration, join=join),
                           work, typer.echo)  # fmt: skip
    except TestbedError as exc:
        typer.echo(f"error (seed {seed}): {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        if tmp:
            shutil.rmtree(work, ignore_errors=True)
    for line in summary_lines(report):
        typer.echo(line)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
        typer.echo(f"wrote {json_out}")
    if report["violations"]:
        raise typer.Exit(1)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the application."""
    bench.command("chaos")(bench_chaos)
