"""Event-driven latency simulator of a serving cluster."""
