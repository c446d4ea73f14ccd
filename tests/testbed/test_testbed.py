"""The namespace testbed: links shaped as asked, and nothing left behind however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from edgemoe.daemon.testbed import Testbed as NetTestbed
from edgemoe.daemon.testbed import TestbedError as BuildError
from edgemoe.daemon.testbed import TestbedSpec as Spec
from edgemoe.daemon.testbed import missing_requirements
from edgemoe.daemon.testbed.plan import shaping_commands
from edgemoe.daemon.testbed.probe import measure_rate, measure_rtt

from .conftest import leftovers, root_state

RATE_MBPS = 100
DELAY_MS = 5


def _helper_pids(prefix: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    pids = []
    for ns in (line.split()[0] for line in out.splitlines() if line.startswith(prefix)):
        listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        pids += [int(p) for p in listed.stdout.split()]
    return pids


def test_shaped_links_hold_rate_both_ways_and_delay(testbed_ok: None) -> None:
    spec = Spec(nodes=2, bandwidth_mbps=RATE_MBPS, delay_ms=DELAY_MS)
    with NetTestbed(spec) as tb:
        rtt = measure_rtt(tb, 0, 1)["rtt_median_s"]
        forward = measure_rate(tb, 0, 1)["mbps"]
        backward = measure_rate(tb, 1, 0)["mbps"]
    # one-way delay on each node's ingress: a round trip crosses both
    assert rtt == pytest.approx(2 * DELAY_MS / 1000, rel=0.20)
    assert forward == pytest.approx(RATE_MBPS, rel=0.15)
    assert backward == pytest.approx(RATE_MBPS, rel=0.15)  # the bridge port shapes this way


def test_pair_matrix_caps_one_pair_and_leaves_the_others_at_the_node_rate(
    testbed_ok: None,
) -> None:
    pairs = [[None, 40.0, None], [None, None, None], [None, None, None]]
    with NetTestbed(Spec(nodes=3, bandwidth_mbps=RATE_MBPS, pair_mbps=pairs)) as tb:
        capped = measure_rate(tb, 0, 1)["mbps"]
        other = measure_rate(tb, 0, 2)["mbps"]
    assert capped == pytest.approx(40.0, rel=0.15)
    assert other == pytest.approx(RATE_MBPS, rel=0.15)


def test_nothing_left_after_success(testbed_ok: None) -> None:
    before = root_state()
    with NetTestbed(Spec(nodes=2, bandwidth_mbps=50, delay_ms=1)) as tb:
        prefix = tb.spec.prefix
        pids = _helper_pids(prefix)
        assert len(pids) == 2  # one delay helper per node namespace
        assert measure_rtt(tb, 0, 1, count=5)["rtt_median_s"] > 0
    assert leftovers(prefix, pids) == []
    assert root_state() == before


def test_nothing_left_after_an_exception_inside(testbed_ok: None) -> None:
    before = root_state()
    tb = NetTestbed(Spec(nodes=2, bandwidth_mbps=50, delay_ms=1))
    with pytest.raises(RuntimeError, match="boom"), tb:
        pids = _helper_pids(tb.spec.prefix)
        raise RuntimeError("boom")
    assert len(pids) == 2
    assert leftovers(tb.spec.prefix, pids) == []
    assert root_state() == before


def test_nothing_left_after_a_failure_while_building(testbed_ok: None) -> None:
    # node 1's link cannot be shaped (tc refuses a rate this small): the build fails half-way
    spec = Spec(nodes=2, bandwidth_mbps=[50, 1e-9], delay_ms=1)
    with pytest.raises(BuildError, match="tc"):
        NetTestbed(spec).open()
    assert leftovers(spec.prefix, []) == []


_SCRIPT = """
import asyncio, sys, time
from edgemoe.daemon.testbed import Testbed, TestbedSpec

async def main():
    async with Testbed(TestbedSpec(nodes=2, bandwidth_mbps=50, delay_ms=1)) as tb:
        sleeper = tb.popen(1, ["sleep", "300"])
        print(tb.spec.prefix, sleeper.pid, flush=True)
        await asyncio.sleep(120)

asyncio.run(main())
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_nothing_left_after_a_signal_to_the_process_running_it(
    testbed_ok: None, tmp_path: Path, sig: signal.Signals, terminal_signals: Callable[[], None]
) -> None:
    before = root_state()
    script = tmp_path / "run_testbed.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=terminal_signals)  # fmt: skip
    try:
        assert proc.stdout is not None
        prefix, sleeper = proc.stdout.readline().split()
        pids = _helper_pids(prefix)
        assert int(sleeper) in pids and len(pids) == 3  # two delay helpers and the sleeper
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0  # the signal still ends it, after the cleanup
    assert leftovers(prefix, pids) == []
    assert root_state() == before


def test_refuses_naming_each_missing_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no ip, tc or iptables
    missing = " ".join(missing_requirements())
    for tool in ("`ip`", "`tc`", "`iptables`"):
        assert tool in missing
    with pytest.raises(BuildError, match="iptables"):
        NetTestbed(Spec(nodes=2)).open()


def test_refuses_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # this box runs the suite as root
    with pytest.raises(BuildError, match="root"):
        NetTestbed(Spec(nodes=2)).open()


def test_spec_rejects_bad_shapes() -> None:
    with pytest.raises(BuildError, match="nodes"):
        Spec(nodes=0)
    with pytest.raises(BuildError, match="bandwidth"):
        Spec(nodes=2, bandwidth_mbps=[10, -1])
    with pytest.raises(BuildError, match="delay"):
        Spec(nodes=2, delay_ms=-3)
    with pytest.raises(BuildError, match="3 values for 2 nodes"):
        Spec(nodes=2, delay_ms=[1, 2, 3])
    with pytest.raises(BuildError, match="2 x 2"):
        Spec(nodes=2, pair_mbps=[[None, 1]])


def test_pair_matrix_shapes_sender_by_destination_and_receiver_by_source() -> None:
    spec = Spec(nodes=2, bandwidth_mbps=100, pair_mbps=[[None, 30], [None, None]])
    text = [" ".join(c) for c in shaping_commands(spec)]
    sender = [c for c in text if spec.node_ns(0) in c and "u32" in c]
    receiver = [c for c in text if spec.bridge_ns in c and "dev p1" in c and "u32" in c]
    assert len(sender) == 1 and f"dst {spec.address(1)}/32" in sender[0]
    assert len(receiver) == 1 and f"src {spec.address(0)}/32" in receiver[0]
    assert any("dev p0 root tbf rate 100mbit" in c for c in text)  # node 0 receives at 100


def test_two_testbeds_at_once_do_not_clash(testbed_ok: None) -> None:
    a, b = Spec(nodes=2), Spec(nodes=2)
    with NetTestbed(a) as ta, NetTestbed(b) as tb:
        assert measure_rtt(ta, 0, 1, count=3)["rtt_median_s"] > 0
        assert measure_rtt(tb, 1, 0, count=3)["rtt_median_s"] > 0
    assert leftovers(a.prefix, []) == leftovers(b.prefix, []) == []

