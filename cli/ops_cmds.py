"""Operator commands that talk to a running daemon: status, peers, placement, stats, chat,
migrate; plus the `config` group. Read commands take ``--json`` for scripts; failures are one
line on stderr with the exit codes of ``edgemoe.cli.client``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import wraps
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from edgemoe.cli import config_cmds
from edgemoe.cli.client import ClientError, Node, resolve_node
from edgemoe.daemon.diagnosis import human_bytes

P = ParamSpec("P")
R = TypeVar("R")

NodeOption = Annotated[
    str | None,
    typer.Option(
        "--node", "-n", envvar="EDGEMOE_NODE", help="Daemon URL, e.g. http://10.0.0.2:7600"
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option("--api-token", envvar="EDGEMOE_API_TOKEN", help="Bearer token of the client API"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts")]


def one_line_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn ClientError into `error: ...` on stderr and its exit code, never a traceback."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def short(node_id: str) -> str:
    """Node ids are long; tables show enough to tell them apart."""
    return node_id if len(node_id) <= 12 else node_id[:8]


def ranges(ids: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(ids)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out) or "-"


def held_by_node(holders: dict[str, list[str]]) -> dict[str, dict[int, list[int]]]:
    """``{"l/e": [node, ...]}`` -> ``{node: {layer: [experts]}}``."""
    out: dict[str, dict[int, list[int]]] = {}
    for key, nodes in holders.items():
        layer, expert = (int(x) for x in key.split("/"))
        for node in nodes:
            out.setdefault(node, {}).setdefault(layer, []).append(expert)
    return out


def holdings_by_node(holdings: dict[str, list[str]]) -> dict[str, dict[int, list[int]]]:
    """``{node: ["l/e", ...]}`` -> ``{node: {layer: [experts]}}``."""
    out: dict[str, dict[int, list[int]]] = {}
    for node, keys in holdings.items():
        per = out.setdefault(node, {})
        for key in keys:
            layer, expert = (int(x) for x in key.split("/"))
            per.setdefault(layer, []).append(expert)
    return out


def model_of(cluster: dict[str, Any]) -> dict[str, Any]:
    """The model block of /v1/cluster; a node still fetching its shards has none yet."""
    model = cluster.get("model")
    if not model:
        raise ClientError(
            f"node {cluster.get('node_id', '?')} has no model yet (still fetching its shards?)"
        )
    return model


def unready_reason(cluster: dict[str, Any]) -> str:
    """Why a node that is not ready cannot serve: its warnings, else what it is doing."""
    if cluster.get("warnings"):
        return "; ".join(cluster["warnings"])
    if not cluster.get("model"):
        return "no model yet (fetching the manifest from peers)"
    return "still loading the model"


def member_ids(cluster: dict[str, Any]) -> list[str]:
    ids = [m["node_id"] for m in cluster.get("members", [])]
    return ids or [cluster["node_id"]]


def expand_ids(given: list[str], known: list[str]) -> list[str]:
    """Tables show ids shortened: a unique prefix stands for the whole id. What matches no
    member goes on unchanged (the node refuses it with the reason); an ambiguous prefix is a
    usage error."""
    out: list[str] = []
    for g in given:
        hits = [k for k in known if k == g] or [k for k in known if k.startswith(g)]
        if len(hits) > 1:
            raise ClientError(f"--members {g}: matches {', '.join(sorted(hits))}", 2)
        out.append(hits[0] if hits else g)
    return out


def local_hit(counts: list[list[float]], held: dict[int, list[int]]) -> list[float | None]:
    """Per layer, the share of a node's own expert activations that its held experts serve."""
    out: list[float | None] = []
    for layer, row in enumerate(counts):
        total = sum(row)
        if total <= 0:
            out.append(None)
            continue
        out.append(sum(row[e] for e in held.get(layer, []) if e < len(row)) / total)
    return out


def entropy_bits(row: list[float]) -> float:
    total = sum(row)
    if total <= 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in row if c > 0)


