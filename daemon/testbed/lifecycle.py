"""The testbed's lifecycle: build it, hand it out, and remove everything it made.

`with Testbed(spec) as tb:` (or `async with`) builds namespaces, links, shaping and delay
helpers, and on leaving, on an exception, on SIGINT/SIGTERM (signal handlers chained to the
previous ones) and at interpreter exit (atexit) stops every process it started or that runs
in its namespaces and deletes the namespaces, which takes the links, qdiscs and iptables
rules with them. `remove_leftovers()` does the same for namespaces of crashed runs.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import IO, Any

from edgemoe.daemon.testbed.plan import (
    PREFIX,
    TestbedError,
    TestbedSpec,
    delay_rule,
    in_namespace,
    shaping_commands,
    topology_commands,
)

# One `ip`/`tc`/`iptables` call; they return in milliseconds unless the box is wedged.
COMMAND_TIMEOUT_S = 20.0
# From starting a delay helper to its `ready` line (python start + netfilterqueue import).
HELPER_READY_TIMEOUT_S = 30.0
# A stopped process gets this long after SIGTERM before SIGKILL.
STOP_GRACE_S = 3.0
_TOOLS = ("ip", "tc", "iptables")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def missing_requirements(*, need_delay: bool = True) -> list[str]:
    """What this machine lacks for a testbed, each with how to get it; [] when all is there."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (namespaces, qdiscs and iptables rules need it; run as root)")
    for tool in _TOOLS:
        if shutil.which(tool) is None:
            pkg = "iproute2" if tool in ("ip", "tc") else "iptables"
            missing.append(f"`{tool}` (apt-get install {pkg})")
    if need_delay and importlib.util.find_spec("netfilterqueue") is None:
        missing.append(
            "python package netfilterqueue (apt-get install libnetfilter-queue-dev "
            "build-essential; pip install 'edgemoe[testbed]')"
        )
    return missing


def check_requirements(*, need_delay: bool = True) -> None:
    missing = missing_requirements(need_delay=need_delay)
    if missing:
        raise TestbedError("the testbed needs: " + "; ".join(missing))


def run_command(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestbedError(f"`{' '.join(argv)}` failed: {exc}") from None
    if check and done.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")
    return done


def testbed_namespaces(prefix: str = PREFIX) -> list[str]:
    """Namespaces whose names start with `prefix` (all testbeds' by default)."""
    if shutil.which("ip") is None:
        return []
    out = run_command(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def _stop_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reaps our own children
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child: probe it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def remove_namespaces(prefix: str) -> list[str]:
    """Stop every process inside the namespaces named `prefix*`, then delete them.

    Deleting a namespace deletes its interfaces, their qdiscs and its iptables rules.
    Returns the names removed."""
    names = testbed_namespaces(prefix)
    pids: list[int] = []
    for ns in names:
        out = run_command(["ip", "netns", "pids", ns], check=False).stdout
        pids += [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]
    _stop_pids(pids)
    for ns in names:
        run_command(["ip", "netns", "delete", ns], check=False)
    return names


def remove_leftovers() -> list[str]:
    """Remove the namespaces (and what runs in them) of every testbed, e.g. of a crashed run.
    Only for when no other testbed is running on this machine."""
    return remove_namespaces(PREFIX)


class Testbed:
    """N namespaces on a bridge with shaped links; see the module docstring for cleanup."""

    def __init__(self, spec: TestbedSpec) -> None:
        self.spec = spec
        self._procs: list[subprocess.Popen[Any]] = []
        self.delay_helpers: dict[int, subprocess.Popen[Any]] = {}  # node -> its delay helper
        self._lock = threading.RLock()  # a signal handler may close while popen holds it
        self._closed = False
        self._previous: dict[int, Any] = {}
        self._hooked = False

    # ---- building -------------------------------------------------------------------------
    def open(self) -> Testbed:
        need_delay = any(self.spec.delay_of(i) > 0 for i in range(self.spec.nodes))
        check_requirements(need_delay=need_delay)
        self._install_cleanup_hooks()
        try:
            for argv in topology_commands(self.spec) + shaping_commands(self.spec):
                run_command(argv)
            for node in range(self.spec.nodes):
                if self.spec.delay_of(node) > 0:
                    self._start_delay(node)
        except BaseException:
            self.close()
            raise
        return self

    def _start_delay(self, node: int) -> None:
        argv = [sys.executable, "-m", "edgemoe.daemon.testbed.delay",
                "--delay-ms", str(self.spec.delay_of(node))]  # fmt: skip
        proc = self.popen(node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.delay_helpers[node] = proc
        line = _read_line(proc.stdout, HELPER_READY_TIMEOUT_S)
        if line.strip() != "ready":
            err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
            raise TestbedError(
                f"delay helper of node {node} did not start: {(line + err).strip() or 'timeout'}"
            )
        run_command(delay_rule(self.spec, node))

    # ---- using ------------------------------------------------------------------------------
    def address(self, node: int) -> str:
        return self.spec.address(node)

    def namespace(self, node: int) -> str:
        return self.spec.node_ns(node)

    def command(self, node: int, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside the node's namespace."""
        return in_namespace(self.spec, node, argv)

    def popen(self, node: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside node's namespace; it is stopped when the testbed closes."""
        if self._closed:
            raise TestbedError("testbed is closed")
        proc = subprocess.Popen(self.command(node, argv), start_new_session=True, **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    # ---- cleanup ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop our processes, delete our namespaces. Idempotent; safe from a signal handler
        (SIGINT/SIGTERM wait until it is done, then reach the previous handlers)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, self._procs = self._procs, []
        on_main = threading.current_thread() is threading.main_thread()
        if on_main:
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            _stop_pids([p.pid for p in procs if p.poll() is None])
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=STOP_GRACE_S)
                for stream in (p.stdin, p.stdout, p.stderr):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()
            remove_namespaces(self.spec.prefix)
        finally:
            atexit.unregister(self.close)
            if on_main:
                self._restore_signals()
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def _install_cleanup_hooks(self) -> None:
        if not self._hooked:
            self._hooked = True
            atexit.register(self.close)
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return  # signal handlers can only be set from the main thread
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        """Put back the handlers we replaced (main thread only)."""
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.close()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

    # ---- context managers -------------------------------------------------------------------
    def __enter__(self) -> Testbed:
        return self.open()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    async def __aenter__(self) -> Testbed:
        if threading.current_thread() is threading.main_thread():
            self._install_cleanup_hooks()  # before the worker thread: handlers need main
        try:
            return await asyncio.to_thread(self.open)
        except BaseException:
            self.close()  # on the main thread: restores the signal handlers too
            raise

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await asyncio.to_thread(self.close)
        if threading.current_thread() is threading.main_thread():
            self._restore_signals()  # close ran on a worker thread, which cannot


def _read_line(stream: IO[str] | None, timeout_s: float) -> str:
    if stream is None:
        return ""
    readable, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline() if readable else ""
