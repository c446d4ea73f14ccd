"""The daemon's settings: TOML file, then EDGEMOE_* environment, then command-line flags.

Keys are the flag names with '-' -> '_' (contracts.md); repeatable flags are lists. Every value
is checked here so the daemon fails at start with one line naming the key, never later.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgemoe.cluster.config import ClusterConfig

# edgemoe.model.quantized.EXPERT_DTYPES' names, without importing torch to check a config.
EXPERT_DTYPES = ("native", "bfloat16", "float32")

DEFAULT_PORT = 7600
# Drift (edgemoe.stats.drift: the share of a node's expert selections that moved to other
# experts, per layer, worst node) above which the cluster re-places by itself. Measured on the
# DeepSeek-V2-Lite traces (shared/traces): one task against itself (5 requests against the next
# 5, or half against half) drifts 0.02-0.08, one task against another 0.29-0.44. A node's
# decayed counts mix old and new task linearly, so after a task change its drift is
# (new share) x 0.29-0.44: 0.15 is crossed once a third to a half of its counts are the new
# task, about one statistics half-life (3-5 min at 300 s), while steady noise stays at half the
# threshold or less. 0.25 would wait 6-14 min; 1 turns drift epochs off (drift never exceeds 1).
DEFAULT_DRIFT_THRESHOLD = 0.15
STRATEGIES = ("uniform", "layers", "eplb", "dancemoe", "edgemoe", "optimal")
# How a node calls peers for remote experts: one call per peer per layer (ours), or one per
# (token, expert) as DanceMoE's system does (daemon/per_expert.py).
TRANSPORTS = ("per-server", "per-expert")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_LIST_KEYS = ("interface", "seed_peer")
_PATH_KEYS = (
    "state_dir", "model_dir", "secret_file", "api_token_file", "admin_token_file", "tls_cert",
    "tls_key",
)  # fmt: skip
# Keys valid only together -> what the pair is.
PAIRED_KEYS = {
    ("tls_cert", "tls_key"): "PEM certificate chain and its key",
    ("routing_trace", "routing_stream"): "trace file and stream",
}
# key -> the file key that may supply it
_FROM_FILE = {
    "secret": "secret_file",
    "api_token": "api_token_file",
    "admin_token": "admin_token_file",
}


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and what is expected."""


@dataclass(frozen=True)
class Capacity:
    """Expert memory: an absolute size, or a share of the model's total expert bytes."""

    kind: str  # "bytes" | "fraction"
    amount: float

    def resolve(self, model_expert_bytes: int) -> int:
        """Bytes this node may hold, given the size of all experts of the model together."""
        if self.kind == "fraction":
            return int(self.amount * model_expert_bytes)
        return int(self.amount)

    def __str__(self) -> str:
        return f"{self.amount:.0%}" if self.kind == "fraction" else f"{int(self.amount)}B"


