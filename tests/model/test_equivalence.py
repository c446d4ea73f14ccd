"""The sharded model computes what the original HF model computes, wherever experts run."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgemoe.model.executor import StaticDirectory
from edgemoe.model.local import LocalExperts
from edgemoe.model.runtime import load_distributed_model

PROMPT = "The quick brown fox jumps over the lazy dog, again and again."


class ThreadedRemote:
    """A stand-in for a network executor: returns a pending future, completed by a thread."""

    def __init__(self, inner: LocalExperts) -> None:
        self.inner = inner
        self.calls = 0

    def submit(self, layer, hidden, expert_ids, weights) -> Future[torch.Tensor]:
        self.calls += 1
        assert bool((expert_ids >= 0).any(dim=1).all()), "rows without a slot here were sent"
        assert all(self.inner.holds(layer, int(e)) for e in expert_ids[expert_ids >= 0])
        future: Future[torch.Tensor] = Future()

        def run() -> None:
            future.set_result(self.inner.forward(layer, hidden, expert_ids, weights))

        threading.Thread(target=run).start()
        return future


def _reference(ckpt):
    return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


def _compare(reference, model, tokenizer) -> None:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = reference(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gen_want = reference.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    gen_got = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert gen_got.shape[1] == ids.shape[1] + 20
    assert torch.equal(gen_got, gen_want)


def test_all_experts_local_matches_hf_model(tiny_models, arch: str) -> None:
    ckpt, shards = tiny_models.get(arch)
    local = LocalExperts(shards).load_all()
    model, tokenizer = load_distributed_model(shards, StaticDirectory(local))
    _compare(_reference(ckpt), model, tokenizer)


def test_experts_split_over_three_executors_matches_hf_model(tiny_models, arch: str) -> None:
    ckpt, shards = tiny_models.get(arch)
    executors = [LocalExperts(shards) for _ in range(3)]
    manifest = executors[0].manifest
    assignment = {}
    for layer in range(manifest.num_layers):
        for expert in range(manifest.num_experts):
            i = (layer + expert) % 3
            executors[i].load(layer, expert)
            assignment[(layer, expert)] = i
    remote = ThreadedRemote(executors[2])
    pool = [executors[0], executors[1], remote]
    model, tokenizer = load_distributed_model(shards, StaticDirectory.split(pool, assignment))
    _compare(_reference(ckpt), model, tokenizer)
    assert remote.calls > 0
    assert all(len(e.held()) > 0 for e in executors)


def test_fused_checkpoint_layout_gives_the_same_model(tiny_models, arch: str) -> None:
    ckpt, shards = tiny_models.get(arch, "fused")
    model, tokenizer = load_distributed_model(
        shards, StaticDirectory(LocalExperts(shards).load_all())
    )
    _compare(_reference(ckpt), model, tokenizer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_and_experts_on_cuda_match_the_cpu_reference(tiny_models) -> None:
    ckpt, shards = tiny_models.get("deepseek_v3")
    local = LocalExperts(shards, device="cuda").load_all()
    model, tokenizer = load_distributed_model(shards, StaticDirectory(local), device="cuda")
    assert model.device.type == "cuda"
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model(ids.cuda()).logits.cpu()
        want = _reference(ckpt)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    # An RPC request arrives on the CPU: the answer comes back on the CPU.
    hidden = torch.randn(4, local.manifest.hidden_size)
    out = local.forward(0, hidden, torch.tensor([[0, 1]] * 4), torch.full((4, 2), 0.5))
    assert out.device.type == "cpu"
    cpu = LocalExperts(shards).load_all()
    want_out = cpu.forward(0, hidden, torch.tensor([[0, 1]] * 4), torch.full((4, 2), 0.5))
    torch.testing.assert_close(out, want_out, rtol=1e-3, atol=1e-3)


def test_a_missing_expert_is_an_error_not_a_silent_zero(tiny_models) -> None:
    _, shards = tiny_models.get("qwen3_moe")
    local = LocalExperts(shards).load_all()
    local.drop(0, 3)
    local.drop(1, 3)
    model, tokenizer = load_distributed_model(shards, StaticDirectory(local))
    ids = tokenizer(PROMPT * 3, return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="not held"), torch.no_grad():
        model(ids)
