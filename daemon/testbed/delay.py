"""The delay helper: holds every packet the node's namespace receives for a fixed time.

This kernel has no netem, so one-way delay comes from user space: an iptables NFQUEUE rule on
the namespace's ingress (`PREROUTING -i eth0`) hands packets here, and each is accepted once
it has been held `--delay-ms`. Ingress, not OUTPUT: queueing on the sender's OUTPUT chain
collapsed throughput while planning (8.9 of 100 Mbit/s). Run one per namespace, as
`ip netns exec NS python -m edgemoe.daemon.testbed.delay --delay-ms D`; it prints `ready` once
bound, releases whatever it holds and exits on SIGTERM/SIGINT or when its parent dies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from typing import Any

# How long one wait for packets may last when nothing is held: bounds how late a stop
# request or a dead parent is noticed.
IDLE_POLL_S = 0.2
# Packets the kernel may queue for us before it drops new ones (the rule's --queue-bypass
# only applies when nobody is bound). 1 ms at 1 Gbit/s is ~85 full-size packets; this leaves
# room for 50 ms at 1 Gbit/s.
QUEUE_MAX_LEN = 8192


def _die_with_parent() -> None:
    """Ask the kernel to send us SIGTERM when the process that started us exits."""
    # If this fails, the getppid check in the loop still catches an orphaned helper.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def hold_packets(queue_num: int, delay_s: float) -> None:
    from netfilterqueue import COPY_META, NetfilterQueue

    parent = os.getppid()
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _die_with_parent()
    held: deque[tuple[float, Any]] = deque()

    def on_packet(pkt: Any) -> None:
        held.append((time.monotonic() + delay_s, pkt))

    nfq = NetfilterQueue()
    nfq.bind(queue_num, on_packet, max_len=QUEUE_MAX_LEN, mode=COPY_META)
    sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
    print("ready", flush=True)
    try:
        while not stopping and os.getppid() == parent:
            now = time.monotonic()
            while held and held[0][0] <= now:
                held.popleft()[1].accept()
            wait = min(held[0][0] - now, IDLE_POLL_S) if held else IDLE_POLL_S
            try:
                readable, _, _ = select.select([sock], [], [], max(wait, 0.0))
            except InterruptedError:
                continue
            if readable:
                nfq.run(block=False)
    finally:
        while held:  # never strand a packet: release all still held
            held.popleft()[1].accept()
        nfq.unbind()
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-num", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    hold_packets(args.queue_num, args.delay_ms / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
