"""A node still loading its model (here: a fresh node that cannot get it) answers its clients
through a ready peer, with the peer's exact tokens, streamed or not; a bad request is refused
as the peer refuses it; with no peer to ask, a clear 503."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from edgemoe.model.shard import DENSE_NAME

from .conftest import TOKEN, TinyModel, make_node, running, wait_for

BODY = {"prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


def _loading(node) -> str | None:  # type: ignore[no-untyped-def]
    try:
        status, health = node.request("GET", "/healthz", token=None, timeout=2)
    except OSError:
        return None
    if status == 200 and not health["ready"] and "fetching" in health["state"]:
        return str(health["state"])
    return None


def test_a_loading_node_answers_through_a_ready_peer(tiny: TinyModel, tmp_path: Path) -> None:
    import openai

    cid = f"deleg-{uuid.uuid4().hex[:6]}"
    a = make_node(tmp_path, "a", shard_dir=tiny.shard_dir, cluster_id=cid, capacity="100%")
    b = make_node(tmp_path, "b", shard_dir=None, cluster_id=cid, capacity="100%")
    with running(a):
        assert a.model_dir is not None
        # the only copy of the dense part on disk goes: b can fetch the manifest but never the
        # model, so it stays loading (a serves from memory)
        (a.model_dir / DENSE_NAME).unlink()
        b.start()
        try:
            wait_for(lambda: _loading(b), 60, "b fetching the model")
            status, direct = a.request("POST", "/v1/completions", BODY)
            assert status == 200, direct
            status, via = b.request("POST", "/v1/completions", BODY)
            assert status == 200, via
            assert via["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
            assert via["choices"][0]["text"] == direct["choices"][0]["text"]
            assert via["node_id"] == a.node_id

            # streamed chat, through the official client: the same tokens as a's own answer
            chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                    "temperature": 0}  # fmt: skip
            status, own = a.request("POST", "/v1/chat/completions", chat)
            assert status == 200, own
            client = openai.OpenAI(base_url=b.url + "/v1", api_key=TOKEN, max_retries=0)
            parts = list(client.chat.completions.create(
                model=own["model"], stream=True, **chat))  # fmt: skip
            text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
            assert text == own["choices"][0]["message"]["content"]
            assert parts[-1].choices[0].finish_reason == own["choices"][0]["finish_reason"]

            # the peer's checks hold: a bad request is refused, with the peer's reason
            status, err = b.request("POST", "/v1/completions", {**BODY, "max_tokens": 0})
            assert status == 400 and "max_tokens" in err["error"]["message"], err
            status, err = b.request("POST", "/v1/completions", {**BODY, "model": "other"})
            assert status == 404, err

            assert _loading(b), "b loaded the model after all: nothing was delegated"
            status, metrics = b.request("GET", "/metrics")
            assert "edgemoe_delegated_completions_total 2.0" in metrics.decode(), metrics
            status, metrics = a.request("GET", "/metrics")
            assert "edgemoe_completions_for_peers_total 2.0" in metrics.decode()
        finally:
            b.stop()


def test_a_loading_node_with_no_peer_says_so(tmp_path: Path) -> None:
    b = make_node(tmp_path, "alone", shard_dir=None, cluster_id=f"none-{uuid.uuid4().hex[:6]}",
                  capacity="100%")  # fmt: skip
    b.start()
    try:
        wait_for(lambda: b.request("GET", "/healthz", token=None, timeout=2)[0] == 200
                 if b.proc and b.proc.poll() is None else None, 60, "b listening")  # fmt: skip
        status, err = b.request("POST", "/v1/completions", BODY)
        assert status == 503, err
        assert "no peer could answer" in err["error"]["message"]
        status, err = b.request("POST", "/v1/completions", {**BODY, "seed": 2**70})
        assert status == 400 and "cannot be passed" in err["error"]["message"], err
    finally:
        b.stop()


def test_the_http_front_loads_without_torch() -> None:
    """The daemon's port opens before torch and transformers load (seconds of CPU on a busy
    box, when a restarted node could already answer through a peer): whatever `node` imports
    at the top stays free of them."""
    code = ("import sys, edgemoe.daemon.main, edgemoe.daemon.node; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
