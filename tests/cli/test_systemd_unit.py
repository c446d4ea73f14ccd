"""The shipped unit passes `systemd-analyze verify` and keeps its hardening."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "edgemoe.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (Debian package: systemd)"
)


def _unit_with_real_binary(tmp_path: Path) -> Path:
    """verify checks that ExecStart exists; point it at this environment's edgemoe script."""
    exe = Path(sys.executable).parent / "edgemoe"
    assert exe.exists(), "the edgemoe console script is not installed next to python"
    text = UNIT.read_text().replace("/opt/edgemoe/bin/edgemoe", str(exe))
    copy = tmp_path / "edgemoe.service"
    copy.write_text(text)
    return copy


@needs_analyze
def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    unit = _unit_with_real_binary(tmp_path)
    out = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr  # unknown keys are only warnings: refuse them too


@needs_analyze
def test_unit_exposure_score_stays_low(tmp_path: Path) -> None:
    unit = _unit_with_real_binary(tmp_path)
    out = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert match, out.stdout[-2000:] + out.stderr
    assert float(match.group(1)) <= 3.0


def test_unit_runs_as_own_user_with_state_dir_and_graceful_stop() -> None:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    assert settings["User"] == ["edgemoe"]
    assert settings["StateDirectory"] == ["edgemoe"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["KillSignal"] == ["SIGTERM"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert settings[key] == ["yes"], key
    assert settings["ProtectSystem"] == ["strict"]
    exec_start = settings["ExecStart"][0].split()
    assert exec_start[1] == "daemon"
    assert "--config" in exec_start and "--state-dir" in exec_start
