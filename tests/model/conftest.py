"""Tiny checkpoints and their shard directories, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgemoe.model.shard import shard_checkpoint
from edgemoe.model.tiny import ARCHITECTURES, write_tiny_model

torch.set_num_threads(1)


class TinyModels:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[tuple[str, str, str | None], tuple[Path, Path]] = {}

    def get(
        self, arch: str, layout: str = "original", quantize: str | None = None
    ) -> tuple[Path, Path]:
        """(checkpoint dir, shard dir) for an architecture; built on first use."""
        key = (arch, layout, quantize)
        if key not in self._done:
            name = f"{arch}-{layout}" + (f"-{quantize}" if quantize else "")
            ckpt = write_tiny_model(
                arch, self.root / name, seed=7, layout=layout, quantize=quantize  # type: ignore[arg-type]
            )
            shards = self.root / f"{name}-shards"
            shard_checkpoint(ckpt, shards)
            self._done[key] = (ckpt, shards)
        return self._done[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)
