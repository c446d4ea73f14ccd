"""Namespace testbed: real processes in network namespaces over shaped links.

`Testbed(TestbedSpec(nodes, bandwidth_mbps, delay_ms))` builds it (root, iproute2, iptables
and the netfilterqueue package), `probe` measures what the links do, and everything is removed
on exit, errors and signals. Used by `edgemoe bench testbed` and tests/testbed.
"""

from edgemoe.daemon.testbed.lifecycle import (
    Testbed,
    check_requirements,
    missing_requirements,
    remove_leftovers,
    testbed_namespaces,
)
from edgemoe.daemon.testbed.plan import TestbedError, TestbedSpec

__all__ = [
    "Testbed",
    "TestbedError",
    "TestbedSpec",
    "check_requirements",
    "missing_requirements",
    "remove_leftovers",
    "testbed_namespaces",
]
