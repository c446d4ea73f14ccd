"""Seeded synthetic routing streams of any shape: Zipf skew, per-server locality, drift.

Each server has its own preference: a random permutation of experts per layer ranked by a Zipf
law; `locality` mixes the server's own ranking with a global one (1 = fully private taste).
Co-activation comes from "topics": each token draws a topic and picks top-k experts from the
topic's ranking, so sets recur as in real traces. `drift` switches a server to another
server's preferences halfway through its stream.
"""

from __future__ import annotations

import numpy as np

from edgemoe.stats.traces import Stream


def synthetic_streams(num_servers: int, num_layers: int, num_experts: int, top_k: int,
                      tokens: int, seed: int, *, zipf: float = 1.1, locality: float = 0.8,
                      topics: int = 4, tokens_per_request: int = 64,
                      drift: dict[int, int] | None = None) -> list[Stream]:
    """One stream per server; `drift` {server: other} switches tastes at the midpoint."""
    if min(num_servers, num_layers, num_experts, top_k, tokens, topics) < 1:
        raise ValueError("every size must be at least 1")
    if top_k > num_experts:
        raise ValueError("top_k cannot exceed num_experts")
    rng = np.random.default_rng(seed)
    E = num_experts
    base = 1.0 / np.arange(1, E + 1) ** zipf
    glob = np.stack([rng.permutation(E) for _ in range(num_layers)])  # [L, E]

    def taste() -> np.ndarray:  # [topics, L, E] log-weights per expert
        out = np.empty((topics, num_layers, E))
        own = np.stack([rng.permutation(E) for _ in range(num_layers)])
        for t in range(topics):
            for l in range(num_layers):
                w = np.zeros(E)
                w[own[l]] += locality * base
                w[glob[l]] += (1 - locality) * base
                # a topic reshuffles a little within the server's taste
                w *= rng.lognormal(0.0, 0.5, E)
                out[t, l] = np.log(w)
        return out

    tastes = [taste() for _ in range(num_servers)]
    streams = []
    n_req = max(tokens // tokens_per_request, 2)
    off = np.linspace(0, tokens, n_req + 1).astype(np.int64)
    for s in range(num_servers):
        ids = np.empty((tokens, num_layers, top_k), dtype=np.int64)
        topic = rng.integers(0, topics, size=n_req).repeat(np.diff(off))
        for half in (0, 1):
            src = drift.get(s, s) if (drift and half == 1) else s
            lo, hi = (0, tokens // 2) if half == 0 else (tokens // 2, tokens)
            if hi <= lo:
                continue
            logits = tastes[src][topic[lo:hi]]  # [n, L, E]
            g = rng.gumbel(size=logits.shape)
            ids[lo:hi] = np.argpartition(-(logits + g), top_k - 1, axis=-1)[..., :top_k]
        streams.append(Stream(f"synthetic{s}", ids, off.copy()))
    return streams
