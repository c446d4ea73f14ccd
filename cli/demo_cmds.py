"""Commands of this group; filled in by the issue that owns it."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the application."""