def placement_table(cluster: dict[str, Any], layer: int | None = None) -> Any:
    """Rows = MoE layers, one column per node: the experts it holds (decided placement)."""
    from rich.table import Table

    model = model_of(cluster)
    placement = cluster.get("placement") or {}
    per_node = held_by_node(placement.get("holders", {}))
    nodes = member_ids(cluster)
    table = Table(
        title=f"placement, epoch {placement.get('epoch', '-')} ({placement.get('strategy', '-')})"
    )
    table.add_column("layer", justify="right")
    for node in nodes:
        table.add_column(short(node))
    table.add_column("replicated", justify="right")
    layers = [layer] if layer is not None else list(range(model["num_layers"]))
    holders = placement.get("holders", {})
    for ly in layers:
        replicas = sum(
            1 for e in range(model["num_experts"]) if len(holders.get(f"{ly}/{e}", [])) > 1
        )
        table.add_row(
            str(ly), *(ranges(per_node.get(n, {}).get(ly, [])) for n in nodes), str(replicas)
        )
    return table


def node_summary_table(
    cluster: dict[str, Any], extra: dict[str, dict[str, str]] | None = None
) -> Any:
    """One row per node: state, capacity, experts held (announced), local hit from its stats."""
    from rich.table import Table

    model = cluster.get("model") or {}
    announced = holdings_by_node(cluster.get("holdings", {}))
    stats = cluster.get("stats", {})
    extra = extra or {}
    extra_cols = sorted({k for row in extra.values() for k in row})
    table = Table(title=f"cluster {cluster.get('cluster_id', '')} — epoch {cluster.get('epoch')}")
    for col in ("node", "url", "state", "capacity", "experts held", "local hit", *extra_cols):
        table.add_column(col, justify="right" if col in ("capacity", "experts held") else "left")
    total = model.get("num_layers", 0) * model.get("num_experts", 0)
    for member in cluster.get("members", []):
        nid = member["node_id"]
        held = announced.get(nid, {})
        n_held = sum(len(v) for v in held.values())
        hits = [h for h in local_hit(stats.get(nid, {}).get("counts", []), held) if h is not None]
        hit = f"{sum(hits) / len(hits):.0%}" if hits else "-"
        me = " *" if nid == cluster.get("node_id") else ""
        table.add_row(
            short(nid) + me,
            member.get("url", ""),
            member.get("state", "?"),
            human_bytes(member.get("capacity_bytes", 0)),
            f"{n_held}/{total}",
            hit,
            *(extra.get(nid, {}).get(c, "") for c in extra_cols),
        )
    return table


