import subprocess
import sys


def test_edgemoe_command_prints_help_and_exits_zero():
    out = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "bench" in out.stdout


def test_daemon_and_cli_install_inside_the_package():
    import edgemoe.cli
    import edgemoe.daemon

    assert edgemoe.cli.__name__ == "edgemoe.cli"
    assert edgemoe.daemon.__name__ == "edgemoe.daemon"
