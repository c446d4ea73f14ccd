"""`edgemoe doctor`: what is wrong with this box and its cluster, as verdicts an operator can act
on. Each check is a function returning `Verdict`s (ok / warn / fail, one line found, one line
fix); `run_doctor` runs them in order and the CLI only renders them.

Network checks use the daemon's own parts (the signed `/v1/hello` of `PeerClient`, mDNS with
zeroconf on the configured interfaces only), so they follow the wire format as it changes.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgemoe.daemon.config import ConfigError, DaemonConfig, load_config
from edgemoe.daemon.diagnosis import NodeFacts, capacity_warning, human_bytes
from edgemoe.daemon.startup import (  # the daemon flocks <dir>/LOCK_NAME while it runs
    LOCK_NAME,
    is_loopback,
)
from edgemoe.daemon.wire import REPLAY_WINDOW_S

OK, WARN, FAIL = "ok", "warn", "fail"
SERVICE_TYPE = "_edgemoe._tcp.local."
MDNS_WAIT_S = 3.0  # how long to listen for announcements (mDNS answers within ~1 s)
HELLO_TIMEOUT_S = 5.0
# Clock skew worth a warning: a third of the signature window leaves room for network delay;
# beyond the window every signed request is refused.
SKEW_WARN_S = REPLAY_WINDOW_S / 3
_IFF_UP, _IFF_LOOPBACK, _IFF_MULTICAST = 0x1, 0x8, 0x1000


@dataclass(frozen=True)
class Verdict:
    """One finding: which check, how bad, what was seen, and what to do about it."""

    check: str
    level: str  # OK | WARN | FAIL
    message: str
    fix: str = ""


# ---- this box ---------------------------------------------------------------------------------
def check_config(path: Path | None, env: Mapping[str, str]) -> tuple[DaemonConfig | None, Verdict]:
    """The daemon's own loader decides: the first problem, named by key."""
    where = str(path) if path is not None else "flags/environment"
    try:
        cfg = load_config(path, None, env)
    except ConfigError as exc:
        return None, Verdict("config", FAIL, str(exc), "fix it, then: edgemoe config check")
    return cfg, Verdict("config", OK, f"{where} is valid (cluster {cfg.cluster_id!r})")


def lock_holder(directory: Path) -> str | None:
    """Who holds the daemon lock of `directory` (a running daemon), or None when nobody does."""
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: nobody ever ran here, or it is not ours to read
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.read(fd, 64).decode(errors="replace").strip()
        return f"pid {text}" if text.isdigit() else "another process"
    finally:
        os.close(fd)  # closing releases a lock we got
    return None