def migration_table(plan: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for col in ("layer", "expert", "from", "to", "bytes"):
        table.add_column(col, justify="right" if col in ("layer", "expert", "bytes") else "left")
    for step in plan:
        src = step.get("from")
        table.add_row(
            str(step["layer"]),
            str(step["expert"]),
            short(str(src)) if src else "-",
            short(str(step.get("to", ""))),
            human_bytes(step.get("bytes", 0)),
        )
    return table


def explain_table(cluster: dict[str, Any], layer: int | None) -> Any:
    """Why the placement is what it is: per node and layer, how concentrated its own routing
    is (entropy), how many experts it holds there and how much of its traffic they serve."""
    from rich.table import Table

    model = model_of(cluster)
    k = int(model.get("top_k", 1))
    per_node = held_by_node((cluster.get("placement") or {}).get("holders", {}))
    stats = cluster.get("stats", {})
    table = Table(
        title="why: each node's activations vs what it holds "
        f"(est. remote layers/token = Σ 1-hit^{k})"
    )
    for col in ("node", "layer", "held", "entropy", "top experts (share)", "local hit"):
        table.add_column(col)
    table.add_column("est. remote layers/token", justify="right")
    for nid in member_ids(cluster):
        counts = stats.get(nid, {}).get("counts", [])
        held = per_node.get(nid, {})
        hits = local_hit(counts, held)
        layers = [layer] if layer is not None else list(range(len(counts)))
        remote = sum(1 - h**k for h in hits if h is not None)
        for i, ly in enumerate(layers):
            row = counts[ly] if ly < len(counts) else []
            total = sum(row) or 1.0
            top = sorted(range(len(row)), key=lambda e: -row[e])[:3]
            table.add_row(
                short(nid) if i == 0 else "",
                str(ly),
                ranges(held.get(ly, [])),
                f"{entropy_bits(row):.2f} bits",
                " ".join(f"{e}({row[e] / total:.0%})" for e in top if row[e] > 0) or "no traffic",
                f"{hits[ly]:.0%}" if ly < len(hits) and hits[ly] is not None else "-",
                f"{remote:.2f}" if i == 0 else "",
            )
    return table


HEAT_COLOURS = ("grey23", "blue", "cyan", "green", "yellow", "red")
# The same levels as characters, for output without colour (piped, redirected, NO_COLOR).
HEAT_RAMP = ".-+*#@"


def heatmap(counts: list[list[float]], title: str, *, colour: bool = True) -> Any:
    """Layers x experts, each cell that expert's share of the layer's busiest one: a coloured
    block, or a character of HEAT_RAMP where colour would be lost."""
    from rich.panel import Panel
    from rich.text import Text

    levels = len(HEAT_COLOURS)
    text = Text()
    width = max((len(r) for r in counts), default=0)
    text.append("layer  " + "".join(str(e % 10) for e in range(width)) + "\n", style="dim")
    for ly, row in enumerate(counts):
        top = max(row) if row and max(row) > 0 else 1.0
        text.append(f"{ly:>5}  ")
        for c in row:
            level = 0 if c <= 0 else 1 + min(levels - 2, int((c / top) * (levels - 1)))
            if colour:
                text.append("█", style=HEAT_COLOURS[level])
            else:
                text.append(HEAT_RAMP[level])
        text.append("\n")
    text.append("share of the layer's busiest expert: ", style="dim")
    for i in range(levels):
        text.append("█" if colour else HEAT_RAMP[i], style=HEAT_COLOURS[i] if colour else "")
        text.append(" 0 " if i == 0 else f" ≤{i / (levels - 1):.0%} ", style="dim")
    return Panel(text, title=title, expand=False)


CHAT_HELP = """commands (never sent to the model):
  /help          this list
  /reset         forget the conversation (keeps --system)
  /exit, /quit   end the chat (also Ctrl-D)
  //text         send "/text" to the model
Ctrl-C while an answer streams stops that answer."""


def chat_command(line: str) -> str | None:
    """A chat line starting with '/' is for the chat itself: "exit", "reset", or the text to
    show (help, or why it is unknown); None: a message for the model."""
    word = line.strip().split(maxsplit=1)[0] if line.strip() else ""
    if not word.startswith("/") or word.startswith("//"):
        return None
    if word in ("/exit", "/quit"):
        return "exit"
    if word == "/reset":
        return "reset"
    if word in ("/help", "/?"):
        return CHAT_HELP
    return f"unknown command {word}; /help lists them (//text sends /text to the model)"


def console() -> Any:
    from rich.console import Console

    return Console()


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def _probe(url: str) -> str:
    try:
        Node(url, None, "probe").get("/healthz", timeout=1.5)
        return "ok"
    except ClientError:
        return "no answer"


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add the operator commands and the `config` group."""
    config_cmds.register(app)

    @app.command()
    @one_line_errors
    def status(
        node: NodeOption = None,
        config: config_cmds.ConfigOption = None,
        api_token: TokenOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Members, health, epoch, capacities and what each node holds."""
        target = resolve_node(node, config, api_token)
        cluster = target.get("/v1/cluster")
        urls = {m["node_id"]: m.get("url", "") for m in cluster.get("members", [])}
        with ThreadPoolExecutor(max_workers=8) as pool:
            health = dict(zip(urls, pool.map(_probe, urls.values()), strict=True))
        if json_out:
            print_json(
                {"node": target.url, "via": target.how, "cluster": cluster, "health": health}
            )
            if not cluster.get("ready", True):
                raise typer.Exit(1)
            return
        model = cluster.get("model")
        mig = cluster.get("migration", {})
        what = (
            f"model {model['architecture']} {model['num_layers']}x{model['num_experts']} "
            f"top-{model['top_k']}, expert {human_bytes(model['expert_bytes'])}"
            if model
            else "no model yet"
        )
        placement = cluster.get("placement", {})
        drift = cluster.get("drift", {})
        value, limit = drift.get("value"), drift.get("threshold")
        drift_text = "n/a" if value is None else f"{value:.2f}"
        drift_text += " (off)" if limit is None else f" of {limit:.2f}"
        routed = cluster.get("routed", {}).get("total", 1)  # no traffic yet: no share to show
        share = f"{cluster.get('local_share', 0):.0%}" if routed else "-"
        out = console()
        out.print(
            f"node [bold]{cluster['node_id']}[/] at {target.url} (via {target.how}); {what}; "
            f"local share {share}, "
            f"remote {human_bytes(cluster.get('remote_bytes', 0))}; "
            f"epoch {placement.get('epoch', 0)} ({placement.get('reason') or 'none yet'}), "
            f"statistics drift {drift_text}; "
            f"migration: {mig.get('pending', 0)} pending, "
            f"{human_bytes(mig.get('bytes_moved', 0))} moved"
        )
        out.print(node_summary_table(cluster, {n: {"health": h} for n, h in health.items()}))
        for warning in cluster.get("warnings", []):
            out.print(f"[yellow]warning:[/] {warning}", highlight=False)
        if not cluster.get("ready", True):
            raise ClientError(f"node {cluster['node_id']} cannot serve: {unready_reason(cluster)}")

    @app.command()
    @one_line_errors
    def peers(
        node: NodeOption = None,
        config: config_cmds.ConfigOption = None,
        api_token: TokenOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """The membership as this node sees it (SWIM state and incarnation)."""
        target = resolve_node(node, config, api_token)
        cluster = target.get("/v1/cluster")
        members = cluster.get("members", [])
        if json_out:
            print_json(members)
            return
        from rich.table import Table

        table = Table(title=f"peers of {short(cluster['node_id'])} (epoch {cluster.get('epoch')})")
        for col in ("node", "url", "state", "incarnation", "capacity"):
            table.add_column(col)
        for m in members:
            table.add_row(
                m["node_id"],
                m.get("url", ""),
                m.get("state", "?"),
                str(m.get("incarnation", "")),
                human_bytes(m.get("capacity_bytes", 0)),
            )
        console().print(table)

    @app.command()
    @one_line_errors
    def placement(
        layer: Annotated[
            int | None, typer.Option("--layer", "-l", help="Only this MoE layer")
        ] = None,
        explain: Annotated[
            bool, typer.Option("--explain", help="Show the statistics behind it")
        ] = False,
        node: NodeOption = None,
        config: config_cmds.ConfigOption = None,
        api_token: TokenOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Who holds which experts (the decided placement) and, with --explain, why."""
        target = resolve_node(node, config, api_token)
        cluster = target.get("/v1/cluster")
        num_layers = model_of(cluster)["num_layers"]
        if layer is not None and not 0 <= layer < num_layers:
            raise ClientError(f"--layer {layer}: the model has MoE layers 0..{num_layers - 1}", 2)
        if json_out:
            per_node = held_by_node((cluster.get("placement") or {}).get("holders", {}))
            print_json(
                {
                    "epoch": (cluster.get("placement") or {}).get("epoch"),
                    "strategy": (cluster.get("placement") or {}).get("strategy"),
                    "held": {
                        n: {str(ly): sorted(es) for ly, es in per.items() if layer in (None, ly)}
                        for n, per in per_node.items()
                    },
                    "local_hit": {
                        n: local_hit(s.get("counts", []), per_node.get(n, {}))
                        for n, s in cluster.get("stats", {}).items()
                    },
                }
            )
            return
        out = console()
        out.print(placement_table(cluster, layer))
        if explain:
            out.print(explain_table(cluster, layer))

    @app.command()
    @one_line_errors
    def stats(
        node_id: Annotated[
            str | None, typer.Option("--node-id", help="Only this node (id or prefix)")
        ] = None,
        node: NodeOption = None,
        config: config_cmds.ConfigOption = None,
        api_token: TokenOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Activation heatmap per node: which experts each node's requests pick, per layer."""
        target = resolve_node(node, config, api_token)
        cluster = target.get("/v1/cluster")
        all_stats: dict[str, Any] = cluster.get("stats", {})
        chosen = {n: s for n, s in all_stats.items() if node_id is None or n.startswith(node_id)}
        if node_id is not None and not chosen:
            raise ClientError(f"--node-id {node_id}: no statistics from such a node", 1)
        if json_out:
            print_json(chosen)
            return
        out = console()
        colour = out.is_terminal and not out.no_color
        for nid, s in sorted(chosen.items()):
            out.print(
                heatmap(
                    s.get("counts", []),
                    f"{short(nid)} — v{s.get('version', 0)}, "
                    f"{s.get('request_rate', 0.0):.2f} req/s",
                    colour=colour,
                )
            )
        if not chosen:
            out.print("no statistics yet: send requests first (edgemoe generate ...)")

    @app.command()
    @one_line_errors
    def chat(
        system: Annotated[str | None, typer.Option(help="System prompt")] = None,
        max_tokens: Annotated[int, typer.Option(help="Tokens per answer")] = 128,
        temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
        node: NodeOption = None,
        config: config_cmds.ConfigOption = None,
        api_token: TokenOption = None,
    ) -> None:
        """Talk to the model; answers stream as they are generated. /help lists the commands;
        Ctrl-C stops an answer, Ctrl-D or /exit ends."""
        target = resolve_node(node, config, api_token)
        models = target.get("/v1/models").get("data", [])
        if not models:
            raise ClientError(f"{target.url} serves no model yet", 1)
        model = models[0]["id"]
        start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        messages = list(start)
        interactive = sys.stdin.isatty()
        while True:
            try:
                line = input("you> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                if interactive:
                    typer.echo("")  # leave the prompt's line
                break
            command = chat_command(line)
            if command == "exit":
                break
            if command == "reset":
                messages = list(start)
                typer.echo("(conversation forgotten)")
                continue
            if command is not None:
                typer.echo(command)  # help, or why a command is unknown
                continue
            if not line.strip():
                continue
            text = line[1:] if line.startswith("//") else line
            messages.append({"role": "user", "content": text})
            body = {
                "model": model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "stream": True,
            }  # fmt: skip
            typer.echo("edgemoe> ", nl=False)
            answer: list[str] = []
            events = target.stream_sse("/v1/chat/completions", body)
            try:
                for event in events:
                    for choice in event.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        answer.append(piece)
                        typer.echo(piece, nl=False)
            except KeyboardInterrupt:  # Ctrl-C stops this answer (the node cancels it), not chat
                events.close()
                typer.echo(" [stopped]", nl=False)
            typer.echo("")
            messages.append({"role": "assistant", "content": "".join(answer)})

    @app.command()
    @one_line_errors
    def migrate(
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Only show the plan, move nothing")
        ] = False,
        members: Annotated[
            list[str] | None,
            typer.Option(
                "--members", help="Decide this member set by hand (repeat), e.g. after quorum loss"
            ),
        ] = None,
        node: NodeOption = None,
        config: config_cmds.ConfigOption = None,
        api_token: TokenOption = None,
        admin_token: Annotated[
            str | None,
            typer.Option("--admin-token", envvar="EDGEMOE_ADMIN_TOKEN",
                         help="Bearer token of the administrative routes"),
        ] = None,
        json_out: JsonOption = False,
    ) -> None:
        """Ask for a rebalance now from the current statistics and show the plan."""
        target = resolve_node(node, config, api_token, admin_token=admin_token, admin=True)
        if members:
            members = expand_ids(members, member_ids(target.get("/v1/cluster")))
        result = target.post(
            "/v1/cluster/migrate", {"dry_run": dry_run, "members": members or None}, timeout=120
        )
        if json_out:
            print_json(result)
            return
        plan = result.get("plan", [])
        total = sum(int(s.get("bytes", 0)) for s in plan)
        verdict = "dry run" if dry_run else ("decided" if result.get("decided") else "not decided")
        out = console()
        out.print(
            migration_table(
                plan,
                f"migration plan for epoch {result.get('epoch')} ({verdict}): "
                f"{len(plan)} moves, {human_bytes(total)}",
            )
        )
        if not dry_run and not result.get("decided"):
            raise ClientError("the cluster did not decide the new placement (no quorum?)", 1)
