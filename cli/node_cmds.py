"""`edgemoe daemon` (run one node), `edgemoe generate` (ask a node for tokens) and
`edgemoe bench rpc` (expert RPC, shard streaming and cluster throughput figures)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer


def _daemon_command(app: typer.Typer) -> None:
    @app.command("daemon")
    def daemon(
        config: Annotated[
            Path | None,
            typer.Option(
                "--config",
                "-c",
                help="TOML config (keys = flag names) [default: $EDGEMOE_CONFIG, else "
                "/etc/edgemoe/edgemoe.toml when it exists]",
            ),
        ] = None,
        model_dir: Annotated[str | None, typer.Option(help="Shard directory")] = None,
        state_dir: Annotated[str | None, typer.Option(help="Node id, acceptor log, shards")] = None,
        host: Annotated[str | None, typer.Option(help="Bind address")] = None,
        port: Annotated[int | None, typer.Option(help="HTTP port (peers and clients)")] = None,
        capacity: Annotated[
            str | None, typer.Option(help='Expert memory: "2GB" or "40%" of the expert bytes')
        ] = None,
        cluster_id: Annotated[str | None, typer.Option(help="Cluster name")] = None,
        secret: Annotated[str | None, typer.Option(help="Cluster secret (HMAC key)")] = None,
        interface: Annotated[
            list[str] | None, typer.Option(help="mDNS interface address (repeatable)")
        ] = None,
        seed_peer: Annotated[
            list[str] | None, typer.Option(help="Static peer host:port (repeatable)")
        ] = None,
        api_token: Annotated[
            str | None, typer.Option(help="Bearer token of the client API")
        ] = None,
        admin_token: Annotated[
            str | None, typer.Option(help="Bearer token of the administrative routes")
        ] = None,
        secret_file: Annotated[
            str | None, typer.Option(help="File holding the cluster secret")
        ] = None,
        api_token_file: Annotated[
            str | None, typer.Option(help="File holding the API token")
        ] = None,
        admin_token_file: Annotated[
            str | None, typer.Option(help="File holding the admin token")
        ] = None,
        tls_cert: Annotated[
            str | None, typer.Option(help="PEM certificate chain: the client API speaks HTTPS")
        ] = None,
        tls_key: Annotated[str | None, typer.Option(help="PEM key of tls_cert")] = None,
        device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
        torch_threads: Annotated[
            int | None, typer.Option(help="torch threads for the model (0: auto)")
        ] = None,
        strategy: Annotated[str | None, typer.Option(help="Placement strategy")] = None,
        transport: Annotated[
            str | None, typer.Option(help="per-server (default) or per-expert (DanceMoE's calls)")
        ] = None,
        log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error")] = None,
        drift_threshold: Annotated[
            float | None, typer.Option(help="Re-place when statistics drift above this (0-1)")
        ] = None,
        drift_min_interval: Annotated[
            float | None, typer.Option(help="Seconds between drift-triggered epochs, at least")
        ] = None,
        routing_trace: Annotated[
            str | None, typer.Option(help="Replay this routing trace (npz; benchmarks)")
        ] = None,
        routing_stream: Annotated[
            str | None, typer.Option(help="Stream of routing_trace this node replays")
        ] = None,
    ) -> None:
        """Run one edgemoe node: discover peers, agree on placement, serve the API."""
        from edgemoe.daemon.config import ConfigError, load_config

        flags = dict(
            model_dir=model_dir, state_dir=state_dir, host=host, port=port, capacity=capacity,
            cluster_id=cluster_id, secret=secret, interface=interface, seed_peer=seed_peer,
            api_token=api_token, admin_token=admin_token, secret_file=secret_file,
            api_token_file=api_token_file, admin_token_file=admin_token_file,
            tls_cert=tls_cert, tls_key=tls_key, device=device, torch_threads=torch_threads,
            strategy=strategy,
            transport=transport, log_level=log_level,
            drift_threshold=drift_threshold, drift_min_interval=drift_min_interval,
            routing_trace=routing_trace, routing_stream=routing_stream,
        )  # fmt: skip
        from edgemoe.cli.client import daemon_config_file

        try:
            cfg = load_config(daemon_config_file(config), flags)
        except ConfigError as exc:
            from edgemoe.cli.client import EXIT_CONFIG

            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_CONFIG) from None
        from edgemoe.daemon.main import run_daemon

        raise typer.Exit(run_daemon(cfg))


def _generate_command(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        prompt: Annotated[str, typer.Argument(help="Prompt text")],
        node: Annotated[
            str | None,
            typer.Option(
                "--node",
                "-n",
                envvar="EDGEMOE_NODE",
                help="Daemon URL [default: the config's local daemon, else mDNS]",
            ),
        ] = None,
        config: Annotated[
            Path | None, typer.Option("--config", "-c", help="Config file (local daemon, token)")
        ] = None,
        max_tokens: Annotated[int, typer.Option(min=1, max=2048)] = 32,
        temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.0,
        api_token: Annotated[
            str | None, typer.Option("--api-token", envvar="EDGEMOE_API_TOKEN")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
        stream: Annotated[
            bool, typer.Option("--stream", help="Stream tokens as they come")
        ] = False,
    ) -> None:
        """Generate from one node; --json prints {"text", "token_ids", "node"}."""
        from edgemoe.cli.client import ClientError, resolve_node, why_unready

        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
        target = None
        try:
            target = resolve_node(node, config, api_token)
            text, ids, node_id = "", [], ""
            if stream:
                for event in target.stream_sse("/v1/completions", {**body, "stream": True}):
                    choice = event["choices"][0]
                    node_id = event.get("node_id", node_id)
                    text += choice.get("text", "")
                    ids += choice.get("token_ids", [])
                    if not as_json:
                        sys.stdout.write(choice.get("text", ""))
                        sys.stdout.flush()
            else:
                out = target.post("/v1/completions", body, timeout=600)
                choice = out["choices"][0]
                text, ids, node_id = choice["text"], choice.get("token_ids", []), out["node_id"]
        except ClientError as exc:
            why = why_unready(target) if target is not None and exc.http_status == 503 else None
            message = f"{target.url} cannot answer: {why}" if target and why else str(exc)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except (KeyError, IndexError, TypeError) as exc:
            typer.echo(f"error: {target.url}: unexpected answer ({exc!r})", err=True)
            raise typer.Exit(1) from None
        if as_json:
            typer.echo(json.dumps({"text": text, "token_ids": ids, "node": node_id}))
        elif stream:
            typer.echo("")
        else:
            typer.echo(text)


def _bench_command(bench: typer.Typer) -> None:
    @bench.command("rpc")
    def bench_rpc(
        workdir: Annotated[
            Path | None, typer.Option(help="Scratch directory (default: a temp dir)")
        ] = None,
        arch: Annotated[str, typer.Option(help="Tiny model architecture")] = "mixtral",
        rows: Annotated[int, typer.Option(help="Tokens per expert RPC")] = 16,
        calls: Annotated[int, typer.Option(help="RPC calls per measurement")] = 300,
        scale: Annotated[int, typer.Option(help="Width multiplier of the tiny model")] = 8,
        prompts: Annotated[int, typer.Option(help="Prompts for the tokens/s comparison")] = 4,
        max_tokens: Annotated[int, typer.Option(help="Tokens per prompt")] = 24,
        token_rounds: Annotated[
            int, typer.Option(help="Interleaved rounds of the daemon vs transformers per-token")
        ] = 3,
        link_mbps: Annotated[float | None, typer.Option(
            help="Also compare shard streaming over a link of this rate between two network "
                 "namespaces (root; see bench testbed)")] = None,
        link_delay_ms: Annotated[float, typer.Option(
            help="One-way delay per side of that link (needs the testbed's delay helper)")] = 0.0,
        json_out: Annotated[Path | None, typer.Option("--json", help="Write figures here")] = None,
    ) -> None:
        """Expert RPC vs bare aiohttp echo; shard streaming vs plain HTTP copy; 3 nodes vs 1."""
        import tempfile

        from edgemoe.daemon.bench import run_rpc_bench

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with tempfile.TemporaryDirectory(prefix="edgemoe-bench-") as tmp:
            figures = run_rpc_bench(
                workdir or Path(tmp), arch=arch, rows=rows, calls=calls, scale=scale,
                prompts=prompts, max_tokens=max_tokens, echo=typer.echo, token_rounds=token_rounds,
                link_mbps=link_mbps, link_delay_ms=link_delay_ms,
            )  # fmt: skip
        if json_out is not None:
            json_out.write_text(json.dumps(figures, indent=1))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add `daemon`, `generate` and `bench rpc`."""
    _daemon_command(app)
    _generate_command(app)
    _bench_command(bench)
