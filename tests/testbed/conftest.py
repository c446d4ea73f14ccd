"""Testbed tests need root, ip/tc/iptables and netfilterqueue; each skips naming what is
missing. Helpers that look for anything a testbed left behind."""

from __future__ import annotations

import subprocess

import pytest

from edgemoe.daemon.testbed import missing_requirements, testbed_namespaces


@pytest.fixture
def testbed_ok() -> None:
    missing = missing_requirements()
    if missing:
        pytest.skip("testbed needs: " + "; ".join(missing))


def root_state() -> tuple[str, str]:
    """The host namespace's qdiscs and mangle rules (a testbed must never change them)."""
    tc = subprocess.run(["tc", "qdisc"], capture_output=True, text=True, check=True).stdout
    ipt = subprocess.run(
        ["iptables", "-S", "-t", "mangle"], capture_output=True, text=True, check=True
    ).stdout
    return tc, ipt


def leftovers(prefix: str, pids: list[int]) -> list[str]:
    """Namespaces named prefix* and processes of `pids` still there (zombies count as gone)."""
    found = [f"namespace {n}" for n in testbed_namespaces(prefix)]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(f"process {pid}")
    return found
