"""`edgemoe config init|check`: the node's one TOML file, written with comments and a fresh
cluster secret, and checked with errors that name the key and say what is expected.

Keys are the daemon's flag names with '-' -> '_' (contracts.md); repeatable flags are lists.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from edgemoe.cli.client import EXIT_CONFIG, EXIT_REQUEST_FAILED, EXIT_USAGE

DEFAULT_CONFIG_PATH = Path("/etc/edgemoe/edgemoe.toml")
DEFAULT_PORT = 7600
STRATEGIES = ("uniform", "layers", "eplb", "dancemoe", "edgemoe", "optimal")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


class ConfigError(ValueError):
    """The config file cannot be used; str() is one line naming the file and the key."""


def parse_capacity(value: object) -> tuple[str, float]:
    """``"40%"`` -> ("fraction", 0.4); ``"2GB"``/``2000000000`` -> ("bytes", 2e9)."""
    if isinstance(value, bool):
        raise ValueError('expected a size like "2GB" or a share like "40%"')
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError("must be positive")
        return "bytes", float(value)
    text = str(value).strip().lower().replace(" ", "")
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", text):
        share = float(m.group(1)) / 100
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0%, 100%], got {value!r}")
        return "fraction", share
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]i?b|b|)", text):
        amount = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
        if amount <= 0:
            raise ValueError("must be positive")
        return "bytes", amount
    raise ValueError(f'expected a size like "2GB" or "512MiB" or a share like "40%", got {value!r}')


def _check_port(v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        raise ValueError(f"must be an integer port in 0..65535, got {v!r}")


def _check_host(v: object) -> None:
    if not isinstance(v, str) or not v:
        raise ValueError('must be an address such as "0.0.0.0" or "10.0.0.2"')


def _check_cluster_id(v: object) -> None:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", v):
        raise ValueError("must be 1-63 letters, digits, '.', '_' or '-'")


def _check_secret(v: object) -> None:
    if not isinstance(v, str) or len(v) < 32:
        raise ValueError(
            "must be at least 32 characters (the same on every node); "
            "`edgemoe config init` generates one"
        )


def _check_token(v: object) -> None:
    if not isinstance(v, str) or len(v) < 16:
        raise ValueError("must be at least 16 characters; `edgemoe config init` generates one")


def _check_path(v: object) -> None:
    if not isinstance(v, str) or not v:
        raise ValueError("must be a path")


def _check_capacity(v: object) -> None:
    parse_capacity(v)


def _check_interfaces(v: object) -> None:
    if not isinstance(v, list):
        raise ValueError('must be a list of IP addresses, e.g. ["192.168.1.10"]')
    for item in v:
        try:
            ipaddress.ip_address(str(item))
        except ValueError:
            raise ValueError(
                f"{item!r} is not an IP address (give the address mDNS should use)"
            ) from None


def _check_seed_peers(v: object) -> None:
    if not isinstance(v, list):
        raise ValueError('must be a list of "host:port" strings')
    for item in v:
        host, sep, port = str(item).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"{item!r} is not host:port")


def _check_device(v: object) -> None:
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")


def _choice(options: tuple[str, ...]) -> Callable[[object], None]:
    def check(v: object) -> None:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {v!r}")

    return check


@dataclass(frozen=True)
class Key:
    """One config key: its default (None = required), its check, and the comment above it."""

    name: str
    default: Any
    check: Callable[[object], None]
    doc: str


SCHEMA: tuple[Key, ...] = (
    Key("cluster_id", "edgemoe", _check_cluster_id,
        "Name of the cluster. Nodes only join peers with the same cluster_id and secret."),
    Key("secret", None, _check_secret,
        "Shared secret of the cluster (HMAC key of every peer message). Identical on every\n"
        "node; never sent over the network. Generated by `edgemoe config init`."),
    Key("api_token", None, _check_token,
        "Bearer token clients send to /v1/* (OpenAI-style API and `edgemoe status` etc.)."),
    Key("model_dir", "/var/lib/edgemoe/model", _check_path,
        "Shard directory written by `edgemoe shard`. A node without it fetches the dense part\n"
        "and its experts from peers."),
    Key("state_dir", "/var/lib/edgemoe", _check_path,
        "Node identity, durable consensus log, fetched shards."),
    Key("host", "0.0.0.0", _check_host, "Address the HTTP server binds to."),
    Key("port", DEFAULT_PORT, _check_port, "TCP port of the HTTP server (peers and clients)."),
    Key("capacity", "80%", _check_capacity,
        "Accelerator memory for experts: a share of free memory (\"80%\") or a size (\"12GB\")."),
    Key("interface", [], _check_interfaces,
        "Addresses of the interfaces where mDNS announces and discovers peers, e.g.\n"
        "[\"192.168.1.10\"]. Never all interfaces; empty: no mDNS, use seed_peer."),
    Key("seed_peer", [], _check_seed_peers,
        "Static peers (\"host:port\") for networks that block multicast."),
    Key("device", "auto", _check_device, "auto, cpu, cuda, cuda:N or mps."),
    Key("strategy", "edgemoe", _choice(STRATEGIES),
        f"Placement strategy: {', '.join(STRATEGIES)}."),
    Key("log_level", "info", _choice(LOG_LEVELS), f"One of {', '.join(LOG_LEVELS)}."),
)  # fmt: skip
KEYS = {k.name: k for k in SCHEMA}


def validate(values: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """Fill defaults and check every key; returns (config, problems), one line per problem."""
    problems = [
        f"{where}: unknown key {name!r} (known: {', '.join(KEYS)})"
        for name in values
        if name not in KEYS
    ]
    cfg: dict[str, Any] = {}
    for key in SCHEMA:
        if key.name not in values:
            if key.default is None:
                problems.append(f"{where}: {key.name}: missing (required)")
                continue
            cfg[key.name] = key.default
            continue
        try:
            key.check(values[key.name])
        except ValueError as exc:
            problems.append(f"{where}: {key.name}: {exc}")
            continue
        cfg[key.name] = values[key.name]
    return cfg, problems


def load_toml(path: Path) -> dict[str, Any]:
    """Parse the file; a missing file or a syntax error is a ConfigError naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (create it: edgemoe config init)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def read_config(path: Path) -> dict[str, Any]:
    """The validated config with defaults filled in, or ConfigError with the first problem."""
    cfg, problems = validate(load_toml(path), str(path))
    if problems:
        more = f" (and {len(problems) - 1} more: edgemoe config check)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    return cfg


