"""The one error type of the model runtime: a user-facing message that names the file at fault."""

from __future__ import annotations


class ModelError(ValueError):
    """Bad checkpoint, shard directory or architecture; the message names the file concerned."""
