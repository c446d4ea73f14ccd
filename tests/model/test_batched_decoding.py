"""Continuous batching: every request decoded in a shared forward pass gets the tokens it would
get alone, whenever it joins or leaves; a cancelled request frees its row at once; and a step
sends one message per expert holder per layer whatever the number of requests."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from edgemoe.model.batching import BatchScheduler, GenerationParams, Request
from edgemoe.model.executor import StaticDirectory
from edgemoe.model.local import LocalExperts
from edgemoe.model.replay import RequestReplay
from edgemoe.model.routing import RoutingTrace
from edgemoe.model.runtime import load_distributed_model

PROMPTS = ("The quick brown fox", "Edge servers share experts over the LAN, one layer at a time",
           "Hi", "A mixture of experts routes each token", "Batch")  # fmt: skip


@dataclass
class Outcome:
    done: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    finish: str = ""
    error: BaseException | None = None


def _request(ids: list[int], params: GenerationParams, outcome: Outcome, **kw: object) -> Request:
    def on_done(req: Request, error: BaseException | None) -> None:
        outcome.tokens, outcome.finish, outcome.error = list(req.tokens), req.finish_reason, error
        outcome.done.set()

    return Request(ids, params, kw.pop("on_token", lambda _: None), on_done, **kw)  # type: ignore[arg-type]


def _wait(outcomes: list[Outcome]) -> None:
    for o in outcomes:
        assert o.done.wait(120), "a generation never finished"
        assert o.error is None, o.error


def _local_model(shards):
    local = LocalExperts(shards).load_all()
    return load_distributed_model(shards, StaticDirectory(local))


def _eos(model, tok) -> list[int]:
    eos = model.generation_config.eos_token_id
    return sorted({*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id} - {None})


def _alone(reference, ids: list[int], max_new: int, min_new: int = 0) -> list[int]:
    """Plain transformers `generate` of one request, greedy."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                 min_new_tokens=min_new, do_sample=False)  # fmt: skip
    return out[0, len(ids) :].tolist()


def test_requests_joining_and_leaving_mid_batch_get_the_tokens_they_get_alone(
    tiny_models, arch: str
) -> None:
    ckpt, shards = tiny_models.get(arch)
    model, tok = _local_model(shards)
    reference = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    # different lengths; the first two run to their length, the others may stop at EOS
    plan = [(20, 20), (6, 6), (12, 0), (9, 0), (15, 15)]
    scheduler = BatchScheduler(model, _eos(model, tok), max_batch=8)
    outcomes = [Outcome() for _ in plan]
    late = [_request(prompts[i], GenerationParams(max_tokens=m, min_tokens=n), outcomes[i])
            for i, (m, n) in list(enumerate(plan))[3:]]  # fmt: skip

    first: list[int] = []

    def join_late(tok_id: int) -> None:  # requests 3 and 4 join after request 0's 4th token
        first.append(tok_id)
        if len(first) == 4:
            for req in late:
                scheduler.submit(req)

    try:
        for i, (m, n) in list(enumerate(plan))[:3]:
            hook = {"on_token": join_late} if i == 0 else {}
            scheduler.submit(_request(prompts[i], GenerationParams(max_tokens=m, min_tokens=n),
                                      outcomes[i], **hook))  # fmt: skip
        _wait(outcomes)
    finally:
        scheduler.close()
    for i, (m, n) in enumerate(plan):
        assert outcomes[i].tokens == _alone(reference, prompts[i], m, n), f"request {i}"
    assert outcomes[1].finish == "length" and len(outcomes[1].tokens) == 6  # left mid-batch
    # fewer forwards than requests x tokens: the rows shared steps
    assert scheduler.steps < sum(len(o.tokens) for o in outcomes) - len(plan)


def test_sampling_parameters_stay_per_request_in_a_batch(tiny_models) -> None:
    _, shards = tiny_models.get("mixtral")
    model, tok = _local_model(shards)
    ids = tok(PROMPTS[0])["input_ids"]
    seeded = GenerationParams(max_tokens=12, min_tokens=12, temperature=1.3, top_p=0.9, seed=5)

    def run(params: list[GenerationParams]) -> list[list[int]]:
        scheduler = BatchScheduler(model, _eos(model, tok), max_batch=8, top_k=50)
        outcomes = [Outcome() for _ in params]
        try:
            for p, o in zip(params, outcomes, strict=True):
                scheduler.submit(_request(ids, p, o))
            _wait(outcomes)
        finally:
            scheduler.close()
        return [o.tokens for o in outcomes]

    (alone,) = run([seeded])
    greedy = GenerationParams(max_tokens=12, min_tokens=12)
    batched = run([greedy, seeded, GenerationParams(max_tokens=12, temperature=0.7, seed=9),
                   seeded])  # fmt: skip
    assert batched[1] == alone and batched[3] == alone  # its own generator, whoever shares
    assert batched[0] == run([greedy])[0]
    other = run([GenerationParams(max_tokens=12, min_tokens=12, temperature=1.3, seed=6)])[0]
    assert other != alone  # the seed, not the batch, decides


