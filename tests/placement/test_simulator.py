"""The simulator reproduces hand-computed latencies on a 2-server toy cluster."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.placement.problem import Placement
from edgemoe.sim.constants import SimConstants
from edgemoe.sim.simulator import Cluster, Request, simulate

# 10 ms round trip, 1 MB/s links, 1000-byte hidden state: 1 ms per message each way
CLUSTER = Cluster(np.ones(2), np.array([[0, 10e-3], [10e-3, 0]]), np.full((2, 2), 8e6),
                  hidden_size=500, activation_bytes=2)
TIMING = SimConstants(dense_fixed_s=1e-3, dense_token_s=0.0, expert_fixed_s=2e-3,
                      expert_row_s=0.0, message_s=0.5e-3, prompt_fraction=0.5, batching=False,
                      caller_message_s=0.0)


def _placement(holders: np.ndarray) -> Placement:
    route = np.where(holders, np.arange(2)[:, None, None], 1 - np.arange(2)[:, None, None])
    return Placement(holders, route)


def test_prefill_then_decode_over_one_remote_expert() -> None:
    holders = np.array([[[True, False]], [[False, True]]])  # server 0: e0, server 1: e1
    ids = np.array([[[1]], [[1]]])  # two tokens, 1 layer, top-1: expert 1 (remote)
    res = simulate(CLUSTER, _placement(holders), [Request(0, 0.0, ids)], constants=TIMING)
    # prefill: dense 1 -> send 1 -> +5 -> overhead 0.5 + expert 2 -> back 1 -> +5 = 15.5 ms
    # decode: starts at 15.5, same path again = 31.0 ms
    assert res.latencies_s[0] == pytest.approx(31.0e-3)
    assert res.bytes_between_servers == 4 * 1000
    assert res.local_share == 0.0


def test_transports_differ_by_messages_when_two_experts_are_remote() -> None:
    holders = np.array([[[False, False]], [[True, True]]])
    ids = np.array([[[0, 1]]])  # one token, both experts on server 1
    req = [Request(0, 0.0, ids)]
    ours = simulate(CLUSTER, _placement(holders), req, constants=TIMING, transport="per-server")
    paper = simulate(CLUSTER, _placement(holders), req, constants=TIMING, transport="per-expert")
    # per-server: 1 + 1 + 5 + (0.5 + 2*2) + 1 + 5 = 17.5 ms, 2 messages of 1000 B
    assert ours.latencies_s[0] == pytest.approx(17.5e-3)
    assert ours.bytes_between_servers == 2000
    # per-expert: two calls sent 1-2 and 2-3, landing at 7 and 8; the holder runs the first
    # as it lands (7-9.5) and the second after it (9.5-12); replies 9.5-10.5 and 12-13, +5:
    # 18 ms (the old simulator booked both calls at dispatch: 20 ms), 4 messages of 1000 B
    assert paper.latencies_s[0] == pytest.approx(18.0e-3)
    assert paper.bytes_between_servers == 4000


def test_local_tokens_wait_only_for_local_compute_and_are_deterministic() -> None:
    holders = np.array([[[True, False]], [[False, True]]])
    ids = np.array([[[0]], [[0]]])
    reqs = [Request(0, 0.0, ids), Request(0, 0.0005, ids)]
    a = simulate(CLUSTER, _placement(holders), reqs, constants=TIMING)
    b = simulate(CLUSTER, _placement(holders), reqs, constants=TIMING)
    # one compute queue, FIFO in arrival order: r0 dense 0-1; r1 dense (came at 0.5) 1-2,
    # r0 experts (ready at 1) 2-4, r1 experts 4-6, r0 decode dense 6-7, r1 dense 7-8, r0
    # experts 8-10, r1 experts 10-12 (the old simulator ran r0's prefill whole first: 9 ms)
    assert a.latencies_s[0] == pytest.approx(10e-3)
    assert a.latencies_s[1] == pytest.approx(12e-3 - 0.5e-3)
    assert np.array_equal(a.latencies_s, b.latencies_s)
    assert a.local_share == 1.0 and a.bytes_between_servers == 0