def parse_capacity(value: object) -> Capacity:
    """``"40%"`` -> share 0.4 of the expert bytes; ``"2GB"``, ``"512MiB"``, ``2000`` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError('capacity: expected a size like "2GB" or a share like "40%"')
    if isinstance(value, int | float):
        if value <= 0:
            raise ConfigError("capacity: must be positive")
        return Capacity("bytes", float(value))
    text = str(value).strip().lower().replace(" ", "")
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", text):
        share = float(m.group(1)) / 100
        if not 0 < share <= 1:
            raise ConfigError(f"capacity: share must be in (0%, 100%], got {value!r}")
        return Capacity("fraction", share)
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]i?b|b|)", text):
        amount = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
        if amount <= 0:
            raise ConfigError("capacity: must be positive")
        return Capacity("bytes", amount)
    raise ConfigError(f'capacity: expected a size like "2GB" or a share like "40%", got {value!r}')


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"seed_peer: {text!r} is not host:port")
    return host, int(port)


@dataclass(frozen=True)
class DaemonConfig:
    """Everything one daemon needs; built by `load_config`."""

    secret: str
    state_dir: Path
    model_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    capacity: Capacity = field(default_factory=lambda: Capacity("fraction", 1.0))
    cluster_id: str = "edgemoe"
    interface: tuple[str, ...] = ()
    seed_peer: tuple[tuple[str, int], ...] = ()
    api_token: str | None = None
    # Token of the administrative routes (migrate, operator member sets); the inference token
    # above does not grant them.
    admin_token: str | None = None
    # Secrets from files (systemd `LoadCredential=`: a relative name is looked up in
    # $CREDENTIALS_DIRECTORY), so none has to appear on a command line. The value read is
    # used where the key itself (secret, api_token, admin_token) is not given.
    secret_file: Path | None = None
    api_token_file: Path | None = None
    admin_token_file: Path | None = None
    # PEM certificate chain and key: the client API speaks HTTPS when both are given.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    device: str = "cpu"
    # How held experts sit in memory: "native" keeps quantized shards (MXFP4, FP8) quantized
    # where the library has kernels for the device (CUDA) and dequantizes them to the model's
    # compute dtype elsewhere; "bfloat16"/"float32" dequantize (or cast) to that dtype.
    expert_dtype: str = "native"
    # torch's intra-op threads for the model; 0: OMP_NUM_THREADS where set, else one core
    # fewer than the machine has (at most 4): the event loop serving peers' expert calls and
    # the API needs a core of its own, and a tiny step split over every core waits on itself
    torch_threads: int = 0
    strategy: str = "edgemoe"
    transport: str = "per-server"
    log_level: str = "info"
    advertise_host: str | None = None  # address peers use to reach us; defaults to host
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD
    # seconds; see ClusterConfig.drift_min_interval (hysteresis against an epoch storm)
    drift_min_interval: float = ClusterConfig.drift_min_interval
    # Trace replay (benchmarks): the router is overridden by a recorded routing trace (npz in
    # the shared/traces format); request r of this node replays request r of `routing_stream`.
    routing_trace: Path | None = None
    routing_stream: str | None = None

    @property
    def url(self) -> str:
        host = self.advertise_host or self.host
        if host in ("0.0.0.0", ""):
            host = self.interface[0] if self.interface else "127.0.0.1"
        return f"http://{host}:{self.port}"


def torch_threads(config: DaemonConfig, env: Mapping[str, str] | None = None) -> int:
    """The intra-op threads the model runs on (see DaemonConfig.torch_threads)."""
    if config.torch_threads:
        return config.torch_threads
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    return max(1, min(4, len(os.sched_getaffinity(0)) - 1))


def dirs_to_create(config: DaemonConfig) -> list[Path]:
    """The state and model directories the daemon will create at start (said in one line, so a
    default such as /var/lib/edgemoe never appears silently)."""
    model_dir = config.model_dir or config.state_dir / "model"
    return [d for d in (config.state_dir, model_dir) if not d.exists()]


_KEYS = {f.name for f in fields(DaemonConfig)} | {"config"}


def _coerce(key: str, value: Any) -> Any:
    """Turn a raw TOML/env/flag value into the field's type, or raise ConfigError naming it."""
    try:
        if key in _PATH_KEYS:
            if not isinstance(value, str | Path) or not str(value):
                raise ConfigError(f"{key}: must be a path")
            return Path(value).expanduser()
        if key == "port":
            if isinstance(value, bool):
                raise ValueError
            port = int(value)
            if not 0 <= port <= 65535:
                raise ValueError
            return port
        if key == "capacity":
            return parse_capacity(value)
        if key == "torch_threads":
            if isinstance(value, bool):
                raise ValueError
            threads = int(value)
            if not 0 <= threads <= 1024:
                raise ConfigError(f"torch_threads: must be 0 (auto) to 1024, got {value!r}")
            return threads
        if key == "drift_threshold":
            threshold = _float(value)
            if not 0 < threshold <= 1:
                raise ConfigError(f"drift_threshold: must be in (0, 1] (1: off), got {value!r}")
            return threshold
        if key == "drift_min_interval":
            seconds = _float(value)
            if not 0 <= seconds < float("inf"):
                raise ConfigError(f"drift_min_interval: must be seconds >= 0, got {value!r}")
            return seconds
        if key in ("routing_trace", "routing_stream"):
            return _coerce_replay(key, value)
        if key == "interface":
            return tuple(interface_address(item) for item in _as_list(value))
        if key == "seed_peer":
            return tuple(parse_host_port(item) for item in _as_list(value))
        if key == "strategy" and value not in STRATEGIES:
            raise ConfigError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {value!r}")
        if key == "transport" and value not in TRANSPORTS:
            raise ConfigError(f"transport: must be one of {', '.join(TRANSPORTS)}, got {value!r}")
        if key == "log_level":
            value = str(value).lower()
            if value not in LOG_LEVELS:
                raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}")
        if key == "expert_dtype" and value not in EXPERT_DTYPES:
            raise ConfigError(
                f"expert_dtype: must be one of {', '.join(EXPERT_DTYPES)}, got {value!r}"
            )
        if key == "device" and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(value)):
            raise ConfigError("device: must be auto, cpu, cuda, cuda:N or mps")
        if key == "cluster_id" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", str(value)):
            raise ConfigError("cluster_id: must be 1-63 letters, digits, '.', '_' or '-'")
        if key == "secret" and len(str(value)) < 16:
            raise ConfigError("secret: must be at least 16 characters, the same on every node")
        return str(value)
    except ConfigError:
        raise
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: invalid value {value!r}") from None


