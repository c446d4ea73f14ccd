"""Prometheus metrics of one daemon, in its own registry (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class DaemonMetrics:
    """Every series the daemon exports; one instance per daemon."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "edgemoe_http_requests", "HTTP requests served", ["endpoint", "status"], registry=r
        )
        self.generated_tokens = Counter(
            "edgemoe_generated_tokens", "Tokens generated for this node's clients", registry=r
        )
        self.tokens_per_second = Gauge(
            "edgemoe_tokens_per_second", "Decode speed of the last finished request", registry=r
        )
        self.generation_seconds = Histogram(
            "edgemoe_generation_seconds", "Wall time of one generation request", registry=r
        )
        self.cancelled = Counter(
            "edgemoe_generations_cancelled",
            "Generations stopped because the client went away",
            registry=r,
        )
        self.delegated = Counter(
            "edgemoe_delegated_completions",
            "Completions a ready peer answered for this node's clients while it loaded",
            registry=r,
        )
        self.generated_for_peers = Counter(
            "edgemoe_completions_for_peers",
            "Completions computed here for a loading peer's clients",
            registry=r,
        )
        self.busy = Counter(
            "edgemoe_generations_refused_busy",
            "Generation requests answered 429: the node's admission limit was reached",
            registry=r,
        )
        self.remote_calls = Counter(
            "edgemoe_remote_expert_calls", "Expert RPCs sent, per peer", ["peer"], registry=r
        )
        self.remote_failures = Counter(
            "edgemoe_remote_expert_failures",
            "Expert RPCs that failed, per peer",
            ["peer"],
            registry=r,
        )
        self.remote_bytes = Counter(
            "edgemoe_remote_bytes",
            "Bytes of expert RPC bodies, per peer and direction",
            ["peer", "direction"],
            registry=r,
        )
        # what the model's thread waits for a peer's experts: from asking (the hop onto the
        # event loop included) to the answer, failovers included; the testbed sets it beside
        # the simulator's calls
        self.expert_call_seconds = Histogram(
            "edgemoe_expert_call_seconds",
            "Round trip of a remote expert call, from the model's thread asking to the answer",
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.rpc_served = Counter(
            "edgemoe_expert_rpc_served", "Expert RPC requests served for peers", registry=r
        )
        self.rpc_batch_rows = Histogram(
            "edgemoe_expert_rpc_batch_rows",
            "Rows per batched expert computation",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
        )
        self.local_share = Gauge(
            "edgemoe_local_share",
            "Share of routed (token, expert) pairs computed locally",
            registry=r,
        )
        self.gossip_messages = Counter(
            "edgemoe_gossip_messages", "Cluster protocol messages", ["direction"], registry=r
        )
        self.epoch = Gauge("edgemoe_placement_epoch", "Last decided placement epoch", registry=r)
        self.epochs_decided = Counter(
            "edgemoe_placement_epochs_decided", "Placement epochs learned", registry=r
        )
        self.epochs_by_reason = Counter(
            "edgemoe_placement_epochs_by_reason",
            "Placement epochs learned, per reason (genesis, membership, drift, operator, leave)",
            ["reason"],
            registry=r,
        )
        self.drift = Gauge(
            "edgemoe_statistics_drift",
            "Drift of the members' activation statistics from those the current placement "
            "was computed on (0: same proportions, 1: all moved); compare drift_threshold",
            registry=r,
        )
        self.members_alive = Gauge("edgemoe_members_alive", "Members seen alive", registry=r)
        self.migration_bytes = Counter(
            "edgemoe_migration_bytes", "Shard bytes fetched from peers", registry=r
        )
        self.standby_bytes = Counter(
            "edgemoe_standby_bytes",
            "Shard bytes fetched as standby copies (on disk only; also in migration_bytes)",
            registry=r,
        )
        self.shards_served_bytes = Counter(
            "edgemoe_shard_bytes_served",
            "Bytes of model files streamed to peers, per kind (dense, expert, other)",
            ["kind"],
            registry=r,
        )
        self.damaged_shards = Counter(
            "edgemoe_damaged_shards",
            "Verified shards found changed on disk and no longer matching (fetched again)",
            registry=r,
        )
        self.corrupt_shards = Counter(
            "edgemoe_corrupt_shards", "Fetched shards refused for size or sha256", registry=r
        )
        self.peer_refused = Counter(
            "edgemoe_peer_requests_refused",
            "Peer requests refused before their body was read (signature: the sender does not "
            "hold our cluster secret; envelope: malformed, stale, replayed or misaddressed)",
            ["reason"],
            registry=r,
        )
        self.peer_messages_refused = Counter(
            "edgemoe_peer_messages_refused",
            "Signed cluster messages refused (type, field, value, unknown, sender, rejected)",
            ["reason"],
            registry=r,
        )
        self.connections_dropped = Counter(
            "edgemoe_connections_dropped",
            "Connections closed before a complete request head: slow_head (none within "
            "HEAD_TIMEOUT_S) or unproven_cap (the oldest of too many such connections)",
            ["reason"],
            registry=r,
        )
        self.task_failures = Counter(
            "edgemoe_task_failures",
            "Failures of supervised long-lived tasks (restarted with backoff), per task",
            ["task"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
