"""The `edgemoe` typer application.

Each command group lives in its own module with a ``register(app, bench)`` function, so groups
stay independent and heavy imports (torch, aiohttp) happen inside commands, keeping ``--help``
fast.
"""

from __future__ import annotations

import typer

from edgemoe.cli import (
    chaos_cmds,
    cluster_cmds,
    demo_cmds,
    doctor_cmds,
    model_cmds,
    node_cmds,
    ops_cmds,
    placement_cmds,
    testbed_cmds,
)

app = typer.Typer(
    name="edgemoe",
    help="Serve a Mixture-of-Experts LLM from a peer-to-peer group of edge servers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench = typer.Typer(help="Benchmarks that print ratios measured side by side in one run.")
app.add_typer(bench, name="bench")

for module in (
    model_cmds, placement_cmds, cluster_cmds, node_cmds, ops_cmds, demo_cmds, doctor_cmds,
    testbed_cmds, chaos_cmds,
):  # fmt: skip
    module.register(app, bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
