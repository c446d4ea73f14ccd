"""Each simulator rule on a case small enough to compute by hand (times in ms in comments)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest

import edgemoe.sim
from edgemoe.placement.problem import Placement
from edgemoe.sim.constants import SimConstants, load
from edgemoe.sim.simulator import Change, Cluster, Copy, Request, simulate

# no fixed expert cost by default, so hand sums stay short
C = SimConstants(dense_fixed_s=1e-3, dense_token_s=0.0, expert_fixed_s=2e-3, expert_row_s=0.0,
                 message_s=0.5e-3, batching=False, caller_message_s=0.0)


def _cluster(S: int, rtt_ms: float, link_bps: float = 8e6, nic_bps: float | None = None
             ) -> Cluster:
    """1000-byte hidden states: 1 ms on an 8 Mbit/s link."""
    rtt = np.full((S, S), rtt_ms * 1e-3)
    np.fill_diagonal(rtt, 0.0)
    nic = None if nic_bps is None else np.full(S, nic_bps)
    return Cluster(np.ones(S), rtt, np.full((S, S), link_bps), hidden_size=500,
                   activation_bytes=2, nic_egress_bps=nic, nic_ingress_bps=nic)


def _placement(holders: np.ndarray) -> Placement:
    """Route to self when held, else to the first holder."""
    S = holders.shape[0]
    first = holders.argmax(0)
    route = np.where(holders, np.arange(S)[:, None, None], first[None])
    return Placement(holders, route)


def test_a_holder_fills_the_wire_time_of_a_remote_call_with_local_work() -> None:
    # server 0 holds e0, server 1 holds e1; 20 ms round trip
    holders = np.array([[[True, False]], [[False, True]]])
    remote = Request(0, 0.0, np.array([[[1]]]))  # prefill only, calls server 1
    local = Request(1, 0.0, np.array([[[1]]]))  # server 1's own, fully local
    res = simulate(_cluster(2, 20.0), _placement(holders), [remote, local], constants=C)
    # local: dense 0-1, expert 1-3 = 3 ms; the remote call lands at 1 + 1 + 10 = 12 and runs
    # 12-14.5 (0.5 overhead + 2 expert), back 14.5 + 1 + 10 = 25.5
    assert res.latencies_s[1] == pytest.approx(3e-3)
    assert res.latencies_s[0] == pytest.approx(25.5e-3)


def test_flows_into_one_server_share_its_nic_ingress() -> None:
    # servers 1 and 2 call an expert on server 0 at the same moment; links 1 ms per message;
    # expert and message handling cost nothing here so only the network shows
    holders = np.array([[[True]], [[False]], [[False]]])
    reqs = [Request(1, 0.0, np.array([[[0]]])), Request(2, 0.0, np.array([[[0]]]))]
    c0 = SimConstants(dense_fixed_s=1e-3, dense_token_s=0.0, expert_fixed_s=0.0,
                      expert_row_s=0.0, message_s=0.0, batching=False, caller_message_s=0.0)
    free = simulate(_cluster(3, 0.0), _placement(holders), reqs, constants=c0)
    shared = simulate(_cluster(3, 0.0, nic_bps=8e6), _placement(holders), reqs, constants=c0)
    # own links only: dense 0-1, sent 1-2, replies 2-3 on their own links
    assert free.latencies_s.tolist() == pytest.approx([3e-3, 3e-3])
    # one ingress on server 0: the second message lands at 3, its reply is back at 4
    assert sorted(shared.latencies_s) == pytest.approx([3e-3, 4e-3])
    # three messages through one egress: server 0 calls 1 and 2 (each holds one expert)
    holders = np.array([[[False, False]], [[True, False]], [[False, True]]])
    req = [Request(0, 0.0, np.array([[[0, 1]]]))]
    free = simulate(_cluster(3, 0.0), _placement(holders), req, constants=C)
    shared = simulate(_cluster(3, 0.0, nic_bps=8e6), _placement(holders), req, constants=C)
    # own links: both sent 1-2, run 2-4.5, back at 5.5; shared egress: second sent 2-3,
    # runs 3-5.5, back 6.5
    assert free.latencies_s[0] == pytest.approx(5.5e-3)
    assert shared.latencies_s[0] == pytest.approx(6.5e-3)


def test_batching_pays_a_layers_fixed_cost_once_for_waiting_decode_steps() -> None:
    holders = np.array([[[True]]])
    reqs = [Request(0, 0.0, np.array([[[0]]])) for _ in range(3)]  # 1 token, prefill only
    c = SimConstants(dense_fixed_s=1e-3, dense_token_s=0.5e-3, expert_fixed_s=2e-3,
                     expert_row_s=0.25e-3, message_s=0.0, batching=True, caller_message_s=0.0)
    one = Cluster(np.ones(1), np.zeros((1, 1)), np.full((1, 1), 1e9), hidden_size=8)
    res = simulate(one, _placement(holders), reqs, constants=c)
    # r0 dense alone 0-1.5; then r1+r2 dense (1 + 2*0.5 = 2) with r0's expert (2 + 0.25):
    # 1.5-5.75, r0 done at 5.75; then r1+r2 experts (2 + 2*0.25) 5.75-8.25
    assert res.latencies_s.tolist() == pytest.approx([5.75e-3, 8.25e-3, 8.25e-3])
    off = simulate(one, _placement(holders), reqs,
                   constants=SimConstants(**{**c.to_dict(), "batching": False}))
    # one at a time: dense 1.5 each, expert 2.25 each, FIFO by arrival in the queue:
    # r0d 0-1.5, r1d 1.5-3, r2d 3-4.5, r0e 4.5-6.75, r1e -9, r2e -11.25
    assert off.latencies_s.tolist() == pytest.approx([6.75e-3, 9e-3, 11.25e-3])


def test_prefill_runs_the_prompt_as_one_step_then_one_decode_step_per_token() -> None:
    holders = np.array([[[True, False]], [[False, True]]])
    ids = np.array([[[1]], [[1]], [[1]], [[1]]])  # 4 tokens: prompt 2, decode 2, remote
    c = SimConstants(dense_fixed_s=1e-3, dense_token_s=1e-3, expert_fixed_s=2e-3,
                     expert_row_s=1e-3, message_s=0.5e-3, batching=False, caller_message_s=0.0)
    res = simulate(_cluster(2, 10.0), _placement(holders), [Request(0, 0.0, ids)], constants=c)
    # prefill: dense 1 + 2*1 = 3; 2 hidden states 3-5, +5 = 10; 0.5 + 2 + 2*1 = 4.5 -> 14.5;
    # back 2 ms + 5 -> 21.5. Each decode step: dense 2, send 1 + 5, run 3.5, back 1 + 5 =
    # 17.5 -> 39 -> 56.5
    assert res.latencies_s[0] == pytest.approx(56.5e-3)
    assert res.first_token_s[0] == pytest.approx(21.5e-3)  # the prefill's end
    assert res.bytes_between_servers == 2 * 2000 + 2 * 2 * 1000
    assert res.local_share == 0.0
    # compute charged: server 0 dense 3 + 2 + 2; server 1 (holder) 4.5 + 3.5 + 3.5
    assert res.work_s.tolist() == pytest.approx([7e-3, 11.5e-3])


def test_migration_chunks_share_the_link_with_serving_and_switch_when_landed() -> None:
    before = np.array([[[False]], [[True]]])  # server 0 calls server 1's expert
    after = np.array([[[True]], [[True]]])
    change = Change(0.0, _placement(after), [Copy(1, 0, 2 << 20)])  # two 1 MiB chunks
    ids = np.array([[[0]]])
    reqs = [Request(0, 1e-4, ids), Request(0, 10.0, ids)]
    res = simulate(_cluster(2, 0.0), _placement(before), reqs, constants=C, changes=[change])
    chunk = (1 << 20) * 8 / 8e6  # 1.048576 s per chunk on the 8 Mbit/s link
    # the first request's reply (server 1 -> 0, ready at 4.6 ms) queues behind the first
    # chunk: back at chunk + 1 ms; the second chunk waits for that reply in turn
    assert res.latencies_s[0] == pytest.approx(chunk + 1e-3 - 1e-4)
    assert res.switched_at_s == pytest.approx(2 * chunk + 1e-3)
    # after the switch the expert is local: dense 1 + expert 2 = 3 ms
    assert res.latencies_s[1] == pytest.approx(3e-3)
    assert res.migration_bytes == 2 << 20


def test_constants_file_round_trips_and_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    C.save(path)
    got = load(path)
    assert got.dense_fixed_s == C.dense_fixed_s and got.batching is False
    assert got.source == str(path)
    path.write_text('{"expert_s": 1}')
    with pytest.raises(ValueError, match="unknown constants"):
        load(path)


def test_the_simulator_imports_only_data_types_from_placement() -> None:
    allowed = {"edgemoe.placement.problem": {"Placement", "Problem"}}
    root = Path(edgemoe.sim.__file__).parent
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert not a.name.startswith("edgemoe.placement"), (path.name, a.name)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "edgemoe.placement"):
                names = {a.name for a in node.names}
                assert names <= allowed.get(node.module, set()), (path.name, node.module, names)


def test_a_call_costs_its_caller_compute_when_the_answer_is_back() -> None:
    holders = np.array([[[True, False]], [[False, True]]])
    ids = np.array([[[1]], [[1]]])  # prompt 1 token, 1 decode step; expert 1 is on server 1
    c = SimConstants(dense_fixed_s=1e-3, dense_token_s=0.0, expert_fixed_s=2e-3,
                     expert_row_s=0.0, message_s=0.5e-3, caller_message_s=0.25e-3,
                     batching=False)
    res = simulate(_cluster(2, 10.0), _placement(holders), [Request(0, 0.0, ids)], constants=c)
    # each step: dense 1; send 1 + 5 -> 7; holder 0.5 + 2 -> 9.5; back 1 + 5 -> 15.5;
    # the caller opens the answer 0.25 -> 15.75. Two steps: 31.5 ms
    assert res.latencies_s[0] == pytest.approx(31.5e-3)
    # a call, dispatched at 1 (then 16.75), answered and opened at 15.75: 14.75 ms each
    assert res.remote_call_mean_s == pytest.approx(14.75e-3)
    free = simulate(_cluster(2, 10.0), _placement(holders), [Request(0, 0.0, ids)],
                    constants=SimConstants(**{**c.to_dict(), "caller_message_s": 0.0}))
    assert free.latencies_s[0] == pytest.approx(31.0e-3)
    assert free.remote_call_mean_s == pytest.approx(14.5e-3)


def test_each_end_of_a_call_pays_for_the_bytes_it_handles() -> None:
    holders = np.array([[[True, False]], [[False, True]]])
    ids = np.array([[[1]], [[1]]])  # prompt 1 token, 1 decode step; expert 1 is on server 1
    c = SimConstants(dense_fixed_s=1e-3, dense_token_s=0.0, expert_fixed_s=2e-3,
                     expert_row_s=0.0, message_s=0.5e-3, caller_message_s=0.25e-3,
                     batching=False, byte_s=1e-7)
    res = simulate(_cluster(2, 10.0), _placement(holders), [Request(0, 0.0, ids)], constants=c)
    # 1000-byte request and answer: each end 2000 bytes x 0.1 us = 0.2 ms more than
    # test_a_call_costs_its_caller_compute_when_the_answer_is_back's 15.75 per step:
    # holder 0.5 + 0.2 + 2, caller 0.25 + 0.2 -> 16.15 a step, 32.3 ms
    assert res.latencies_s[0] == pytest.approx(32.3e-3)
    assert res.remote_call_mean_s == pytest.approx(15.15e-3)
    assert res.work_s[1] == pytest.approx(2 * (0.5e-3 + 0.2e-3 + 2e-3))


def test_servers_on_shared_cores_split_them_while_more_are_busy_than_cores() -> None:
    # two servers, each its own fully local request: dense 1 ms, expert 2 ms per step;
    # server 0: prefill only (3 ms of work) from 0; server 1: prefill + 1 decode step
    # (6 ms) from 1 ms
    c = SimConstants(dense_fixed_s=1e-3, dense_token_s=0.0, expert_fixed_s=2e-3,
                     expert_row_s=0.0, message_s=0.0, caller_message_s=0.0, batching=False)
    holders = np.array([[[True]], [[True]]])
    reqs = [Request(0, 0.0, np.array([[[0]]])), Request(1, 1e-3, np.array([[[0]], [[0]]]))]
    own = simulate(_cluster(2, 0.0), _placement(holders), reqs, constants=c)
    assert own.latencies_s.tolist() == pytest.approx([3e-3, 6e-3])  # a processor each
    one = dataclasses.replace(_cluster(2, 0.0), shared_cores=1.0)
    res = simulate(one, _placement(holders), reqs, constants=c)
    # 0-1 server 0's dense alone; 1-3 both busy at half speed: server 1's dense ends at 3,
    # server 0's expert has 1 of 2 ms left; 3-5 both at half: server 0 ends at 5 (latency 5),
    # server 1's expert has 1 ms left, alone from 5: ends at 6; its decode step 6-7-9
    # (latency 9 - 1 = 8)
    assert res.latencies_s.tolist() == pytest.approx([5e-3, 8e-3])
    assert res.work_s.tolist() == pytest.approx([3e-3, 6e-3])  # the same work, shared
    two = dataclasses.replace(one, shared_cores=2.0)  # as many cores as servers: own speed
    assert simulate(two, _placement(holders), reqs, constants=c).latencies_s.tolist() == \
        pytest.approx([3e-3, 6e-3])
    with pytest.raises(ValueError, match="shared_cores"):
        simulate(dataclasses.replace(one, shared_cores=0.0), _placement(holders), reqs,
                 constants=c)


def test_per_expert_prefill_makes_one_call_per_token_and_expert() -> None:
    # a 2-token prompt and one decode step, every token routed to expert 1 on server 1
    holders = np.array([[[True, False]], [[False, True]]])
    ids = np.array([[[1]], [[1]], [[1]]])
    c = dataclasses.replace(C, prompt_fraction=0.7)  # int(3 * 0.7) = 2 prompt tokens
    req = [Request(0, 0.0, ids)]
    ours = simulate(_cluster(2, 10.0), _placement(holders), req, constants=c,
                    transport="per-server")
    paper = simulate(_cluster(2, 10.0), _placement(holders), req, constants=c,
                     transport="per-expert")
    # per-server prefill: one call of 2 hidden states: dense 1, sent 1-3, +5 = 8; 0.5 + 2
    # -> 10.5; back 2 + 5 -> 17.5
    assert ours.first_token_s[0] == pytest.approx(17.5e-3)
    # per-expert prefill: two calls of one row: sent 1-2 and 2-3, land at 7 and 8; the
    # holder runs 7-9.5 and 9.5-12 (0.5 message + 2 expert each); back 9.5-10.5 and 12-13,
    # +5 -> 18
    assert paper.first_token_s[0] == pytest.approx(18e-3)
    assert ours.bytes_between_servers == paper.bytes_between_servers == 6000
    # the holder: two messages and two expert runs in prefill, one of each in decode
    assert paper.work_s[1] == pytest.approx(7.5e-3)
    assert ours.work_s[1] == pytest.approx(5e-3)
