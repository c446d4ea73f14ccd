"""What a testbed is made of, as data: names, addresses and the commands that build it.

Sans-IO: `TestbedSpec` in, argv lists out; `lifecycle.Testbed` runs them. Every interface
lives inside a namespace of the testbed (the bridge and its ports in their own namespace, each
node's end as `eth0` in the node's), so nothing is created in the host's namespace and
deleting the namespaces removes every link, address, qdisc and iptables rule with them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

# Every namespace of every testbed starts with this, so leftovers of a crashed run are found.
PREFIX = "emtb-"
# Private range of the testbeds' node addresses; the traffic never leaves the namespaces.
SUBNET = "10.213.0"
NODE_IF = "eth0"
BRIDGE = "br0"
QUEUE_NUM = 0
# tbf's queue, as time at the configured rate: packets beyond it are dropped (TCP backs off).
TBF_LATENCY_MS = 50
# tbf's bucket: ~2 ms at the rate, at least a 64 KiB GSO packet (smaller ones are split).
TBF_BURST_S = 0.002
TBF_MIN_BURST_BYTES = 65536
MAX_NODES = 200


class TestbedError(RuntimeError):
    """The testbed cannot be built here; the message says what is missing or failed."""


@dataclass(frozen=True)
class TestbedSpec:
    """N nodes on one bridge. Per node: bandwidth (Mbit/s, each direction; None = unshaped)
    and one-way delay (ms, added to every packet the node receives). `pair_mbps[i][j]`
    (optional) caps i -> j below the node rates (HTB classes chosen by u32 on the address)."""

    nodes: int
    bandwidth_mbps: Sequence[float | None] | float | None = None
    delay_ms: Sequence[float] | float = 0.0
    pair_mbps: Sequence[Sequence[float | None]] | None = None
    run_id: str = field(default_factory=lambda: f"{os.getpid():x}{secrets.token_hex(2)}")
    # Start of the namespace names: a harness with its own (chaos: "emch-") neither removes
    # nor is removed by another's leftover cleanup.
    family: str = PREFIX

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise TestbedError(f"nodes must be 1..{MAX_NODES}, got {self.nodes}")
        for i in range(self.nodes):
            rate, delay = self.rate_of(i), self.delay_of(i)
            if rate is not None and rate <= 0:
                raise TestbedError(f"node {i}: bandwidth must be > 0 Mbit/s, got {rate}")
            if delay < 0:
                raise TestbedError(f"node {i}: delay must be >= 0 ms, got {delay}")
        if self.pair_mbps is not None:
            if len(self.pair_mbps) != self.nodes or any(
                len(row) != self.nodes for row in self.pair_mbps
            ):
                raise TestbedError(f"pair_mbps must be {self.nodes} x {self.nodes}")
            for i, row in enumerate(self.pair_mbps):
                for j, r in enumerate(row):
                    if r is not None and i != j and r <= 0:
                        raise TestbedError(f"pair {i}->{j}: bandwidth must be > 0, got {r}")

    def rate_of(self, node: int) -> float | None:
        return _per_node(self.bandwidth_mbps, node, self.nodes, "bandwidth_mbps")

    def delay_of(self, node: int) -> float:
        value = _per_node(self.delay_ms, node, self.nodes, "delay_ms")
        return float(value or 0.0)

    def pair_rate(self, src: int, dst: int) -> float | None:
        if self.pair_mbps is None or src == dst:
            return None
        return self.pair_mbps[src][dst]

    @property
    def prefix(self) -> str:
        """Common start of this testbed's namespace names."""
        return f"{self.family}{self.run_id}-"

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}br"

    def node_ns(self, node: int) -> str:
        return f"{self.prefix}n{node}"

    def port(self, node: int) -> str:
        return f"p{node}"

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"


def _per_node(value, node: int, nodes: int, what: str):  # type: ignore[no-untyped-def]
    if value is None or isinstance(value, int | float):
        return value
    if len(value) != nodes:
        raise TestbedError(f"{what}: {len(value)} values for {nodes} nodes")
    return value[node]


def _ip(ns: str, *args: str) -> list[str]:
    return ["ip", "-n", ns, *args]


