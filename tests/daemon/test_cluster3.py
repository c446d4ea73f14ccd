"""Three daemons, only one with the shard directory, found by mDNS alone: they decide a
placement, stream the manifest, dense part and experts, and every node generates exactly the
single-process reference tokens. Also: `edgemoe generate --json` and the official openai client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from .conftest import (
    LONG_NEW,
    MAX_NEW,
    PROMPTS,
    TOKEN,
    Cluster,
    Node,
    TinyModel,
    placed,
    wait_for,
)


def test_three_nodes_discover_place_stream_and_match_reference(
    cluster3: Cluster, tiny: TinyModel
) -> None:
    fresh = cluster3.nodes[1:]
    view = wait_for(lambda: placed(cluster3), 90, "a placement announced by all three nodes")
    # discovered by mDNS alone: no seed peers were given
    assert all("--seed-peer" not in n.args for n in cluster3.nodes)
    members = {m["node_id"]: m for m in view["members"]}
    assert set(members) == {n.node_id for n in cluster3.nodes}
    assert view["placement"]["strategy"] == "edgemoe"
    # the fresh nodes streamed manifest, dense part and their experts into their state dir
    for node in fresh:
        store = node.state_dir / "model"
        assert (store / "manifest.json").is_file() and (store / "dense.safetensors").is_file()
        for key in view["holdings"][node.node_id]:
            layer, expert = key.split("/")
            assert (store / f"experts/L{layer}/E{expert}.safetensors").is_file()
        assert not any((store / ".partial").glob("*"))
    # each node holds at most its capacity (60% of 16 experts)
    assert all(len(v) <= 9 for v in view["holdings"].values())
    for node in cluster3.nodes:
        for prompt in PROMPTS:
            status, body = node.request("POST", "/v1/completions", {
                "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0})  # fmt: skip
            assert status == 200, body
            assert body["choices"][0]["token_ids"] == tiny.reference[prompt], (node.name, prompt)
    views = [n.cluster() for n in cluster3.nodes]
    # a node calls its peers exactly when some (token, expert) pair it routed was not held
    # locally; whether each node has such a pair depends on the placement, so the cluster as a
    # whole must have used peers, and each node's bytes must agree with its own routing
    assert sum(v["remote_bytes"] for v in views) > 0
    for v in views:
        remote_pairs = v["routed"]["total"] - v["routed"]["local"]
        assert (v["remote_bytes"] > 0) == (remote_pairs > 0), v["routed"]


def test_generate_json_cli(cluster3: Cluster, tiny: TinyModel) -> None:
    node = cluster3.nodes[1]
    env = {**os.environ, "EDGEMOE_API_TOKEN": TOKEN}
    prompt = PROMPTS[0]
    out = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "generate", "--node", node.url, "--max-tokens",
         str(MAX_NEW), "--temperature", "0", "--json", prompt],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["token_ids"] == tiny.reference[prompt]
    assert result["node"] == node.node_id and isinstance(result["text"], str)
    bad = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "generate", "--node", node.url, "--api-token",
         "wrong-token-000000", "--json", "x"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "token" in bad.stderr and "Traceback" not in bad.stderr


def test_openai_client_completion_and_streamed_chat(cluster3: Cluster, tiny: TinyModel) -> None:
    import openai

    node = cluster3.nodes[2]
    client = openai.OpenAI(base_url=node.url + "/v1", api_key=TOKEN, max_retries=0)
    model = client.models.list().data[0].id
    prompt = PROMPTS[1]
    done = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0)
    ids = [*tiny.reference[prompt]]
    assert done.choices[0].text == _decode(tiny, ids)
    assert done.usage is not None and done.usage.completion_tokens == len(ids)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    whole = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 1
    try:
        openai.OpenAI(base_url=node.url + "/v1", api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong API token was accepted")
    except openai.AuthenticationError:
        pass


def _decode(tiny: TinyModel, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.model_dir))
    return str(tok.decode(ids, skip_special_tokens=True))


def test_kill_9_then_restart_rejoins_with_its_id_and_shards(
    cluster3: Cluster, tiny: TinyModel
) -> None:
    """Runs last on the shared cluster: kill -9 a non-seed node while requests are in flight."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    seed, b, c = cluster3.nodes
    before = wait_for(lambda: placed(cluster3), 90, "a settled placement")
    c_had = set(before["holdings"][c.node_id])
    assert c_had, "the victim must hold experts for this test to mean anything"
    long_prompt = PROMPTS[1]

    def ask(node: Node, n: int) -> tuple[int, Any]:
        return node.request("POST", "/v1/completions", {
            "prompt": long_prompt, "max_tokens": n, "temperature": 0}, timeout=120)  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        inflight = [pool.submit(ask, seed, LONG_NEW), pool.submit(ask, b, LONG_NEW)]
        time.sleep(1.0)
        c.stop(signal.SIGKILL)
        results = [f.result() for f in inflight]
    for status, body in results:
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == tiny.long_reference, "in-flight request broke"

    survivors = Cluster([seed, b], cluster3.tmp, cluster3.cluster_id)
    after = wait_for(
        lambda: (v := placed(survivors)) and v["epoch"] > before["epoch"] and v,
        90,
        "a new epoch that re-places the dead node's experts",
    )
    dead = {m["node_id"]: m["state"] for m in after["members"]}
    assert dead[c.node_id] in ("dead", "suspect")
    assert c.node_id not in after["holdings"] or not after["holdings"][c.node_id]
    for node in (seed, b):
        status, body = ask(node, MAX_NEW)
        assert status == 200 and body["choices"][0]["token_ids"] == tiny.reference[long_prompt]

    old_id = c.node_id
    c.start()
    c.wait_ready(120)
    assert c.node_id == old_id  # persisted identity
    store = c.state_dir / "model"
    for key in c_had:  # its shards are still on disk, verified
        layer, expert = key.split("/")
        assert (store / f"experts/L{layer}/E{expert}.safetensors").is_file()
    rejoined = wait_for(
        lambda: (v := placed(cluster3)) and v["epoch"] > after["epoch"] and v,
        90,
        "the restarted node to rejoin and be given experts again",
    )
    assert rejoined["holdings"][c.node_id]
    status, body = ask(c, MAX_NEW)
    assert status == 200 and body["choices"][0]["token_ids"] == tiny.reference[long_prompt]
