"""Threads that live in a testbed namespace: the bench talks to the daemons from them.

`setns(CLONE_NEWNET)` moves only the calling thread, so a pool whose threads enter a node's
namespace opens sockets there (the node's own clients, as a user of that box would be),
while the rest of the process stays in the host's namespace and touches nothing else.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from edgemoe.daemon.testbed.plan import TestbedError

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
NS_THREAD_PREFIX = "netns-"


def _enter(namespace: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, namespace), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise TestbedError(f"setns into {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NamespacePool:
    """`submit` runs a function on one of `workers` threads inside `namespace`.

    Daemon threads (not concurrent.futures' pool): a call blocked on a daemon that the
    testbed has just removed must not hold up the exit after Ctrl-C."""

    def __init__(self, namespace: str, workers: int) -> None:
        if not os.path.exists(os.path.join(NETNS_DIR, namespace)):
            raise TestbedError(f"no network namespace {namespace}")
        self._jobs: queue.Queue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._jobs = queue.Queue()
        self._threads = [
            threading.Thread(target=self._work, args=(namespace,), daemon=True,
                             name=f"{NS_THREAD_PREFIX}{namespace}-{i}")
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def _work(self, namespace: str) -> None:
        try:
            _enter(namespace)
        except (OSError, TestbedError) as exc:  # nothing may run outside the namespace
            while (job := self._jobs.get()) is not None:
                job[0].set_exception(exc)
            return
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


def namespace_pool(namespace: str, workers: int) -> NamespacePool:
    """A pool whose threads run inside `namespace` (its file under /run/netns must exist)."""
    return NamespacePool(namespace, workers)
