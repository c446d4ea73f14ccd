"""What one call into a core produces: messages to send and effects for the shell."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgemoe.cluster.effects import Effect


@dataclass
class Outbox:
    """Collects (destination node id, message) pairs and effects, in the order produced."""

    messages: list[tuple[str, Any]] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)

    def send(self, dest: str, msg: Any) -> None:
        self.messages.append((dest, msg))

    def emit(self, effect: Effect) -> None:
        self.effects.append(effect)
