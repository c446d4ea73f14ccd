"""HTTP client helpers for the operator commands: find the node to talk to, call it, turn failures
into one-line errors with exit codes that say what went wrong.

Stdlib ``urllib`` only, so ``edgemoe status`` starts fast and needs no event loop; mDNS lookup
imports zeroconf lazily and binds to the configured interfaces only.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Exit codes shared by every operator command (README, "Exit codes").
EXIT_REQUEST_FAILED = 1  # the node answered with an error
EXIT_USAGE = 2  # typer's own code for bad arguments
EXIT_UNREACHABLE = 3  # no node could be reached or found
EXIT_AUTH = 4  # the node refused the API token
EXIT_CONFIG = 5  # the configuration file is missing or invalid


class ClientError(Exception):
    """A failure to show the user as one line, with the exit code that classifies it."""

    def __init__(
        self, message: str, exit_code: int = EXIT_REQUEST_FAILED, http_status: int | None = None
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.http_status = http_status  # the node's answer, when it answered with an error


@dataclass(frozen=True)
class Node:
    """A daemon to talk to: its base URL and the bearer token of its client API."""

    url: str
    token: str | None
    how: str  # "--node", "config", "mdns": shown by `status` so the user knows which was picked

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float = 10.0,
    ) -> Any:
        """Send one request and return its decoded JSON body."""
        with self._open(method, path, body, timeout=timeout) as resp:
            raw = resp.read()
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError as exc:
            raise ClientError(f"{self.url}{path}: answer is not JSON ({exc.msg})") from exc

    def get(self, path: str, *, timeout: float = 10.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: dict[str, Any], *, timeout: float = 60.0) -> Any:
        return self.request("POST", path, body, timeout=timeout)

    def stream_sse(
        self, path: str, body: dict[str, Any], *, timeout: float = 120.0
    ) -> Iterator[dict[str, Any]]:
        """POST with ``stream: true`` and yield each server-sent event's JSON until ``[DONE]``."""
        with self._open("POST", path, body, timeout=timeout) as resp:
            for raw_line in resp:
                line = raw_line.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                try:
                    yield json.loads(data)
                except json.JSONDecodeError as exc:
                    raise ClientError(f"{self.url}{path}: bad stream event ({exc.msg})") from exc

    def _open(self, method: str, path: str, body: dict[str, Any] | None, *, timeout: float) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise _http_error(self.url, path, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(
                f"cannot reach edgemoe node at {self.url}: {_reason_text(reason)}",
                EXIT_UNREACHABLE,
            ) from None


def _reason_text(reason: object) -> str:
    if isinstance(reason, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the daemon running?)"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    text = str(reason)
    return text.strip() or type(reason).__name__


def _http_error(url: str, path: str, exc: urllib.error.HTTPError) -> ClientError:
    detail = ""
    try:
        payload = json.loads(exc.read() or b"null")
        if isinstance(payload, dict):
            err = payload.get("error", payload.get("detail", payload.get("message")))
            if isinstance(err, dict):
                err = err.get("message")
            detail = str(err) if err else ""
    except (json.JSONDecodeError, OSError, ValueError):
        detail = ""
    explained = bool(detail.strip())  # an edgemoe node says why in a JSON body
    detail = " ".join(detail.split()) or (exc.reason or "")
    if exc.code == 403 and explained:  # the wrong role (admin route) or transport: it says which
        hint = (
            "; pass --admin-token or set EDGEMOE_ADMIN_TOKEN or admin_token in the config"
            if "admin token" in detail
            else ""
        )
        return ClientError(f"{url}{path}: HTTP 403: {detail}{hint}", EXIT_AUTH, 403)
    if exc.code in (401, 403):
        return ClientError(
            f"{url} refused the API token (HTTP {exc.code}); pass --api-token or set "
            "EDGEMOE_API_TOKEN or api_token in the config",
            EXIT_AUTH,
        )
    if exc.code == 404 and not explained:
        detail += f" (is {url} an edgemoe node? check --node)"
    return ClientError(
        f"{url}{path}: HTTP {exc.code}: {detail}".rstrip(": "), EXIT_REQUEST_FAILED, exc.code
    )


def why_unready(node: Node) -> str | None:
    """The node's own warnings (``/v1/cluster``), joined: why it answers 503, when it knows."""
    try:
        found = node.get("/v1/cluster", timeout=5.0).get("warnings") or []
    except (ClientError, AttributeError):
        return None
    return "; ".join(str(w) for w in found) or None


def normalise_url(node: str) -> str:
    """Accept ``host:port`` or a full URL; return ``scheme://host:port`` (no trailing slash)."""
    text = node.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"--node {node!r} is not a URL like http://10.0.0.2:7600", EXIT_USAGE)
    try:
        parts.port  # noqa: B018  (validates the port number)
    except ValueError:
        raise ClientError(f"--node {node!r} has an invalid port", EXIT_USAGE) from None
    return f"{parts.scheme}://{parts.netloc}"