def _in(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


def topology_commands(spec: TestbedSpec) -> list[list[str]]:
    """Namespaces, bridge, veth pairs, addresses: everything but shaping and delay."""
    br = spec.bridge_ns
    cmds = [
        ["ip", "netns", "add", br],
        _ip(br, "link", "set", "lo", "up"),
        _ip(br, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0"),
        _ip(br, "link", "set", BRIDGE, "up"),
    ]
    for i in range(spec.nodes):
        ns, port = spec.node_ns(i), spec.port(i)
        cmds += [
            ["ip", "netns", "add", ns],
            _ip(br, "link", "add", port, "type", "veth", "peer", "name", NODE_IF, "netns", ns),
            _ip(br, "link", "set", port, "master", BRIDGE),
            _ip(br, "link", "set", port, "up"),
            _ip(ns, "link", "set", "lo", "up"),
            _ip(ns, "addr", "add", f"{spec.address(i)}/24", "dev", NODE_IF),
            _ip(ns, "link", "set", NODE_IF, "up"),
            # mDNS goes to 224.0.0.251: without a route for it, sends fail before any
            # IP_MULTICAST_IF applies.
            _ip(ns, "route", "add", "224.0.0.0/4", "dev", NODE_IF),
        ]
    return cmds


def _burst_bytes(mbps: float) -> int:
    return max(int(mbps * 1e6 / 8 * TBF_BURST_S), TBF_MIN_BURST_BYTES)


def _tbf(ns: str, dev: str, mbps: float) -> list[str]:
    return [
        "tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
        "rate", f"{mbps}mbit", "burst", str(_burst_bytes(mbps)), "latency", f"{TBF_LATENCY_MS}ms",
    ]  # fmt: skip


def _htb(ns: str, dev: str, default_mbps: float | None, classes: dict[str, float],
         match: str) -> list[list[str]]:  # fmt: skip
    """HTB root with one class per peer address (u32 on `match` = src/dst) and a default."""
    top = default_mbps or 100_000.0  # unshaped: 100 Gbit/s, far above what veth carries
    burst = str(_burst_bytes(top))
    cmds = [
        ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
         "default", "1"],
        ["tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
         "rate", f"{top}mbit", "burst", burst],
    ]  # fmt: skip
    for k, (addr, mbps) in enumerate(sorted(classes.items()), start=10):
        rate = min(mbps, top)
        cmds += [
            ["tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", f"1:{k}",
             "htb", "rate", f"{rate}mbit", "burst", str(_burst_bytes(rate))],
            ["tc", "-n", ns, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip",
             "prio", "1", "u32", "match", "ip", match, f"{addr}/32", "flowid", f"1:{k}"],
        ]  # fmt: skip
    return cmds


def shaping_commands(spec: TestbedSpec) -> list[list[str]]:
    """Rate limits on both ends of each node's link: the node's `eth0` shapes what it sends,
    its bridge port what it receives (shaping one end only leaves the other direction at
    veth speed, 15 Gbit/s while planning)."""
    cmds: list[list[str]] = []
    for i in range(spec.nodes):
        rate = spec.rate_of(i)
        sends = {spec.address(j): r for j in range(spec.nodes) if (r := spec.pair_rate(i, j))}
        gets = {spec.address(j): r for j in range(spec.nodes) if (r := spec.pair_rate(j, i))}
        if sends:
            cmds += _htb(spec.node_ns(i), NODE_IF, rate, sends, "dst")
        elif rate is not None:
            cmds.append(_tbf(spec.node_ns(i), NODE_IF, rate))
        if gets:
            cmds += _htb(spec.bridge_ns, spec.port(i), rate, gets, "src")
        elif rate is not None:
            cmds.append(_tbf(spec.bridge_ns, spec.port(i), rate))
    return cmds


def delay_rule(spec: TestbedSpec, node: int) -> list[str]:
    """Hands every packet the node receives to its delay helper (`--queue-bypass`: while no
    helper is bound, packets pass undelayed instead of being dropped)."""
    return _in(
        spec.node_ns(node),
        "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", NODE_IF,
        "-j", "NFQUEUE", "--queue-num", str(QUEUE_NUM), "--queue-bypass",
    )  # fmt: skip


def in_namespace(spec: TestbedSpec, node: int, argv: Sequence[str]) -> list[str]:
    """argv run inside node's namespace."""
    return _in(spec.node_ns(node), *argv)
