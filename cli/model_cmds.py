"""Model commands: `edgemoe model tiny`, `edgemoe shard [verify]`, `edgemoe bench shard|quant`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

_ARCH_HELP = "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, gpt_oss"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def tiny(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    arch: Annotated[str, typer.Option("--arch", help=f"HF model_type: {_ARCH_HELP}.")],
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same weights).")] = 0,
    layout: Annotated[
        str, typer.Option(help="original: experts as the family's hub files; fused: [E, ...].")
    ] = "original",
    layers: Annotated[int | None, typer.Option(help="MoE layers (dense ones added).")] = None,
    experts: Annotated[int | None, typer.Option(help="Routed experts per layer.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Experts each token is routed to.")] = None,
    shared_experts: Annotated[
        int | None, typer.Option(help="Shared experts (deepseek_v2/v3, qwen2_moe).")
    ] = None,
    hidden_size: Annotated[int | None, typer.Option(help="Hidden size (head width 16).")] = None,
    expert_width: Annotated[
        int | None, typer.Option(help="Intermediate size of each routed expert (a multiple of 8).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Store the routed experts quantized as published: mxfp4 (gpt_oss) or fp8 "
            "(128x128 blocks; hidden size and expert width default to 128)."
        ),
    ] = None,
) -> None:
    """Write a tiny random MoE checkpoint (config, safetensors, offline byte tokenizer).

    Shape options override the family's tiny defaults; a DeepSeek-V2-Lite-shaped model with
    tiny experts: --arch deepseek_v2 --layers 26 --experts 64 --top-k 6 --shared-experts 2
    --hidden-size 2048 --expert-width 8 --dtype bfloat16. Quantized: --arch gpt_oss
    --quantize mxfp4, or --arch deepseek_v3 --quantize fp8.
    """
    from edgemoe.model.errors import ModelError
    from edgemoe.model.tiny import DTYPES, QUANTIZATIONS, TinyShape, write_tiny_model

    if dtype not in DTYPES:
        raise _fail(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise _fail(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    shape = TinyShape(layers, experts, top_k, shared_experts, hidden_size, expert_width)
    try:
        path = write_tiny_model(
            arch, out_dir, seed=seed, layout=layout, dtype=DTYPES[dtype], shape=shape,  # type: ignore[arg-type]
            quantize=quantize,
        )
    except ModelError as exc:
        raise _fail(str(exc)) from None
    what = f"{arch} ({quantize} experts)" if quantize else arch
    typer.echo(f"wrote tiny {what} checkpoint to {path}")


def _do_verify(out_dir: Path) -> None:
    from edgemoe.model.errors import ModelError
    from edgemoe.model.shard import verify_shards

    try:
        manifest = verify_shards(out_dir)
    except ModelError as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"ok: {len(manifest.files)} files verified ({manifest.architecture}, "
        f"{manifest.num_layers} MoE layers x {manifest.num_experts} experts, "
        f"fingerprint {manifest.fingerprint[:16]})"
    )


def _do_shard(model_dir: Path, out_dir: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from edgemoe.model.checkpoint import plan_checkpoint
    from edgemoe.model.errors import ModelError
    from edgemoe.model.shard import shard_checkpoint

    try:  # headers only: checks the checkpoint and gives the bar its total before any write
        plan = plan_checkpoint(model_dir)
    except ModelError as exc:
        raise _fail(str(exc)) from None
    total = 1 + len(plan.layers) * plan.num_experts  # the dense part, then one file per expert
    failure: ModelError | None = None
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("sharding", total=total)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            manifest, written = shard_checkpoint(model_dir, out_dir, progress=progress)
        except ModelError as exc:
            failure = exc
    if failure is not None:  # said once the bar is gone, as one line
        raise _fail(str(failure))
    state = "wrote" if written else "up to date:"
    typer.echo(
        f"{state} {out_dir} ({manifest.architecture}, {manifest.num_layers} MoE layers x "
        f"{manifest.num_experts} experts, fingerprint {manifest.fingerprint[:16]})"
    )


def shard(
    paths: Annotated[
        list[str],
        typer.Argument(metavar="MODEL_DIR OUT_DIR | verify OUT_DIR", show_default=False),
    ],
) -> None:
    """Split a checkpoint into dense.safetensors + one file per expert + manifest.json.

    `edgemoe shard verify OUT_DIR` checks every shard's size and sha256 instead.
    (A model directory literally named `verify` must be given as `./verify`.)
    """
    if len(paths) == 2 and paths[0] == "verify":
        _do_verify(Path(paths[1]))
    elif len(paths) == 2:
        _do_shard(Path(paths[0]), Path(paths[1]))
    else:
        raise _fail("usage: edgemoe shard MODEL_DIR OUT_DIR  |  edgemoe shard verify OUT_DIR")


def bench_shard(
    size_mb: Annotated[
        int, typer.Option(help="Checkpoint size to scale the model to (MB).")
    ] = 1024,
    arch: Annotated[str, typer.Option(help=f"Architecture: {_ARCH_HELP}.")] = "mixtral",
) -> None:
    """Shard a tiny model scaled up to SIZE_MB: MB/s and peak RSS against tensor sizes."""
    from edgemoe.model.bench import run_shard_bench
    from edgemoe.model.errors import ModelError

    mb = 1e6
    with tempfile.TemporaryDirectory(prefix="edgemoe-bench-shard-") as tmp:
        try:
            r = run_shard_bench(arch, size_mb * 1_000_000, Path(tmp))
        except (ModelError, RuntimeError) as exc:
            raise _fail(str(exc)) from None
    growth = r.peak_rss - r.baseline_rss
    typer.echo(f"architecture            {r.arch}")
    typer.echo(f"checkpoint              {r.checkpoint_bytes / mb:10.1f} MB")
    typer.echo(f"largest tensor          {r.largest_tensor_bytes / mb:10.1f} MB")
    typer.echo(f"dense part              {r.dense_bytes / mb:10.1f} MB")
    typer.echo(f"shard time              {r.seconds:10.2f} s  ({r.mb_per_s:.1f} MB/s)")
    typer.echo(f"child RSS before shard  {r.baseline_rss / mb:10.1f} MB (libraries loaded)")
    typer.echo(f"peak RSS while sharding {r.peak_rss / mb:10.1f} MB (growth {growth / mb:.1f} MB)")
    typer.echo(
        f"goal 2x largest + dense {r.goal_bytes / mb:10.1f} MB  "
        f"(growth/goal {growth / r.goal_bytes:.2f}, peak/goal {r.peak_rss / r.goal_bytes:.2f}, "
        f"growth/checkpoint {growth / r.checkpoint_bytes:.2f})"
    )
    typer.echo(f"growth / largest tensor {growth / r.largest_tensor_bytes:10.2f}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this group's commands to the application."""
    model = typer.Typer(help="Model checkpoints: tiny random models for tests and demos.")
    model.command("tiny")(tiny)
    app.add_typer(model, name="model")
    app.command("shard")(shard)
    bench.command("shard")(bench_shard)
    bench.command("quant")(bench_quant)


