"""What a generation is asked and what it answers, free of torch: the HTTP front of a daemon
loads these before the model's libraries (which it imports after its port is up)."""

from __future__ import annotations

from dataclasses import dataclass

# Seconds a refused client is asked to wait (Retry-After) before trying again.
RETRY_AFTER_S = 2


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # End-of-sequence is ignored until this many tokens (vLLM's min_tokens); replayed
    # requests set it to max_tokens so they run their recorded length.
    min_tokens: int = 0


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str
    seconds: float


class Busy(Exception):
    """The node already admitted as many generations as it may (`engine.MAX_ADMITTED`)."""

    def __init__(self, admitted: int) -> None:
        super().__init__(
            f"this node is busy ({admitted} generations running or waiting); "
            f"retry in {RETRY_AFTER_S} s"
        )
        self.retry_after = RETRY_AFTER_S
