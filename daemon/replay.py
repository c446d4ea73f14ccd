"""Trace replay in the daemon: the node's requests follow a recorded stream's routing.

Set by the config keys `routing_trace` (npz in the shared/traces format) and
`routing_stream`; statistics, placement and drift then see the replayed routing, since the
recorder reads the ids the experts module actually used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.model.manifest import Manifest
from edgemoe.model.replay import RequestReplay
from edgemoe.model.routing import RoutingTrace
from edgemoe.model.runtime import set_routing
from edgemoe.stats.traces import TraceError, load_stream


def load_replay(path: Path, stream: str, manifest: Manifest) -> RequestReplay:
    """The stream mapped onto this model (ids modulo its experts, its top-k slots)."""
    s = load_stream(path, stream)
    with np.load(path) as z:
        key = f"{stream}_weights"
        weights = z[key] if key in z.files else None
    if s.expert_ids.shape[2] < manifest.top_k:
        raise TraceError(
            f"stream {stream!r} routes {s.expert_ids.shape[2]} experts per token; "
            f"the model needs {manifest.top_k}"
        )
    trace = RoutingTrace(s.expert_ids, manifest.num_experts, manifest.top_k, weights)
    return RequestReplay(trace, s.req_offsets)


def install_replay(engine: Any, replay: RequestReplay | None) -> None:
    """Route the engine's model by `replay` (None: by its own routers again)."""
    set_routing(engine.model, replay)
    engine.replay = replay


def replay_from_config(engine: Any, config: Any, manifest: Manifest) -> None:
    """Install the configured replay (`routing_trace` + `routing_stream`), if any."""
    if getattr(config, "routing_trace", None) is None:
        return
    install_replay(engine, load_replay(config.routing_trace, config.routing_stream, manifest))
