"""`edgemoe bench cluster`: the cluster protocols on the seeded network simulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _print_run(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    sc = doc["scenario"]
    table = Table(
        title=f"cluster simulation: {sc['nodes']} nodes, loss {sc['loss']:.0%}, seed {sc['seed']}"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("membership rounds (join)", doc["membership_rounds"]),
        ("epochs decided", doc["epochs_decided"]),
        ("first decision at s", doc["first_decision_s"]),
        ("time to decide s (mean)", doc["decide_s_mean"]),
        ("time to decide s (max)", doc["decide_s_max"]),
        ("re-place after crash s", doc.get("replace_s")),
        ("messages per node per s", doc["msgs_per_node_s"]),
        ("consensus messages per epoch", doc["consensus_msgs_per_epoch"]),
        *((f"violations: {k}", v) for k, v in doc["violations"].items()),
        ("drops relying on an unseen crash", doc["lost_to_crash"]),
    ]
    for name, v in rows:
        table.add_row(name, _fmt(v))
    console = Console()
    console.print(table)
    for e in doc["violation_examples"]:
        console.print(f"[red]{e}[/red]")


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="right")
    for row in rows:
        t.add_row(*row)
    return t


def _print_sweep(doc: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    console.print(_table(
        "membership: one crash in a converged cluster",
        ("N", "log2 N", "detect s", "spread rounds", "msgs/node/s"),
        [(str(r["nodes"]), _fmt(r["log2_n"]), _fmt(r["detect_s"]), _fmt(r["spread_rounds"]),
          _fmt(r["msgs_per_node_s"])) for r in doc["membership"]],
    ))  # fmt: skip
    console.print(_table(
        "membership: everyone joins through seeds within 1 s",
        ("N", "rounds to converge", "msgs/node/s"),
        [(str(r["nodes"]), _fmt(r["join_rounds"]), _fmt(r["msgs_per_node_s"]))
         for r in doc["join"]],
    ))  # fmt: skip
    console.print(_table(
        "consensus, 8 nodes, one crash (mean over seeds)",
        ("loss", "decide s mean", "decide s max", "msgs/epoch", "re-place s", "violations"),
        [(f"{r['loss']:.0%}", _fmt(r["decide_s_mean"]), _fmt(r["decide_s_max"]),
          _fmt(r["consensus_msgs_per_epoch"]), _fmt(r["replace_s_mean"]),
          str(r["violations_total"])) for r in doc["consensus"]],
    ))  # fmt: skip


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the application."""

    @bench.command("cluster")
    def bench_cluster(
        nodes: Annotated[int, typer.Option(min=1, help="Simulated nodes.")] = 8,
        loss: Annotated[float, typer.Option(min=0.0, max=0.99, help="Message loss rate.")] = 0.0,
        partition_s: Annotated[
            float, typer.Option(min=0.0, help="Split majority/minority for this long (at 5 s).")
        ] = 0.0,
        crash: Annotated[
            int, typer.Option(min=0, help="Nodes crashed for good after the partition.")
        ] = 0,
        seed: Annotated[int, typer.Option(help="Simulator seed (a run replays exactly).")] = 0,
        duration: Annotated[
            float, typer.Option(min=0.0, help="Simulated seconds (0: long enough).")
        ] = 0.0,
        sweep: Annotated[
            bool, typer.Option(help="Run the issue's set (N=8..1024, loss 0/10/30%).")
        ] = False,
        max_nodes: Annotated[
            int, typer.Option(help="With --sweep: largest N of the membership rows.")
        ] = 1024,
        json_out: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    ) -> None:
        """Run the cluster protocols on the seeded simulator and count safety violations."""
        from edgemoe.cluster import bench as cb

        if sweep:
            sizes = tuple(n for n in (8, 64, 256, 1024) if n <= max_nodes)
            doc = cb.sweep(seed=seed, sizes=sizes, join_sizes=tuple(n for n in sizes if n <= 256))
            _print_sweep(doc)
            bad = sum(r["violations_total"] for r in doc["consensus"])
        else:
            doc = cb.run_bench(nodes, loss, partition_s, crash, seed, duration)
            _print_run(doc)
            bad = doc["violations_total"]
        if json_out is not None:
            json_out.write_text(json.dumps(doc, indent=2, default=str))
        if bad:
            raise typer.Exit(1)