def _writable(directory: Path) -> str | None:
    """Why a daemon could not write there (None: it can); a directory not there yet counts as
    its nearest existing parent, where it would be created."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            return f"no existing parent of {directory}"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".edgemoe-doctor-"):
            pass
    except OSError as exc:
        return f"cannot write in {probe}: {exc.strerror or exc}"
    return None


def check_dirs(cfg: DaemonConfig, running_here: bool) -> list[Verdict]:
    """State and model directories: writable, and not in use by another daemon."""
    model_dir = cfg.model_dir or cfg.state_dir / "model"
    out: list[Verdict] = []
    for name, directory in (("state_dir", cfg.state_dir), ("model_dir", model_dir)):
        if (why := _writable(directory)) is not None:
            out.append(
                Verdict(name, FAIL, why, f"give the daemon's user a writable {name} ({directory})")
            )
            continue
        holder = lock_holder(directory)
        if holder is not None and not running_here:
            out.append(
                Verdict(
                    name,
                    FAIL,
                    f"{directory} is in use: {holder} holds {directory / LOCK_NAME} "
                    "(another daemon runs on it)",
                    f"stop that daemon, or give this node its own {name}",
                )
            )
            continue
        state = "in use by this config's running daemon" if holder else "free"
        made = "" if directory.exists() else " (created at start)"
        out.append(Verdict(name, OK, f"{directory} writable{made}, {state}"))
    return out


def _adapters() -> dict[str, tuple[str, list[str]]]:
    """{IPv4 address: (interface name, all its IPv4 addresses)} of this machine."""
    import ifaddr  # zeroconf's own dependency

    out: dict[str, tuple[str, list[str]]] = {}
    for adapter in ifaddr.get_adapters():
        v4 = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
        for ip in v4:
            out[ip] = (adapter.nice_name, v4)
    return out


def interface_flags(name: str) -> int | None:
    """The kernel's IFF_* flags of an interface (Linux sysfs); None where unknown."""
    try:
        return int(Path(f"/sys/class/net/{name}/flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def check_interfaces(cfg: DaemonConfig) -> list[Verdict]:
    """Every mDNS interface is an address of this machine, up, and carries multicast."""
    if not cfg.interface:
        if cfg.seed_peer:
            return [Verdict("interface", OK, "mDNS off; peers come from seed_peer")]
        return [
            Verdict(
                "interface",
                WARN,
                "mDNS off and no seed_peer: this node finds no peer",
                'add interface = ["<LAN address>"] or seed_peer = ["host:7600"]',
            )
        ]
    adapters = _adapters()
    out: list[Verdict] = []
    for addr in cfg.interface:
        if addr not in adapters:
            have = ", ".join(sorted(adapters)) or "none"
            out.append(
                Verdict(
                    "interface",
                    FAIL,
                    f"{addr} is not an address of this machine (have: {have})",
                    "set interface to this box's LAN address or name",
                )
            )
            continue
        name, _ = adapters[addr]
        flags = interface_flags(name)
        if flags is not None and flags & _IFF_LOOPBACK:
            out.append(
                Verdict(
                    "interface",
                    OK,
                    f"{addr} ({name}): loopback, mDNS reaches this machine's nodes only",
                )
            )
        elif flags is not None and not flags & _IFF_UP:
            out.append(
                Verdict(
                    "interface",
                    FAIL,
                    f"{addr} ({name}) is down",
                    f"bring it up (ip link set {name} up)",
                )
            )
        elif flags is not None and not flags & _IFF_MULTICAST:
            out.append(
                Verdict(
                    "interface",
                    FAIL,
                    f"{addr} ({name}) does not carry multicast (no MULTICAST flag)",
                    "use seed_peer, or enable multicast on it",
                )
            )
        else:
            out.append(Verdict("interface", OK, f"{addr} ({name}) up, multicast"))
    return out


def check_tokens(cfg: DaemonConfig) -> list[Verdict]:
    """The daemon refuses to listen beyond loopback without both tokens (startup)."""
    loopback = is_loopback(cfg.host)
    if cfg.api_token:
        api = Verdict("api_token", OK, "set: clients need it (Authorization: Bearer ...)")
    else:
        api = Verdict(
            "api_token",
            WARN if loopback else FAIL,
            f"not set: the client API on {cfg.host}:{cfg.port} is open to anyone"
            + ("" if loopback else "; the daemon refuses to start so"),
            "add api_token (or api_token_file); edgemoe config init makes one",
        )
    if cfg.admin_token:
        admin = Verdict("admin_token", OK, "set: migrate and member sets need it")
    else:
        admin = Verdict(
            "admin_token",
            WARN if loopback else FAIL,
            "not set: "
            + (
                "migrate and member sets take the api_token from loopback clients only"
                if loopback
                else f"the daemon refuses to listen on {cfg.host} without it"
            ),
            "add admin_token (or admin_token_file); edgemoe config init makes one",
        )
    return [api, admin]


def accelerator_verdict(
    device: str, free: int | None, total: int | None, capacity: int | None
) -> Verdict:
    """Free accelerator memory against the expert memory this node is configured to hold."""
    if free is None or total is None:
        if device.startswith("cuda"):
            return Verdict(
                "accelerator",
                FAIL,
                f"device {device} asked, but no CUDA device",
                'install the CUDA build of torch, or set device = "cpu"',
            )
        return Verdict("accelerator", OK, f"no accelerator: {device}")
    have = f"{device}: {human_bytes(free)} free of {human_bytes(total)}"
    if capacity is None:
        return Verdict("accelerator", OK, f"{have}; capacity unknown until the model is known")
    if capacity > total:
        return Verdict(
            "accelerator",
            FAIL,
            f"{have}, below the capacity {human_bytes(capacity)}",
            'lower capacity to what the device holds (a size like "20GB")',
        )
    if capacity > free:
        return Verdict(
            "accelerator",
            WARN,
            f"{have}, below the capacity {human_bytes(capacity)} (in use by others?)",
            "free the device or lower capacity",
        )
    return Verdict("accelerator", OK, f"{have}, room for the capacity {human_bytes(capacity)}")


def check_accelerator(cfg: DaemonConfig, model_expert_bytes: int) -> Verdict:
    capacity = cfg.capacity.resolve(model_expert_bytes) if model_expert_bytes else None
    if cfg.capacity.kind == "bytes":
        capacity = int(cfg.capacity.amount)
    if cfg.device in ("cpu", "mps"):
        return accelerator_verdict(cfg.device, None, None, capacity)
    import torch

    if not torch.cuda.is_available():
        return accelerator_verdict(
            cfg.device if cfg.device != "auto" else "cpu", None, None, capacity
        )
    index = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
    free, total = torch.cuda.mem_get_info(index)
    return accelerator_verdict(f"cuda:{index}", int(free), int(total), capacity)


# ---- the cluster ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Announced:
    """A node's mDNS announcement."""

    node_id: str
    cluster_id: str
    fingerprint: str
    url: str


def browse(
    interfaces: list[str], *, timeout: float, cluster_id: str | None = None, first: bool = False
) -> list[Announced]:
    """Nodes announcing ``_edgemoe._tcp`` on these interface addresses only (never all), of
    ``cluster_id`` when given; with ``first``, return as soon as one answered."""
    if not interfaces:
        return []
    from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    names: list[str] = []

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Added and name not in names:
            names.append(name)

    found: list[Announced] = []
    zc = Zeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        deadline = time.monotonic() + timeout
        tried: set[str] = set()
        while time.monotonic() < deadline and not (first and found):
            for name in [n for n in names if n not in tried]:
                info = zc.get_service_info(SERVICE_TYPE, name, timeout=500)
                if info is None or not info.port:
                    continue
                tried.add(name)
                props = {
                    k.decode(errors="replace"): (v or b"").decode(errors="replace")
                    for k, v in info.properties.items()
                }
                if cluster_id and props.get("cluster_id", cluster_id) != cluster_id:
                    continue
                for addr in info.parsed_addresses(IPVersion.V4Only)[:1]:
                    found.append(
                        Announced(
                            props.get("node_id", ""),
                            props.get("cluster_id", ""),
                            props.get("fingerprint", ""),
                            f"http://{addr}:{info.port}",
                        )
                    )
            time.sleep(0.1)
        browser.cancel()
    finally:
        zc.close()
    return found


@dataclass(frozen=True)
class Hello:
    """What one peer said to our signed `/v1/hello` (or why it did not)."""

    url: str
    info: dict[str, Any] | None  # its hello, when it accepted us
    status: int | None  # HTTP status of a refusal
    error: str  # why there is no hello
    skew_s: float | None  # its clock minus ours (its signed hello time against our midpoint)


async def say_hello(url: str, node_id: str, secret: bytes) -> Hello:
    from edgemoe.daemon.peers import PeerClient, PeerError

    client = PeerClient(url, node_id, secret, timeout_s=HELLO_TIMEOUT_S)
    try:
        sent = time.time()
        info = await client.hello(timeout_s=HELLO_TIMEOUT_S)  # signed both ways
        now = (sent + time.time()) / 2
        theirs = info.get("time")
        skew = float(theirs) - now if isinstance(theirs, int | float) else None
        return Hello(url, info, None, "", skew)
    except PeerError as exc:
        return Hello(url, None, exc.status, str(exc), None)
    except Exception as exc:  # a malformed answer is a finding, never a crash
        return Hello(url, None, None, f"{type(exc).__name__}: {exc}", None)
    finally:
        await client.close()


def peer_verdicts(
    cfg: DaemonConfig,
    announced: list[Announced],
    hellos: list[Hello],
    fingerprint: str,
    has_model: bool,
) -> list[Verdict]:
    """Peers found, each accepting our signature, same cluster and model, clocks in the window."""
    out: list[Verdict] = []
    seeds = {f"http://{h}:{p}" for h, p in cfg.seed_peer}
    if cfg.interface:
        n = len(announced)
        where = ", ".join(cfg.interface)
        out.append(
            Verdict("mdns", OK, f"{n} node(s) of cluster {cfg.cluster_id!r} on {where}")
            if n
            else Verdict(
                "mdns",
                WARN,
                f"no node of cluster {cfg.cluster_id!r} answers mDNS on {where}",
                "start the other nodes, or check that multicast passes (else use seed_peer)",
            )
        )
    if not hellos:
        if has_model:
            out.append(
                Verdict(
                    "peers",
                    WARN,
                    "no peer found: this node serves alone",
                    "start more nodes with the same cluster_id and secret",
                )
            )
        else:
            out.append(
                Verdict(
                    "peers",
                    FAIL,
                    "no peer found and no model here: nobody has the model",
                    "give --model-dir (edgemoe shard) or a --seed-peer / check the interface",
                )
            )
        return out
    prints: dict[str, str] = {}
    for hello in hellos:
        kind = "seed" if hello.url in seeds else "peer"
        if hello.info is None:
            if hello.status == 401 and "window" in hello.error:
                out.append(
                    Verdict(
                        "clock",
                        FAIL,
                        f"{kind} {hello.url} refuses our timestamp: clocks differ by "
                        f"more than {REPLAY_WINDOW_S:.0f} s",
                        "run NTP (chrony/systemd-timesyncd) on every node",
                    )
                )
            elif hello.status in (401, 403):
                out.append(
                    Verdict(
                        "signature",
                        FAIL,
                        f"{kind} {hello.url} refuses our signature: the cluster secret differs",
                        "use the same secret on every node (copy it from a working node's config)",
                    )
                )
            else:
                out.append(
                    Verdict(
                        "reach",
                        FAIL,
                        f"{kind} {hello.url} does not answer: {hello.error}",
                        "is its daemon running? is the port open between the boxes?",
                    )
                )
            continue
        info = hello.info
        who = f"{kind} {str(info.get('node_id', '?'))[:8]} at {hello.url}"
        if info.get("cluster_id") != cfg.cluster_id:
            out.append(
                Verdict(
                    "cluster_id",
                    FAIL,
                    f"{who} is in cluster {info.get('cluster_id')!r}, not {cfg.cluster_id!r}",
                    "use the same cluster_id on every node",
                )
            )
            continue
        out.append(Verdict("signature", OK, f"{who} accepts our signature"))
        if info.get("fingerprint"):
            prints[hello.url] = str(info["fingerprint"])
        if hello.skew_s is not None:
            skew = hello.skew_s
            level = FAIL if abs(skew) > REPLAY_WINDOW_S else WARN if abs(skew) > SKEW_WARN_S else OK
            out.append(
                Verdict(
                    "clock",
                    level,
                    f"{who}: clock {skew:+.0f} s from ours "
                    f"(signatures allow ±{REPLAY_WINDOW_S:.0f} s)",
                    "" if level == OK else "run NTP on every node",
                )
            )
    models = set(prints.values()) | ({fingerprint} if fingerprint else set())
    if len(models) > 1:
        mine = fingerprint or sorted(prints.values())[0]
        odd = [url for url, fp in prints.items() if fp != mine]
        out.append(
            Verdict(
                "model",
                FAIL,
                f"{len(models)} model fingerprints in the cluster: {', '.join(odd)} "
                f"run{'s' if len(odd) == 1 else ''} another model than {mine[:12]}",
                "shard the same checkpoint for every node (edgemoe shard)",
            )
        )
    elif models:
        out.append(Verdict("model", OK, f"every node runs model {next(iter(models))[:12]}"))
    elif not has_model and any(h.info is not None for h in hellos):
        out.append(
            Verdict(
                "model",
                FAIL,
                "neither this box nor any peer that answered has the model",
                "give one node --model-dir (edgemoe shard)",
            )
        )
    return out


def capacity_verdict(view: dict[str, Any] | None) -> Verdict:
    """Cluster memory (alive members' capacities) against the model's expert bytes."""
    if view is None:
        return Verdict(
            "capacity",
            WARN,
            "no node's client API answered: cluster memory unknown",
            "start this node's daemon (or pass the api_token), then run doctor again",
        )
    model = view.get("model") or {}
    total_experts = int(model.get("num_layers", 0)) * int(model.get("num_experts", 0))
    expert = int(model.get("expert_bytes", 0))
    caps = tuple(
        int(m.get("capacity_bytes", 0))
        for m in view.get("members", [])
        if m.get("state") in ("alive", "suspect")
    )
    if not expert or not caps:
        return Verdict(
            "capacity",
            WARN,
            "the cluster has no model or no members yet",
            "run doctor again once a node has the model",
        )
    facts = NodeFacts(0.0, True, len(caps), caps, expert * total_experts, expert)
    if (short := capacity_warning(facts)) is not None:
        return Verdict(
            "capacity",
            FAIL,
            short,
            'raise capacity (e.g. "100%") or add nodes: together at least 100%',
        )
    copies = sum(caps) / (expert * total_experts)
    return Verdict(
        "capacity",
        OK,
        f"cluster memory {human_bytes(sum(caps))} for the model's "
        f"experts {human_bytes(expert * total_experts)}: {copies:.1f} copies fit "
        f"({len(caps)} node(s))",
    )


# ---- the whole run -----------------------------------------------------------------------------
def _local_node_id(state_dir: Path) -> str:
    try:
        text = (state_dir / "node_id").read_text().strip()
    except OSError:
        text = ""
    return text or secrets.token_hex(8)  # a node id of the wire format (16 hex digits)


def _local_manifest(cfg: DaemonConfig) -> dict[str, Any] | None:
    try:
        data = json.loads(
            ((cfg.model_dir or cfg.state_dir / "model") / "manifest.json").read_text()
        )
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def _client_get(url: str, token: str | None, path: str) -> Any:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=HELLO_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url + path, headers=headers, ssl=False) as resp,
        ):
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None


