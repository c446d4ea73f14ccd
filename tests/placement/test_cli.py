"""`edgemoe trace import-esft` and `edgemoe bench placement` composed from flags, as processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgemoe.stats.traces import load_stream


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgemoe.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _esft_task(folder: Path, samples: list[np.ndarray]) -> None:
    """ESFT layout: one file per layer (from 1), line i = sample i: ids, empty field, weights."""
    folder.mkdir()
    L = samples[0].shape[1]
    for layer in range(L):
        lines = []
        for ids in samples:
            flat = ids[:, layer].ravel()
            lines.append("\t".join([*map(str, flat), "", *["0.125"] * len(flat)]))
        (folder / f"expert_weights_{layer + 1}.txt").write_text("\n".join(lines) + "\n")


def test_import_esft_packs_layers_and_requests_into_a_loadable_trace(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = [np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)])
                         for _ in range(n)]) for n in (3, 5)]  # [T, L=3, K=2] per sample
    _esft_task(tmp_path / "law", samples)
    out = tmp_path / "trace.npz"
    res = _cli("trace", "import-esft", str(out), str(tmp_path / "law"), "--top-k", "2")
    assert res.returncode == 0, res.stderr
    assert "law: 8 tokens" in res.stdout
    st = load_stream(out, "law")
    assert st.req_offsets.tolist() == [0, 3, 8]
    assert np.array_equal(st.expert_ids, np.concatenate(samples))
    with np.load(out) as z:
        assert z["law_weights"].dtype == np.float16


def test_import_esft_rejects_a_line_without_the_separator(tmp_path: Path) -> None:
    folder = tmp_path / "intent"
    folder.mkdir()
    (folder / "expert_weights_1.txt").write_text("1\t2\t0.5\t0.5\n")
    res = _cli("trace", "import-esft", str(tmp_path / "t.npz"), str(folder), "--top-k", "2")
    assert res.returncode == 2
    assert "no empty field" in res.stderr


def test_bench_placement_from_flags_writes_every_strategy_with_both_transports(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {}
    for s, name in enumerate(("a", "b")):
        taste = rng.permutation(8)[:4]  # each stream prefers its own experts
        ids = np.stack([np.stack([rng.choice(taste if rng.random() < 0.8 else np.arange(8), 2,
                                             replace=False) for _ in range(2)])
                        for _ in range(40)])  # [40 tokens, 2 layers, top-2]
        arrays[f"{name}_expert_ids"] = ids.astype(np.uint8)
        arrays[f"{name}_req_offsets"] = np.arange(0, 41, 5 + s * 5)
    trace = tmp_path / "toy.npz"
    np.savez(trace, **arrays)
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    res = _cli("bench", "placement", "--trace", str(trace), "--streams", "a,b",
               "--capacities", "1,2", "--memory-ratio", "1.5", "--bandwidth-mbps", "100",
               "--rtt-ms", "2", "--expert-mb", "1", "--hidden", "64", "--seed", "3",
               "--json", str(out), "--plot", str(png))
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    sc = doc["scenario"]
    assert (sc["streams"], sc["capacities"], sc["memory_ratio"], sc["seed"]) == (
        ["a", "b"], [1.0, 2.0], 1.5, 3)
    names = set(doc["strategies"])
    assert {"uniform", "layers", "eplb", "dancemoe", "edgemoe", "optimal"} <= names
    assert {"eplb+per-expert", "dancemoe+per-expert", "edgemoe+per-expert"} <= names
    for name, row in doc["strategies"].items():
        assert row["transport"] == ("per-expert" if name.endswith("+per-expert")
                                    else "per-server")
        for key in ("latency_mean_s", "latency_p50_s", "latency_p99_s",
                    "bytes_between_servers", "local_share", "solve_s"):
            assert row[key] >= 0, (name, key)
        assert row["latency_p50_s"] <= row["latency_p99_s"]
    # the optimum is never worse on its own objective than any heuristic
    best = doc["strategies"]["optimal"]["objective_s"]
    assert all(best <= r["objective_s"] + 1e-12 for r in doc["strategies"].values())
    assert "/eplb lat" in res.stdout and "/dancemoe lat" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_sweep_rejects_a_negative_budget_an_unknown_per_run_budget_and_a_bare_resume(
) -> None:
    res = _cli("bench", "placement", "--sweep", "--minutes", "-1")
    assert res.returncode == 2 and "--minutes must not be negative" in res.stderr
    res = _cli("bench", "placement", "--sweep", "--minutes", "1", "--budget", "tiny")
    assert res.returncode == 2 and "--budget is grid or quick" in res.stderr
    res = _cli("bench", "placement", "--sweep", "--resume", "earlier.json")
    assert res.returncode == 2 and "give --minutes too" in res.stderr
