"""`edgemoe doctor`: render the daemon side's verdicts (edgemoe.daemon.doctor) for a person or,
with ``--json``, a script. Exit 0 when no check fails (warnings pass), 1 when one does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add `doctor`."""

    @app.command("doctor")
    def doctor(
        config: Annotated[
            Path | None,
            typer.Option(
                "--config", "-c",
                help="Config file [default: $EDGEMOE_CONFIG, else /etc/edgemoe/edgemoe.toml]",
            ),
        ] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts")] = False,
    ) -> None:
        """What is wrong with this box and its cluster: each check's verdict and its fix."""
        from rich.console import Console
        from rich.markup import escape

        from edgemoe.cli.client import daemon_config_file
        from edgemoe.daemon.doctor import FAIL, as_json, run_doctor

        verdicts = run_doctor(daemon_config_file(config))
        failed = any(v.level == FAIL for v in verdicts)
        if json_out:
            typer.echo(json.dumps(as_json(verdicts), indent=2))
        else:
            out = Console(highlight=False, soft_wrap=True)
            for v in verdicts:
                level = f"[{_STYLE[v.level]}]{v.level:<4}[/]"
                out.print(f"{level}  {v.check:<11} {escape(v.message)}")
                if v.fix:
                    out.print(f"{'':17} fix: {escape(v.fix)}")
            bad = sum(v.level == FAIL for v in verdicts)
            warned = sum(v.level == "warn" for v in verdicts)
            out.print(f"{len(verdicts)} checks: {bad} failed, {warned} warnings")
        raise typer.Exit(1 if failed else 0)