def local_url(host: str, port: int) -> str:
    """The URL of the daemon this config describes, as seen from the same machine."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def config_path_of(config_path: Path | None) -> Path:
    """The config file in use: ``--config``, else EDGEMOE_CONFIG, else the system default."""
    from edgemoe.cli.config_cmds import DEFAULT_CONFIG_PATH

    return Path(config_path or os.environ.get("EDGEMOE_CONFIG") or DEFAULT_CONFIG_PATH)


def daemon_config_file(config_path: Path | None) -> Path | None:
    """The file a daemon reads: ``--config``, else EDGEMOE_CONFIG, else the system default when
    it exists (the same one `config init` writes and `status`/`generate` read); None: flags and
    environment only."""
    path = config_path_of(config_path)
    if config_path is None and not os.environ.get("EDGEMOE_CONFIG") and not path.exists():
        return None
    return path


def resolve_node(
    node: str | None,
    config_path: Path | None,
    api_token: str | None,
    *,
    mdns_timeout: float = 3.0,
    admin_token: str | None = None,
    admin: bool = False,
) -> Node:
    """Pick the daemon: ``--node`` first, else the local one from the config file. Only when no
    ``--config`` was given (the box's default config) and the local daemon does not answer, the
    first node found by mDNS on the config's interfaces, said on stderr: an operator who named a
    config means that node. The token comes from ``--api-token`` (or EDGEMOE_API_TOKEN), else
    the config."""
    from edgemoe.cli.config_cmds import ConfigError, read_config

    path = config_path_of(config_path)
    cfg: Any = None
    if path.exists() or config_path is not None:
        try:
            cfg = read_config(path)
        except ConfigError as exc:
            if node is None or config_path is not None:
                raise ClientError(str(exc), EXIT_CONFIG) from None
    token = api_token or (cfg.api_token if cfg is not None else None)
    if admin:  # administrative routes: the admin token; a node without one takes the API token
        token = admin_token or (cfg.admin_token if cfg is not None else None) or token
    if node:
        return Node(normalise_url(node), token, "--node")
    if cfg is None:
        raise ClientError(
            f"no --node given and no config at {path}; pass --node URL or --config PATH",
            EXIT_UNREACHABLE,
        )
    local = Node(local_url(cfg.host, cfg.port), token, "config")
    try:
        local.get("/healthz", timeout=2.0)
        return local
    except ClientError as exc:
        if exc.exit_code != EXIT_UNREACHABLE:
            return local
        if config_path is not None:
            raise ClientError(
                f"{exc}: the daemon of {path} (--config means that node; pass --node URL to ask "
                "another one)",
                EXIT_UNREACHABLE,
            ) from None
    interfaces = list(cfg.interface)
    urls = discover(interfaces, cluster_id=cfg.cluster_id, timeout=mdns_timeout)
    if not urls:
        where = ", ".join(interfaces) or "no interface configured"
        raise ClientError(
            f"local daemon at {local.url} does not answer and mDNS found no node ({where})",
            EXIT_UNREACHABLE,
        )
    sys.stderr.write(
        f"note: local daemon at {local.url} does not answer; using {urls[0]} found by mDNS\n"
    )
    return Node(urls[0], token, "mdns")


def discover(
    interfaces: Sequence[str], *, cluster_id: str | None = None, timeout: float = 3.0
) -> list[str]:
    """Browse ``_edgemoe._tcp`` on the given interface addresses only (never all interfaces)
    and return the URL of the first node that answered, optionally only one of ``cluster_id``."""
    from edgemoe.daemon.doctor import browse

    found = browse(list(interfaces), timeout=timeout, cluster_id=cluster_id, first=True)
    return [a.url for a in found]
