"""`edgemoe bench calibrate`: the simulator's constants, measured on this machine.

Compute: the model runtime's DeepSeek-V2 family (transformers, as `edgemoe.model` builds it)
at the shapes of the traces' model (hidden 2048, MLA attention, two shared experts, routed
experts of width 1408, top-6; few routed experts, since one expert's cost does not depend on
how many others exist), random weights (float32 by default: this CPU has no bf16 units).
The dense part of a layer is the model's forward with the routed experts switched off, per
layer; an expert's cost is its fused experts module called with rows routed to it. Each
figure is the best of several runs (other jobs on a shared box only ever add time), and
fixed/per-unit parts come from two sizes.

Messages: a signed msgpack request and reply of one hidden state over loopback aiohttp, the
round trip's median (HMAC-SHA256 over the body, checked by the receiver, as peers sign calls).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from edgemoe.model.tiny import TinyShape, shaped_config_kwargs
from edgemoe.sim.constants import SimConstants

# The traces' model: DeepSeek-V2-Lite's routing shape and hidden size at its real expert width,
# with few routed experts (one expert's cost does not depend on how many others exist) and two
# MoE layers (costs are per layer).
LITE = replace(TinyShape.deepseek_v2_lite(expert_width=1408), layers=2, experts=8)
# DeepSeek-V2-Lite's attention (MLA), which the tiny family defaults shrink
LITE_ATTENTION = {"num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512,
                  "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                  "v_head_dim": 128}


def _best(fn: Callable[[], Any], repeat: int,
          clock: Callable[[], float] = time.perf_counter) -> float:  # fmt: skip
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def measure_compute(shape: TinyShape = LITE, dtype: str = "float32", repeat: int = 5,
                    tokens: int = 32, attention: dict[str, Any] | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Dense and expert costs (seconds) of one MoE layer, fixed and per token/row.
    `dtype` float32 by default: CPUs without bf16 matrix units run bf16 many times slower.
    `attention`: the model's attention keys (default DeepSeek-V2-Lite's, `LITE_ATTENTION`).
    `clock`: wall time by default; `time.thread_time` (on one torch thread) gives the CPU
    work alone, which other jobs on a loaded box do not inflate."""
    import torch
    from transformers import AutoConfig

    from edgemoe.model.families import build_model, experts_modules

    kw = {**shaped_config_kwargs("deepseek_v2", shape), **(attention or LITE_ATTENTION),
          "first_k_dense_replace": 0, "num_hidden_layers": shape.layers}
    config = AutoConfig.for_model("deepseek_v2", **kw)
    routed = int(config.n_routed_experts)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        model = build_model(config, dtype=torch_dtype).eval()
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    mods = [m for _, m in experts_modules(model, routed)]
    layers = len(mods)
    original = [m.forward for m in mods]

    def run(n: int) -> float:
        ids = torch.randint(3, config.vocab_size, (1, n))
        with torch.no_grad():
            return _best(lambda: model(ids, use_cache=False), repeat, clock)

    for m in mods:  # routed experts off: what remains is the dense part (and embeddings)
        m.forward = lambda h, i, w: torch.zeros_like(h)  # type: ignore[method-assign]
    d1, dn = run(1), run(tokens)
    for m, f in zip(mods, original, strict=True):
        m.forward = f  # type: ignore[method-assign]
    expert = mods[0]

    def call(rows: int) -> float:
        h = torch.randn(rows, config.hidden_size, dtype=torch_dtype)
        idx = torch.zeros(rows, 1, dtype=torch.long)  # every row to expert 0
        w = torch.ones(rows, 1, dtype=torch_dtype)
        with torch.no_grad():
            return _best(lambda: expert(h, idx, w), repeat, clock)

    e1, en = call(1), call(tokens)
    token = max(dn - d1, 0.0) / (tokens - 1) / layers
    row = max(en - e1, 0.0) / (tokens - 1)
    return {"dense_fixed_s": max(d1 / layers - token, 0.0), "dense_token_s": token,
            "expert_fixed_s": max(e1 - row, 0.0), "expert_row_s": row}


async def _round_trips(hidden: int, calls: int) -> list[float]:
    import aiohttp
    import msgpack
    from aiohttp import web

    key = os.urandom(32)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        sig = hmac.new(key, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sig, request.headers.get("X-Signature", "")):
            return web.Response(status=401)
        msg = msgpack.unpackb(body)
        out = msgpack.packb({"id": msg["id"], "hidden": msg["hidden"]})
        return web.Response(body=out, content_type="application/msgpack",
                            headers={"X-Signature": hmac.new(key, out, hashlib.sha256)
                                     .hexdigest()})

    app = web.Application()
    app.router.add_post("/call", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    payload = os.urandom(hidden * 2)
    times = []
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(calls + 5):
                body = msgpack.packb({"id": i, "layer": 0, "experts": [0, 1],
                                      "hidden": payload})
                sig = hmac.new(key, body, hashlib.sha256).hexdigest()
                t0 = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}/call", data=body,
                                        headers={"X-Signature": sig}) as resp:
                    out = await resp.read()
                    ok = hmac.compare_digest(hmac.new(key, out, hashlib.sha256).hexdigest(),
                                             resp.headers.get("X-Signature", ""))
                    msgpack.unpackb(out)
                if not ok:
                    raise RuntimeError("reply signature did not verify")
                if i >= 5:  # warm-up: connection set-up
                    times.append(time.perf_counter() - t0)
    finally:
        await runner.cleanup()
    return times


def measure_message(hidden: int = 2048, calls: int = 200) -> float:
    """Median seconds of one signed msgpack round trip of a hidden state over loopback."""
    return statistics.median(asyncio.run(_round_trips(hidden, calls)))


def calibrate(shape: TinyShape = LITE, dtype: str = "float32", repeat: int = 5,
              attention: dict[str, Any] | None = None,
              clock: Callable[[], float] = time.perf_counter) -> SimConstants:
    compute = measure_compute(shape, dtype, repeat, attention=attention, clock=clock)
    message = measure_message(shape.hidden_size or 2048)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return SimConstants(**compute).with_call_cost(
        message, f"edgemoe bench calibrate {stamp} on {os.uname().nodename}")
