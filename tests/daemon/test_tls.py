"""Optional TLS: with tls_cert/tls_key the client API speaks HTTPS (the openai client trusting
the cluster's CA talks to it), while peers and local clients keep plain HTTP on the same port;
an unusable certificate is a start that cannot work (exit 5, one line)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from .conftest import MAX_NEW, PROMPTS, TOKEN, Node, TinyModel, make_node
from .test_bad_input import signed
from .test_lifecycle import daemon_args, one_error_line, run_to_exit

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_node(
    tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Node, Path]]:
    """A node serving HTTPS with a self-signed certificate, and that certificate (its CA)."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(tmp)
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    node = make_node(tmp, "tls", shard_dir=tiny.shard_dir, cluster_id="tls", capacity="100%",
                     mdns=False, extra=tls)  # fmt: skip
    node.start()
    try:
        node.wait_ready(120)  # /healthz over plain HTTP from loopback
        yield node, cert
    finally:
        node.stop()


def test_the_client_api_speaks_https_to_a_client_trusting_the_cert(
    tls_node: tuple[Node, Path], tiny: TinyModel
) -> None:
    node, cert = tls_node
    ctx = ssl.create_default_context(cafile=cert)
    base = f"https://127.0.0.1:{node.port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def ask() -> tuple[dict, dict]:
        async with aiohttp.ClientSession(headers=auth) as session:
            async with session.get(base + "/v1/cluster", ssl=ctx) as resp:
                view = await resp.json()
            body = {"prompt": PROMPTS[0], "max_tokens": MAX_NEW, "temperature": 0}
            async with session.post(base + "/v1/completions", json=body, ssl=ctx) as resp:
                return view, await resp.json()

    view, answer = asyncio.run(ask())
    assert view["node_id"] == node.node_id
    assert answer["choices"][0]["token_ids"] == tiny.reference[PROMPTS[0]]
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(base + "/healthz", timeout=30)  # an untrusted cert is refused


def test_peers_and_local_clients_keep_plain_http_on_the_same_port(
    tls_node: tuple[Node, Path],
) -> None:
    node, _ = tls_node
    status, _ = signed(node, "GET", "/v1/hello")
    assert status == 200
    status, body = node.request("GET", "/v1/cluster")
    assert status == 200 and body["node_id"] == node.node_id


def test_an_unusable_certificate_exits_5(tmp_path: Path) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate")
    code, out = run_to_exit(daemon_args(tmp_path / "state", None, "--tls-cert", str(bad),
                                        "--tls-key", str(bad)))  # fmt: skip
    assert code == 5, out
    assert f"tls_cert {bad}" in one_error_line(out)