def interface_address(item: str) -> str:
    """An interface given by IPv4 address (kept) or by name such as "eth0" (its first IPv4
    address on this machine); anything else names the accepted forms."""
    try:
        return str(ipaddress.IPv4Address(item))
    except ValueError:
        pass
    import ifaddr  # zeroconf's own dependency

    adapters = {a.nice_name: a for a in ifaddr.get_adapters()}
    adapter = adapters.get(item)
    v4 = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)] if adapter else []
    if v4:
        return v4[0]
    why = "has no IPv4 address" if adapter else "is no interface of this machine"
    raise ConfigError(
        f"interface: {item!r} {why}; give an IPv4 address of this machine (\"192.168.1.10\") "
        f"or an interface name with one ({', '.join(sorted(adapters)) or 'none found'})"
    )


def unknown_key(name: str, where: str) -> ConfigError:
    """The error for a key the daemon does not read, naming the nearest one it does."""
    near = difflib.get_close_matches(name, sorted(_KEYS - {"config"}), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"{where}: unknown key {name!r}{hint}")


def _coerce_replay(key: str, value: Any) -> Any:
    """Trace replay keys: a trace file that exists, a stream name (checked against the file
    when the model is loaded)."""
    if key == "routing_trace":
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError("routing_trace: must be the path of an npz routing trace")
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"routing_trace: no such file {path}")
        return path
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ConfigError(f"routing_stream: must be a stream name like 'law', got {value!r}")
    return value


def _check_stream(path: Path, stream: str) -> None:
    """The stream is in the trace file (an npz is a zip of `<array>.npy` members)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"routing_trace: {path} is not an npz trace ({exc})") from None
    if {f"{stream}_expert_ids", f"{stream}_req_offsets"} - names:
        have = sorted(n.removesuffix("_expert_ids") for n in names if n.endswith("_expert_ids"))
        raise ConfigError(f"routing_stream: {stream!r} not in {path.name}; it has: "
                          f"{', '.join(have) or 'no stream'}")  # fmt: skip


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(value)


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    raise ConfigError(f"expected a list, got {value!r}")


def _read_secret(key: str, path: Path, env: Mapping[str, str], base: Path | None) -> str:
    """A secret kept in a file. A relative name is a systemd credential under `LoadCredential=`
    ($CREDENTIALS_DIRECTORY), else a file next to the config (``base``): the same config then
    works for the service and for the operator commands."""
    if not path.is_absolute() and env.get("CREDENTIALS_DIRECTORY"):
        path = Path(env["CREDENTIALS_DIRECTORY"]) / path
    elif not path.is_absolute() and base is not None:
        path = base / path
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise ConfigError(f"{key}: {path} is empty")
    return value


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _KEYS - {"config"}:
        raw = env.get(f"EDGEMOE_{key.upper()}")
        if raw is not None and raw != "":
            out[key] = raw
    return out


def load_config(
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    base_dir: Path | None = None,
) -> DaemonConfig:
    """Merge defaults < TOML file < EDGEMOE_* env < flags (None/empty flags do not override).
    Relative ``*_file`` names and routing_trace are read next to the config file (``base_dir``
    without one)."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = config_file or (Path(env["EDGEMOE_CONFIG"]) if env.get("EDGEMOE_CONFIG") else None)
    if path is not None:
        try:
            raw.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise unknown_key(unknown[0], str(path))
    raw.update(_from_env(env))
    raw.update({k: v for k, v in (flags or {}).items() if v not in (None, (), [])})
    raw.pop("config", None)
    base = path.parent if path is not None else base_dir
    for key, file_key in _FROM_FILE.items():
        if raw.get(key) in (None, "") and raw.get(file_key) not in (None, ""):
            raw[key] = _read_secret(file_key, _coerce(file_key, raw[file_key]), env, base)
    trace = raw.get("routing_trace")
    if base is not None and isinstance(trace, str) and trace and not Path(trace).is_absolute():
        raw["routing_trace"] = str(base / trace)  # like the *_file names: next to the config
    values = {k: _coerce(k, v) for k, v in raw.items()}
    for (a, b), what in PAIRED_KEYS.items():
        if (a in values) != (b in values):
            raise ConfigError(f"{a}, {b}: give both ({what})")
    if "routing_trace" in values:
        _check_stream(values["routing_trace"], values["routing_stream"])
    for required in ("secret", "state_dir"):
        if required not in values:
            also = f" or {_FROM_FILE[required]}" if required in _FROM_FILE else ""
            raise ConfigError(
                f"{required}: missing (flag --{required.replace('_', '-')}, "
                f"EDGEMOE_{required.upper()} or the config file{also})"
            )
    return DaemonConfig(**values)