def test_a_request_cancelled_mid_batch_frees_its_row_for_a_waiting_one(tiny_models) -> None:
    ckpt, shards = tiny_models.get("mixtral")
    model, tok = _local_model(shards)
    reference = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    scheduler = BatchScheduler(model, _eos(model, tok), max_batch=2)
    long = GenerationParams(max_tokens=400, min_tokens=400)
    outcomes = [Outcome() for _ in range(3)]
    cancel = threading.Event()

    first: list[int] = []

    def leave_after_three(tok_id: int) -> None:  # its client goes away after 3 tokens
        first.append(tok_id)
        if len(first) == 3:
            cancel.set()

    try:
        scheduler.submit(_request(ids[0], long, outcomes[0], cancel=cancel,
                                  on_token=leave_after_three))  # fmt: skip
        scheduler.submit(_request(ids[1], long, outcomes[1]))
        scheduler.submit(_request(ids[2], GenerationParams(max_tokens=8, min_tokens=8),
                                  outcomes[2]))  # fmt: skip
        assert outcomes[0].done.wait(120) and outcomes[2].done.wait(120)
        assert not outcomes[1].done.is_set()  # the third ran in the first one's row
        assert scheduler.active == 1
    finally:
        scheduler.close()
    assert outcomes[0].finish == "cancelled" and len(outcomes[0].tokens) == 3
    assert outcomes[2].finish == "length"
    assert outcomes[2].tokens == _alone(reference, ids[2], 8, 8)


class CountingHolder:
    """A remote expert holder: counts messages (submits) and rows per layer."""

    def __init__(self, inner: LocalExperts) -> None:
        self.inner = inner
        self.messages: Counter[int] = Counter()
        self.rows: list[int] = []

    def submit(self, layer, hidden, expert_ids, weights) -> Future[torch.Tensor]:
        self.messages[layer] += 1
        self.rows.append(hidden.shape[0])
        future: Future[torch.Tensor] = Future()
        future.set_result(self.inner.forward(layer, hidden, expert_ids, weights))
        return future


@pytest.mark.parametrize("requests", [1, 4, 8])
def test_each_step_sends_one_message_per_holder_per_layer(tiny_models, requests: int) -> None:
    _, shards = tiny_models.get("mixtral")
    local = LocalExperts(shards).load_all()
    holders = [CountingHolder(local), CountingHolder(local)]
    # odd experts on one holder, even on the other, and every token routed to experts 0 and 1
    # (a routing trace): every pass of every layer needs both holders
    layers, experts = 2, 8
    split = {(l, e): e % 2 for l in range(layers) for e in range(experts)}
    routing = RoutingTrace(np.tile([[[0, 1]]], (4, layers, 1)), experts, 2)
    model, tok = load_distributed_model(
        shards, StaticDirectory.split(holders, split), routing=routing
    )
    ids = tok(PROMPTS[1])["input_ids"]
    new = 10
    scheduler = BatchScheduler(model, _eos(model, tok), max_batch=8)
    outcomes = [Outcome() for _ in range(requests)]
    try:
        for o in outcomes:
            scheduler.submit(_request(ids, GenerationParams(max_tokens=new, min_tokens=new), o))
        _wait(outcomes)
    finally:
        scheduler.close()
    forwards = requests + scheduler.steps  # one prefill each, then shared decode steps
    assert scheduler.steps == new - 1
    for holder in holders:
        assert dict(holder.messages) == {l: forwards for l in range(layers)}
        # a decode step's message carries every request's row
        assert holder.rows[-layers:] == [requests] * layers


def test_a_batched_forward_routes_each_row_by_its_own_requests_trace_rows() -> None:
    rng = np.random.default_rng(0)
    ids = np.stack([[rng.choice(8, 2, replace=False) for _ in range(2)] for _ in range(20)])
    replay = RequestReplay(RoutingTrace(ids, 8, 2), np.array([0, 8, 20]))
    a, b = replay.open(), replay.open()
    with replay.bind([a]):  # prefills, alone
        replay.route(0, 3, device=torch.device("cpu"), dtype=torch.float32)
    with replay.bind([b]):
        replay.route(0, 3, device=torch.device("cpu"), dtype=torch.float32)
    with replay.bind([b, a]):  # one decode step of both, b's row first
        got, _ = replay.route(0, 2, device=torch.device("cpu"), dtype=torch.float32)
    assert got[0].tolist() == ids[8 + 6, 0].tolist()  # b: rows 8..20, decode part from 14
    assert got[1].tolist() == ids[4, 0].tolist()  # a: rows 0..8, decode part from 4