def bench_quant(
    tokens: Annotated[int, typer.Option(help="Greedy tokens generated per measurement.")] = 32,
    rounds: Annotated[int, typer.Option(help="Rounds (expert dtypes interleaved); median.")] = 3,
) -> None:
    """Quantized experts: shard bytes vs bfloat16, bytes held, tokens/s per expert_dtype."""
    import torch

    from edgemoe.model.quant_bench import EXPERT_DTYPES, published_expert_bytes, run_quant_bench

    torch.set_num_threads(1)  # one core each: the box is shared
    with tempfile.TemporaryDirectory(prefix="edgemoe-bench-quant-") as tmp:
        results = run_quant_bench(Path(tmp), tokens=tokens, rounds=rounds)
    for r in results:
        quantized, bf16 = published_expert_bytes(r.method)
        typer.echo(f"{r.method} ({r.arch}) at the published size: expert {quantized} B, "
                   f"bfloat16 {bf16} B (x{quantized / bf16:.3f}, "
                   f"{1e9 / quantized:.1f} vs {1e9 / bf16:.1f} experts per GB)")  # fmt: skip
        typer.echo(f"{r.method} ({r.arch}) tiny: expert shard {r.shard_bytes} B, bfloat16 shard "
                   f"{r.bf16_bytes} B (x{r.shard_bytes / r.bf16_bytes:.3f})")  # fmt: skip
        native = r.tokens_per_s["native"]
        for dtype in EXPERT_DTYPES:
            typer.echo(
                f"  expert_dtype {dtype:8s} held {r.held_bytes[dtype]:7d} B/expert "
                f"(x{r.held_bytes[dtype] / r.shard_bytes:.2f} shard)  "
                f"{r.tokens_per_s[dtype]:7.1f} tok/s (x{r.tokens_per_s[dtype] / native:.3f} "
                f"native)"
            )
    typer.echo("on a CPU 'native' dequantizes on load to the model's dtype (no quantized kernels)")
