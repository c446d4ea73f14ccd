"""Two real daemons serve a tiny MXFP4 GPT-OSS: the library's dequantized model's greedy tokens,
and a capacity in bytes counted in dequantized experts (what memory holds), not shard bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgemoe.daemon.config import ConfigError, load_config

from .conftest import MAX_NEW, PROMPTS, Cluster, make_node, placed, wait_for

HELD_BY_SEED = 10  # experts of 16 the seed's capacity in bytes holds once dequantized


def test_expert_dtype_is_checked_like_every_key(tmp_path: Path) -> None:
    flags = {"secret": "s" * 16, "state_dir": str(tmp_path)}
    assert load_config(flags=flags, env={}).expert_dtype == "native"
    assert load_config(flags={**flags, "expert_dtype": "bfloat16"}, env={}).expert_dtype == (
        "bfloat16"
    )
    with pytest.raises(ConfigError, match="expert_dtype: must be one of native, bfloat16"):
        load_config(flags={**flags, "expert_dtype": "int4"}, env={})


def test_two_daemons_serve_mxfp4_experts_like_the_library(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgemoe.model.local import LocalExperts
    from edgemoe.model.shard import shard_checkpoint
    from edgemoe.model.tiny import write_tiny_model

    tmp = tmp_path_factory.mktemp("mxfp4")
    ckpt = write_tiny_model("gpt_oss", tmp / "ckpt", seed=5, quantize="mxfp4")
    manifest, _ = shard_checkpoint(ckpt, tmp / "shards")
    reference = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    held = LocalExperts(tmp / "shards").expert_memory_bytes()  # float32, dequantized
    assert held > 4 * manifest.expert_bytes

    cid = f"mxfp4-{os.getpid()}"
    seed = make_node(tmp, "seed", shard_dir=tmp / "shards", cluster_id=cid, mdns=False,
                     capacity=f"{HELD_BY_SEED * held}b")  # fmt: skip
    other = make_node(tmp, "b", shard_dir=None, cluster_id=cid, capacity="60%", mdns=False,
                      extra=["--seed-peer", f"127.0.0.1:{seed.port}"])  # fmt: skip
    other.env["EDGEMOE_EXPERT_DTYPE"] = "float32"
    cluster = Cluster([seed, other], tmp, cid)
    try:
        for node in cluster.nodes:
            node.start()
        for node in cluster.nodes:
            node.wait_ready(180)
        view = wait_for(lambda: placed(cluster), 90, "a placement held by both nodes")
        members = {m["node_id"]: m for m in view["members"]}
        # offered to the placement in shard bytes: as many experts as fit dequantized
        assert members[seed.node_id]["capacity_bytes"] == HELD_BY_SEED * manifest.expert_bytes
        assert len(view["holdings"][seed.node_id]) <= HELD_BY_SEED
        for node in cluster.nodes:
            for prompt in PROMPTS:
                ids = tok(prompt, return_tensors="pt")["input_ids"]
                want = reference.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
                status, body = node.request("POST", "/v1/completions", {
                    "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0})  # fmt: skip
                assert status == 200, body
                assert body["choices"][0]["token_ids"] == want[0, ids.shape[1] :].tolist()
        assert sum(n.cluster()["remote_bytes"] for n in cluster.nodes) > 0
    finally:
        cluster.stop()
