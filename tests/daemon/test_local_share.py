"""The local share (`edgemoe_local_share`): of the routed (token, expert) pairs, those the
node computed from experts it holds, counted per layer and step without copying the held set."""

from __future__ import annotations

import numpy as np

from edgemoe.daemon.metrics import DaemonMetrics
from edgemoe.daemon.remote import LocalShareTap
from edgemoe.model.local import LocalExperts
from edgemoe.stats.recorder import ActivationRecorder

from .conftest import TinyModel


def test_local_share_counts_the_routed_pairs_held_here(tiny: TinyModel) -> None:
    local = LocalExperts(tiny.shard_dir, device="cpu", expert_dtype="native")
    local.load(0, 1)
    local.load(0, 3)
    local.load(1, 1)
    m = local.manifest
    recorder = ActivationRecorder(m.num_layers, m.num_experts, m.top_k)
    metrics = DaemonMetrics()
    tap = LocalShareTap(recorder, local, metrics)
    # layer 0: rows route to (1, 2) and (3, 1): 3 of 4 pairs held; a -1 slot is no pair
    tap.record(0, np.array([[1, 2], [3, 1]]))
    # layer 1: expert 3 is held in layer 0 only
    tap.record(1, np.array([[3, -1]]))
    assert (tap.local_pairs, tap.total_pairs) == (3, 5)
    assert tap.share == 0.6
    assert local.count_held(0, [1, 1, 3, 2, 7]) == 3 and local.count_held(1, [3]) == 0
    assert "edgemoe_local_share 0.6" in metrics.render().decode()
