"""Threads that live in a testbed namespace: the bench talks to the daemons from them.

`setns(CLONE_NEWNET)` moves only the calling thread, so a pool whose threads enter a node's
namespace opens sockets there (the node's own clients, as a user of that box would be),
while the rest of the process stays in the host's namespace and touches nothing else.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

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


def namespace_pool(namespace: str, workers: int) -> ThreadPoolExecutor:
    """A pool whose threads run inside `namespace` (its file under /run/netns must exist)."""
    if not os.path.exists(os.path.join(NETNS_DIR, namespace)):
        raise TestbedError(f"no network namespace {namespace}")
    return ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix=f"{NS_THREAD_PREFIX}{namespace}",
        initializer=_enter,  # a failed setns breaks the pool: nothing runs outside the namespace
        initargs=(namespace,),
    )
