"""The chaos checker: reads what a chaos run recorded and lists what went wrong.

Pure (no IO, no clock): clients' request histories, `/v1/cluster` snapshots over time, the
nemesis' schedule, shard hashes read off the disks, process exits and resource samples go
in as data; figures and `violations` (a list of sentences, empty when clean) come out. Every
time is seconds on one clock (the runner's, from the start of the run), so a recorded run can
be checked again, and a planted fault in a test is just a history.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Nemesis kinds that take a node out of the cluster for their duration; "boot" is a
# (re)started daemon's time until it says it is ready, recorded by the runner, not a fault.
NODE_DOWN = ("kill", "pause", "leave", "boot")
# Faults that leave a node's own clients unanswered: its process is dead, frozen or gone. A
# booting node is not among them: its port is up and a ready peer answers for it.
NODE_OUT = ("kill", "pause", "leave")
# Seconds between one down fault's end and the next one's start that still make one stretch
# of downtime (the runner starts the boot as the leave it heals ends, a few ms apart).
ADJACENT_S = 0.5
# A daemon's RSS at the end may be this many times its RSS after warm-up.
RSS_GROWTH_MAX = 1.5
# Threads and fds may grow by this factor plus this many before they count as leaked.
LEAK_FACTOR = 1.5
LEAK_SLACK = 16
# Sockets: connections to peers and clients come and go with members (a join adds some).
SOCKET_SLACK = 48


@dataclass(frozen=True)
class Request:
    """One client request as its client saw it. `status`: ok, error (the daemon answered
    with a clear error), timeout (no answer by the client's limit), pending (never ended)."""

    node: int
    prompt: str
    max_tokens: int
    start: float
    deadline_s: float
    status: str
    end: float | None = None
    token_ids: tuple[int, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class Fault:
    """One step of the nemesis: from `start` until its heal at `end`. `nodes`: the targets
    (killed, paused, leaving, slowed, joining); `cuts`: node pairs that cannot talk."""

    step: int
    kind: str
    start: float
    end: float
    nodes: tuple[int, ...] = ()
    cuts: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """A node's `/v1/cluster` at time `t`."""

    t: float
    node: int
    view: dict[str, Any]


@dataclass(frozen=True)
class ShardHash:
    node: int
    file: str
    expected: str
    actual: str | None  # None: listed as held but missing


@dataclass(frozen=True)
class Exit:
    """A daemon process that ended; `asked`: the nemesis or the runner ended it."""

    node: int
    t: float
    code: int | None
    asked: bool


@dataclass(frozen=True)
class Resources:
    """A daemon's RSS (bytes), fds, sockets and threads after warm-up and at the end (same
    process)."""

    node: int
    warm: dict[str, int]
    end: dict[str, int]


@dataclass
class History:
    nodes: int  # the cluster's size at the start (a joining node is counted apart)
    reference: dict[str, list[int]]  # prompt -> greedy tokens of the single-process model
    requests: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    final: list[Snapshot] = field(default_factory=list)  # live nodes after the last heal
    shards: list[ShardHash] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    resources: list[Resources] = field(default_factory=list)
    end: float = 0.0


def _down_and_cut(faults: Sequence[Fault], t: float) -> tuple[set[int], set[frozenset[int]]]:
    down: set[int] = set()
    cut: set[frozenset[int]] = set()
    for f in faults:
        if f.start <= t < f.end:
            if f.kind in NODE_DOWN:
                down.update(f.nodes)
            cut.update(frozenset(c) for c in f.cuts)
    return down, cut


def with_majority(node: int, t0: float, t1: float, faults: Sequence[Fault], nodes: int) -> bool:
    """True when `node` is up and reaches more than half of the cluster directly (itself
    included) at every instant of [t0, t1]."""
    instants = [t0] + [f.start for f in faults if t0 < f.start <= t1]
    for t in instants:
        down, cut = _down_and_cut(faults, t)
        if node in down:
            return False
        reach = 1 + sum(1 for y in range(nodes)
                        if y != node and y not in down and frozenset((node, y)) not in cut)
        if reach * 2 <= nodes:
            return False
    return True


def _hit_by_fault(node: int, t0: float, t1: float, faults: Sequence[Fault]) -> bool:
    """The request's own daemon was frozen, killed or leaving while it ran: its client
    waiting is the box's fault, not a hang."""
    return any(f.kind in NODE_DOWN and node in f.nodes and f.start < t1 and f.end > t0
               for f in faults)  # fmt: skip


def _placement_key(view: dict[str, Any]) -> str:
    holders = (view.get("placement") or {}).get("holders") or {}
    return json.dumps({k: sorted(v) for k, v in sorted(holders.items())})


def check_tokens(h: History) -> tuple[int, list[str]]:
    wrong, out = 0, []
    for r in h.requests:
        if r.status != "ok":
            continue
        want = h.reference.get(r.prompt)
        if want is None or list(r.token_ids) != want[: r.max_tokens]:
            wrong += 1
            out.append(f"wrong tokens: node {r.node} at {r.start:.1f}s, prompt {r.prompt!r}: "
                       f"got {list(r.token_ids)}, reference {want}")  # fmt: skip
    return wrong, out


def check_hangs(h: History) -> tuple[int, list[str]]:
    hung, out = 0, []
    for r in h.requests:
        end = r.end if r.end is not None else h.end
        late = r.status in ("timeout", "pending") or end - r.start > r.deadline_s
        if late and not _hit_by_fault(r.node, r.start, end, h.faults):
            hung += 1
            out.append(f"hung request: node {r.node} at {r.start:.1f}s, {r.status} after "
                       f"{end - r.start:.1f}s (deadline {r.deadline_s:g}s)")  # fmt: skip
    return hung, out


def check_agreement(snapshots: Iterable[Snapshot]) -> list[str]:
    """No two snapshots may report different placements for one epoch."""
    seen: dict[int, tuple[str, Snapshot]] = {}
    out = []
    reported: set[int] = set()
    for s in snapshots:
        epoch = int((s.view.get("placement") or {}).get("epoch") or 0)
        if epoch == 0:
            continue
        key = _placement_key(s.view)
        first = seen.setdefault(epoch, (key, s))
        if first[0] != key and epoch not in reported:
            reported.add(epoch)
            out.append(f"two placements for epoch {epoch}: node {first[1].node} at "
                       f"{first[1].t:.1f}s and node {s.node} at {s.t:.1f}s differ")  # fmt: skip
    return out


def check_convergence(final: Sequence[Snapshot]) -> list[str]:
    """After the last heal: one epoch everywhere, and every expert held by a live node."""
    if not final:
        return ["no live node answered after the last heal"]
    out = []
    epochs = {s.node: int((s.view.get("placement") or {}).get("epoch") or 0) for s in final}
    if len(set(epochs.values())) != 1:
        out.append(f"not converged after the last heal: epochs by node {epochs}")
    model = final[0].view.get("model") or {}
    wanted = {f"{layer}/{e}" for layer in range(int(model.get("num_layers") or 0))
              for e in range(int(model.get("num_experts") or 0))}  # fmt: skip
    held: set[str] = set()
    for s in final:
        held.update((s.view.get("holdings") or {}).get(s.view.get("node_id", ""), []))
    missing = sorted(wanted - held)
    if not wanted:
        out.append("the final views carry no model")
    elif missing:
        out.append(f"after the last heal {len(missing)} experts have no live holder, "
                   f"e.g. {missing[:5]}")  # fmt: skip
    return out


def check_disks(shards: Iterable[ShardHash]) -> list[str]:
    return [f"shard {s.file} on node {s.node}: sha256 {s.actual or 'missing'}, manifest says "
            f"{s.expected}" for s in shards if s.actual != s.expected]  # fmt: skip


def check_exits(exits: Iterable[Exit]) -> list[str]:
    return [f"daemon of node {e.node} died unasked at {e.t:.1f}s (exit {e.code})"
            for e in exits if not e.asked]  # fmt: skip


def check_resources(resources: Iterable[Resources]) -> list[str]:
    out = []
    for r in resources:
        for what, warm in r.warm.items():
            end = r.end.get(what)
            if end is None or warm <= 0:
                continue
            slack = SOCKET_SLACK if what == "sockets" else LEAK_SLACK
            limit = warm * RSS_GROWTH_MAX if what == "rss" else warm * LEAK_FACTOR + slack
            if end > limit:
                out.append(f"node {r.node}: {what} grew from {warm} after warm-up to {end}")
    return out


def _next_hit(node: int, after: float, step: int, faults: Sequence[Fault]) -> float | None:
    """When the next fault of a later step touches `node` (its target, or one end of a cut)."""
    hits = [g.start for g in faults if g.kind != "boot" and g.step != step and g.start >= after
            and (node in g.nodes or any(node in pair for pair in g.cuts))]  # fmt: skip
    return min(hits, default=None)


def _back_up(node: int, t: float, faults: Sequence[Fault],
             kinds: tuple[str, ...] = NODE_DOWN) -> float:  # fmt: skip
    """When `node`, down at `t` or not, is up again: the end of the chain of its own faults
    of `kinds` covering `t` (a leave, then the restart's boot; a pause healed after a slow
    link), each starting at most ADJACENT_S after the one before ends."""
    up = t
    while True:
        later = [g.end for g in faults if g.kind in kinds and node in g.nodes
                 and g.start <= up + ADJACENT_S and g.end > up]  # fmt: skip
        if not later:
            return up
        up = max(later)


def heal_times(h: History) -> list[dict[str, Any]]:
    """Per heal and node: seconds from the heal to the node's first success after it (None
    when none came before the run ended); `boot_s`: the node's own restart until ready, when
    the heal restarted it (python, torch and the model load); `boot_left_s`: how long the node
    stayed down after the heal (a boot still under way, a leave and then its restart's boot,
    or another fault of the step); `out_left_s`: the same without boots (how long the node's
    own clients could not be answered at all: its process dead, frozen or gone).
    `cut_short`: a later step's fault touched the node before that first success, so the
    heal's own time is only known to exceed `seconds`, counted until that fault began (the
    success that came after it measures the later fault, not this heal)."""
    rows = []
    for f in h.faults:
        if f.kind == "boot":
            continue
        for node in range(h.nodes):
            ok = [r.end for r in h.requests if r.node == node and r.status == "ok"
                  and r.start >= f.end and r.end is not None]  # fmt: skip
            first = min(ok, default=None)
            hit = _next_hit(node, f.end, f.step, h.faults)
            cut_short = hit is not None and (first is None or first > hit)
            boots = [b.end - b.start for b in h.faults if b.kind == "boot" and b.step == f.step
                     and node in b.nodes]  # fmt: skip
            up = _back_up(node, f.end, h.faults)
            back = _back_up(node, f.end, h.faults, NODE_OUT)
            end = hit if cut_short else first
            rows.append({"step": f.step, "kind": f.kind, "node": node,
                         "seconds": end - f.end if end is not None else None,
                         "cut_short": cut_short,
                         "boot_s": boots[0] if boots else None,
                         "boot_left_s": up - f.end,
                         "out_left_s": back - f.end})  # fmt: skip
    return rows


def check(h: History) -> dict[str, Any]:
    """Figures and violations of one run."""
    wrong, wrong_v = check_tokens(h)
    hung, hung_v = check_hangs(h)
    majority = [r for r in h.requests
                if with_majority(r.node, r.start, r.end if r.end is not None else h.end,
                                 h.faults, h.nodes)]  # fmt: skip
    heals = heal_times(h)
    last = max((f.end for f in h.faults if f.kind != "boot"), default=None)
    live = {s.node for s in h.final}
    never = [] if last is None else [
        f"node {node} had no success after the last heal at {last:.1f}s"
        for node in sorted(live)
        if not any(r.node == node and r.status == "ok" and r.start >= last for r in h.requests)
    ]  # fmt: skip
    violations = (wrong_v + hung_v + check_agreement([*h.snapshots, *h.final])
                  + check_convergence(h.final) + never + check_disks(h.shards)
                  + check_exits(h.exits) + check_resources(h.resources))  # fmt: skip
    whole = [row for row in heals if row["seconds"] is not None and not row["cut_short"]]
    measured = [row["seconds"] for row in whole]
    # the same, less the time the node itself stayed down after the heal (its boot: python,
    # torch, the model; or another fault of the step): what the cluster adds once the box is
    # back (the goal is judged on `measured`, boot included)
    after_boot = [row["seconds"] - row["boot_left_s"] for row in whole]
    # the same, counted from when the node's own process is back (not dead, frozen or gone): a
    # heal cannot reach the clients of a box that is still frozen by a fault of its own
    once_back = [row["seconds"] - row["out_left_s"] for row in whole]
    short = [row["seconds"] for row in heals if row["cut_short"]]
    succeeded = sum(r.status == "ok" for r in majority)
    epochs = {int((s.view.get("placement") or {}).get("epoch") or 0)
              for s in [*h.snapshots, *h.final]} - {0}  # fmt: skip
    return {
        "requests": len(h.requests),
        "succeeded": sum(r.status == "ok" for r in h.requests),
        "failed_clearly": sum(r.status == "error" for r in h.requests),
        # of those, the daemon's own failures (HTTP 500): errors, but bugs to look at
        "internal_errors": [f"node {r.node} at {r.start:.1f}s: {r.error}" for r in h.requests
                            if r.status == "error" and r.error.startswith("HTTP 500")],
        "wrong": wrong,
        "hung": hung,
        "with_majority": len(majority),
        "availability_with_majority": succeeded / len(majority) if majority else None,
        "heal_to_success": heals,
        "worst_heal_to_success_s": max(measured) if measured else None,
        "worst_heal_to_success_after_boot_s": max(after_boot) if after_boot else None,
        "worst_heal_to_success_once_back_s": max(once_back) if once_back else None,
        # heals a later fault cut short: how many, and the longest time known to have passed
        "heals_cut_short": len(short),
        "worst_cut_short_lower_bound_s": max(short) if short else None,
        "boots_s": sorted(round(f.end - f.start, 1) for f in h.faults if f.kind == "boot"),
        "epochs_decided": len(epochs),
        "shards_checked": len(h.shards),
        "violations": violations,
    }


def history_from_json(data: dict[str, Any]) -> History:
    """A History from the runner's JSON (`history` key of `bench chaos --json`)."""
    def tup(rows: Any) -> tuple[Any, ...]:
        return tuple(tuple(x) if isinstance(x, list) else x for x in rows)

    return History(
        nodes=data["nodes"], reference=data["reference"], end=data["end"],
        requests=[Request(**{**r, "token_ids": tuple(r["token_ids"])}) for r in data["requests"]],
        faults=[Fault(**{**f, "nodes": tuple(f["nodes"]), "cuts": tup(f["cuts"])})
                for f in data["faults"]],
        snapshots=[Snapshot(**s) for s in data["snapshots"]],
        final=[Snapshot(**s) for s in data["final"]],
        shards=[ShardHash(**s) for s in data["shards"]],
        exits=[Exit(**e) for e in data["exits"]],
        resources=[Resources(**r) for r in data["resources"]],
    )  # fmt: skip
