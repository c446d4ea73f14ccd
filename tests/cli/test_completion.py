"""Shell completion (typer's) completes commands and sub-commands of the installed script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def complete(words: str) -> list[str]:
    exe = Path(sys.executable).parent / "edgemoe"
    env = {**os.environ, "_EDGEMOE_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split(" ")) - 1)}  # fmt: skip
    out = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_bash_completion_of_commands_and_groups() -> None:
    assert complete("edgemoe pla") == ["placement"]
    assert complete("edgemoe config ") == ["init", "check"]
    assert complete("edgemoe migrate --dr") == ["--dry-run"]


def test_completion_of_option_values() -> None:
    assert complete("edgemoe demo --strategy dan") == ["dancemoe"]
    assert complete("edgemoe demo --arch deepseek") == ["deepseek_v2", "deepseek_v3"]
