"""Suite-wide: how `make test` shares the tests among xdist workers.

Each test file runs whole on one worker (`--dist loadfile`), so a module's cluster of daemons
is built once and a file's tests run in their order. (`--dist loadgroup` with one group per
file did this until pytest 9.2, whose nodeid no longer reads the `_nodeid` that xdist 3.8
appends the group to: the groups were silently ignored and a file's tests spread over the
workers.) The files that build network namespaces are
marked `namespaces`, and `make test` runs them after the others, one at a time: each testbed
checks that the host's qdiscs and mangle rules are as it found them (another testbed built
beside it would change them), and the chaos run's re-placements must not wait on a box that
three workers keep busy (under that load one run decided a single epoch in its 60 s)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

_NAMESPACE_TESTS = ("testbed/", "chaos/test_chaos_run.py")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "namespaces: builds network namespaces (run alone)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        rel = item.path.relative_to(root).as_posix()
        if rel.startswith(_NAMESPACE_TESTS):
            item.add_marker(pytest.mark.namespaces)


@pytest.fixture
def terminal_signals() -> Callable[[], None]:
    """`preexec_fn` for a child the test interrupts as Ctrl-C would: a suite run as a
    background job of a non-interactive shell ignores SIGINT, its children inherit that, and
    Python then never raises KeyboardInterrupt in them."""
    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return default_sigint
