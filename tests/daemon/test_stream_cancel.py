"""A streaming client that goes away stops its generation (the worker is not held for the
remaining tokens), and the daemon keeps serving."""

from __future__ import annotations

import http.client
import json

from .conftest import MAX_NEW, PROMPTS, TOKEN, Node, TinyModel, wait_for

CANCELLED = "edgemoe_generations_cancelled_total"


def _cancelled(node: Node) -> float:
    status, body = node.request("GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(CANCELLED + " "):
            return float(line.split()[1])
    raise AssertionError(f"{CANCELLED} missing")


def test_client_leaving_a_stream_stops_its_generation(solo: Node, tiny: TinyModel) -> None:
    before = _cancelled(solo)
    conn = http.client.HTTPConnection("127.0.0.1", solo.port, timeout=60)
    body = {"prompt": PROMPTS[0], "max_tokens": 2048, "temperature": 0, "stream": True,
            "ignore_eos": True}  # a generation that reaches EOS by itself is not cancelled
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    assert json.loads(first[6:])["choices"][0]["token_ids"] == tiny.reference[PROMPTS[0]][:1]
    conn.sock.close()  # the client goes away after one token
    conn.close()
    wait_for(lambda: _cancelled(solo) == before + 1, 60, "the generation to be cancelled")
    status, done = solo.request("POST", "/v1/completions", {
        "prompt": PROMPTS[0], "max_tokens": MAX_NEW, "temperature": 0})  # fmt: skip
    assert status == 200 and done["choices"][0]["token_ids"] == tiny.reference[PROMPTS[0]]
