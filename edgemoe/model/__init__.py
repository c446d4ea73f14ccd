"""Checkpoint adapters, shard format, the distributed experts module, activation recording."""
