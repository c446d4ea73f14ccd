"""Config precedence and parsing; the peer envelope's HMAC and replay window."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgemoe.daemon.config import (
    Capacity,
    ConfigError,
    load_config,
    parse_capacity,
    torch_threads,
)
from edgemoe.daemon.identity import load_or_create_node_id
from edgemoe.daemon.wire import (
    BodyCheck,
    ReplayGuard,
    WireError,
    check_envelope,
    decode_array,
    encode_array,
    keys_for,
    pack,
    parse_envelope,
    request_headers,
    unpack,
)

SECRET = "s" * 32


def test_flags_override_env_override_toml(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        f'secret = "{SECRET}"\nstate_dir = "{tmp_path}"\nport = 7001\ncapacity = "40%"\n'
        'interface = ["127.0.0.1"]\nseed_peer = ["127.0.0.1:7002"]\n'
    )
    cfg = load_config(toml, {}, env={"EDGEMOE_PORT": "7003"})
    assert cfg.port == 7003
    assert cfg.capacity == Capacity("fraction", 0.4)
    assert cfg.seed_peer == (("127.0.0.1", 7002),)
    cfg = load_config(toml, {"port": 7004, "interface": []}, env={"EDGEMOE_PORT": "7003"})
    assert cfg.port == 7004 and cfg.interface == ("127.0.0.1",)
    assert cfg.url == "http://127.0.0.1:7004"


@pytest.mark.parametrize(
    ("text", "resolved"), [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("50%", 500), (300, 300)]
)
def test_capacity_sizes_and_shares(text: object, resolved: int) -> None:
    assert parse_capacity(text).resolve(1000) == resolved


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"capacity": "lots"}, "capacity"),
        ({"capacity": "0%"}, "capacity"),
        ({"port": "http"}, "port"),
        ({"interface": ["no-such-if9"]}, "interface"),  # names resolve; this one is none
        ({"seed_peer": ["nohost"]}, "seed_peer"),
        ({"strategy": "random"}, "strategy"),
        ({"torch_threads": -1}, "torch_threads"),
        ({"torch_threads": "many"}, "torch_threads"),
        ({"secret": None}, "secret"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, flags: dict, needle: str) -> None:
    base = {"secret": SECRET, "state_dir": str(tmp_path)}
    base.update(flags)
    if flags.get("secret", "") is None:
        base.pop("secret")
    with pytest.raises(ConfigError, match=needle):
        load_config(None, base, env={})


def test_torch_threads_leave_the_event_loop_a_core_unless_told(tmp_path: Path) -> None:
    base = {"secret": SECRET, "state_dir": str(tmp_path)}
    cores = len(os.sched_getaffinity(0))
    auto = load_config(None, base, env={})
    assert torch_threads(auto, env={}) == max(1, min(4, cores - 1))
    assert torch_threads(auto, env={"OMP_NUM_THREADS": "3"}) == 3
    told = load_config(None, base, env={"EDGEMOE_TORCH_THREADS": "6"})
    assert told.torch_threads == 6 and torch_threads(told, env={"OMP_NUM_THREADS": "3"}) == 6


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(f'secret = "{SECRET}"\nstate_dir = "{tmp_path}"\nprot = 1\n')
    with pytest.raises(ConfigError, match="prot"):
        load_config(toml, {}, env={})


def test_secrets_come_from_files_and_systemd_credentials(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "secret").write_text("s" * 32 + "\n")
    (tmp_path / "admin").write_text("admin-token\n")
    flags = {"state_dir": str(tmp_path), "secret_file": "secret",
             "admin_token_file": str(tmp_path / "admin")}  # fmt: skip
    cfg = load_config(None, flags, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.secret == "s" * 32 and cfg.admin_token == "admin-token"
    # The key itself wins over its file.
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    cfg = load_config(None, {**flags, "secret": "t" * 32}, env=env)
    assert cfg.secret == "t" * 32
    with pytest.raises(ConfigError, match="secret_file: cannot read"):
        load_config(None, {**flags, "secret_file": str(tmp_path / "nope")}, env={})
    with pytest.raises(ConfigError, match="tls_cert, tls_key: give both"):
        load_config(None, {**flags, "tls_cert": str(tmp_path / "c.pem")}, env=env)


def test_node_id_persists(tmp_path: Path) -> None:
    first = load_or_create_node_id(tmp_path / "state")
    assert load_or_create_node_id(tmp_path / "state") == first
    assert len(first) == 16


A, B = "a" * 16, "b" * 16


def _verify(key: bytes, guard: ReplayGuard, method: str, path: str, headers: dict[str, str],
            body: bytes, me: str = B) -> str:  # fmt: skip
    env = parse_envelope(headers)
    check_envelope(keys_for(key), guard, me, method, path, env)
    check = BodyCheck(env, 1 << 20)
    check.feed(body)
    check.finish()
    return env.sender


def test_signed_request_verifies_once_and_tampering_fails() -> None:
    key = SECRET.encode()
    body = pack({"x": 1})
    headers = request_headers(keys_for(key), A, B, "POST", "/v1/gossip", body)
    guard = ReplayGuard()
    assert _verify(key, guard, "POST", "/v1/gossip", headers, body) == A
    with pytest.raises(WireError, match="replayed"):
        _verify(key, guard, "POST", "/v1/gossip", headers, body)
    fresh = request_headers(keys_for(key), A, B, "POST", "/v1/gossip", body)
    with pytest.raises(WireError, match="sha256"):
        _verify(key, guard, "POST", "/v1/gossip", fresh, body + b"!")
    with pytest.raises(WireError, match="HMAC"):
        _verify(b"other" * 8, guard, "POST", "/v1/gossip", fresh, body)
    with pytest.raises(WireError, match="HMAC"):
        _verify(key, guard, "POST", "/v1/experts/forward", fresh, body)


def test_stale_timestamp_is_refused() -> None:
    key = SECRET.encode()
    headers = request_headers(keys_for(key), A, B, "GET", "/v1/dense", b"")
    guard = ReplayGuard(clock=lambda: float(headers["X-Edgemoe-Time"]) + 31)
    with pytest.raises(WireError, match="window"):
        _verify(key, guard, "GET", "/v1/dense", headers, b"")


def test_tensor_fields_are_checked() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    wire = unpack(pack(encode_array(arr)))
    out, dtype = decode_array(wire, dtypes=("float32",), ndim=2, max_elements=10, name="h")
    assert dtype == "float32" and np.array_equal(out, arr)
    with pytest.raises(WireError, match="dtype"):
        decode_array(wire, dtypes=("float16",), ndim=2, max_elements=10, name="h")
    with pytest.raises(WireError, match="limit"):
        decode_array(wire, dtypes=("float32",), ndim=2, max_elements=5, name="h")
    with pytest.raises(WireError, match="bytes"):
        decode_array(
            {**wire, "shape": [3, 3]}, dtypes=("float32",), ndim=2, max_elements=10, name="h"
        )
    with pytest.raises(WireError, match="malformed"):
        unpack(b"\xc1\xff")