def _toml_value(value: Any) -> str:
    # JSON strings, numbers and arrays of strings are valid TOML values.
    return json.dumps(value, ensure_ascii=False)


def render_config(values: dict[str, Any]) -> str:
    """A commented TOML file holding ``values`` (every key of the schema, in schema order)."""
    lines = [
        "# edgemoe node configuration. Read by `edgemoe daemon --config PATH` and the operator",
        "# commands; every key can be overridden by the flag of the same name or EDGEMOE_<KEY>.",
        "# Check it with: edgemoe config check PATH",
        "",
    ]
    for key in SCHEMA:
        lines.extend(f"# {line}" for line in key.doc.splitlines())
        lines.append(f"{key.name} = {_toml_value(values[key.name])}")
        lines.append("")
    return "\n".join(lines)


def new_config(**overrides: Any) -> dict[str, Any]:
    """Defaults plus a fresh secret and API token, with ``overrides`` (None = keep default)."""
    values = {k.name: k.default for k in SCHEMA}
    values["secret"] = secrets.token_hex(32)
    values["api_token"] = secrets.token_urlsafe(32)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def write_config(path: Path, values: dict[str, Any], *, force: bool = False) -> None:
    """Write the file readable by owner and group only: it holds the secret and the token."""
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(render_config(values))
    os.replace(tmp, path)


def local_addresses() -> set[str]:
    """IP addresses of this machine's interfaces (ifaddr ships with zeroconf)."""
    import ifaddr

    found: set[str] = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            found.add(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return found


def environment_problems(cfg: dict[str, Any], where: str) -> list[str]:
    """Checks that need this machine: interfaces that exist, a model directory that is one."""
    problems: list[str] = []
    addresses = local_addresses()
    problems.extend(
        f"{where}: interface: {addr} is not an address of this machine "
        f"(have: {', '.join(sorted(addresses))})"
        for addr in cfg["interface"]
        if addr not in addresses
    )
    model_dir = Path(cfg["model_dir"])
    if model_dir.exists() and not (model_dir / "manifest.json").is_file():
        problems.append(
            f"{where}: model_dir: {model_dir} has no manifest.json (write it with edgemoe shard)"
        )
    return problems


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help=f"Config file [default: $EDGEMOE_CONFIG or {DEFAULT_CONFIG_PATH}]"
    ),
]