def local_url(cfg: DaemonConfig) -> str:
    host = cfg.host if cfg.host not in ("0.0.0.0", "") else "127.0.0.1"
    scheme = "https" if cfg.tls_cert else "http"
    return f"{scheme}://{host}:{cfg.port}"


async def _cluster_checks(cfg: DaemonConfig) -> tuple[list[Verdict], dict[str, Any] | None]:
    me = local_url(cfg)
    health = await _client_get(me, None, "/healthz")
    node_id = _local_node_id(cfg.state_dir)
    running_here = isinstance(health, dict) and health.get("node_id") == node_id
    announced = await asyncio.to_thread(
        browse, list(cfg.interface), timeout=MDNS_WAIT_S, cluster_id=cfg.cluster_id
    )
    mine = {me, cfg.url}
    urls = [a.url for a in announced if a.node_id != node_id and a.url not in mine]
    urls += [f"http://{h}:{p}" for h, p in cfg.seed_peer]
    urls = list(dict.fromkeys(urls))
    secret = cfg.secret.encode()
    hellos = list(await asyncio.gather(*(say_hello(u, node_id, secret) for u in urls)))
    manifest = _local_manifest(cfg)
    view = await _client_get(me, cfg.api_token, "/v1/cluster") if running_here else None
    fingerprint = str(
        (manifest or {}).get("fingerprint")
        or ((view or {}).get("model") or {}).get("fingerprint")
        or ""
    )
    has_model = manifest is not None or bool((view or {}).get("model"))
    for hello in hellos:  # a peer's client API tells the cluster when this node runs none
        if view is None and hello.info is not None:
            view = await _client_get(hello.url, cfg.api_token, "/v1/cluster")
    verdicts = peer_verdicts(
        cfg, [a for a in announced if a.url in urls], hellos, fingerprint, has_model
    )
    verdicts.append(capacity_verdict(view))
    return verdicts, {"running_here": running_here, "view": view, "manifest": manifest}


def run_doctor(path: Path | None, env: Mapping[str, str] | None = None) -> list[Verdict]:
    """Every check, in the order an operator fixes things: config, box, network, cluster."""
    env = os.environ if env is None else env
    cfg, verdict = check_config(path, env)
    if cfg is None:
        return [verdict]
    verdicts = [verdict]
    cluster, seen = asyncio.run(_cluster_checks(cfg))
    verdicts += check_dirs(cfg, running_here=seen["running_here"])
    verdicts += check_interfaces(cfg)
    verdicts += cluster
    verdicts += check_tokens(cfg)
    model = (seen["view"] or {}).get("model") or seen["manifest"] or {}
    layers = model.get("num_layers") or len(model.get("moe_layers", []))
    expert_total = (
        int(model.get("expert_bytes", 0)) * int(layers) * int(model.get("num_experts", 0))
    )
    verdicts.append(check_accelerator(cfg, expert_total))
    return verdicts


def as_json(verdicts: list[Verdict]) -> dict[str, Any]:
    return {"ok": all(v.level != FAIL for v in verdicts), "checks": [asdict(v) for v in verdicts]}