def _pick_path(path: Path | None, config: Path | None) -> Path:
    return path or config or Path(os.environ.get("EDGEMOE_CONFIG") or DEFAULT_CONFIG_PATH)


def register(app: typer.Typer) -> None:
    """Add the `config` group."""
    group = typer.Typer(help="Write and check the node's TOML configuration.")
    app.add_typer(group, name="config")

    @group.command("init")
    def init(
        path: Annotated[Path | None, typer.Argument(help="Where to write it")] = None,
        config: ConfigOption = None,
        cluster_id: Annotated[str | None, typer.Option(help="Cluster name")] = None,
        secret: Annotated[
            str | None,
            typer.Option(envvar="EDGEMOE_SECRET", help="Join an existing cluster: its secret"),
        ] = None,
        api_token: Annotated[
            str | None, typer.Option(envvar="EDGEMOE_API_TOKEN", help="Reuse this API token")
        ] = None,
        model_dir: Annotated[str | None, typer.Option(help="Shard directory")] = None,
        state_dir: Annotated[str | None, typer.Option(help="State directory")] = None,
        host: Annotated[str | None, typer.Option(help="Bind address")] = None,
        port: Annotated[int | None, typer.Option(help="HTTP port")] = None,
        capacity: Annotated[str | None, typer.Option(help='"80%" or "12GB"')] = None,
        interface: Annotated[
            list[str] | None, typer.Option(help="mDNS interface address (repeat)")
        ] = None,
        seed_peer: Annotated[list[str] | None, typer.Option(help="host:port (repeat)")] = None,
        device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
        strategy: Annotated[str | None, typer.Option(help="Placement strategy")] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing file")] = False,
    ) -> None:
        """Write a commented config with a fresh cluster secret and API token."""
        target = _pick_path(path, config)
        values = new_config(
            cluster_id=cluster_id, secret=secret, api_token=api_token, model_dir=model_dir,
            state_dir=state_dir, host=host, port=port, capacity=capacity,
            interface=interface or None, seed_peer=seed_peer or None, device=device,
            strategy=strategy,
        )  # fmt: skip
        _, problems = validate(values, "option")
        if problems:
            _fail(problems, EXIT_USAGE)
        try:
            write_config(target, values, force=force)
        except ConfigError as exc:
            _fail([str(exc)], EXIT_REQUEST_FAILED)
        except OSError as exc:
            _fail([f"{target}: cannot write: {exc.strerror or exc}"], EXIT_REQUEST_FAILED)
        joined = "joined cluster" if secret else "new cluster secret for"
        typer.echo(f"wrote {target} ({joined} {values['cluster_id']!r}, mode 0640)")
        if not secret:
            typer.echo(
                "other nodes join with the same cluster_id, secret and api_token: copy those "
                "three lines into their config, or run there: edgemoe config init "
                "--cluster-id ... --secret ... --api-token ..."
            )

    @group.command("check")
    def check(
        path: Annotated[Path | None, typer.Argument(help="File to check")] = None,
        config: ConfigOption = None,
    ) -> None:
        """Validate the config and explain every problem, one per line."""
        target = _pick_path(path, config)
        try:
            cfg, problems = validate(load_toml(target), str(target))
        except ConfigError as exc:
            _fail([str(exc)], EXIT_CONFIG)
        if not problems:
            problems = environment_problems(cfg, str(target))
        if problems:
            _fail(problems, EXIT_CONFIG)
        kind, amount = parse_capacity(cfg["capacity"])
        cap = f"{amount:.0%} of free memory" if kind == "fraction" else f"{amount / 1e9:.2f} GB"
        mdns = ", ".join(cfg["interface"]) or "off"
        typer.echo(
            f"ok: {target}: cluster {cfg['cluster_id']!r}, listens on {cfg['host']}:{cfg['port']}, "
            f"capacity {cap}, mDNS on {mdns}, {len(cfg['seed_peer'])} seed peer(s), "
            f"strategy {cfg['strategy']}"
        )


def _fail(lines: list[str], code: int) -> NoReturn:
    for line in lines:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)
