"""While this node loads its model (a restart, a fresh node fetching it), a ready peer
answers its clients' completions: the box answers from the moment its port is up, not from
the moment its model is in memory.

The request goes whole to one peer at a time over the signed, sealed peer API
(`client_api.generate_for_peer` answers it there); a peer that cannot answer now (loading
too, busy, gone) is passed over for the next. The peer that answered last is asked first, the
others in random order, so a restarted node does not queue behind one peer or keep asking one
that is down. The answer is the peer's own (its `node_id` says who computed it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

from edgemoe.daemon.peers import PeerClient, PeerError

log = logging.getLogger(__name__)
PATH = "/v1/peer/generate"
# Seconds all the peers asked for one request may take together: within the client API's
# progress deadline (STALL_S), so a peer that froze mid-answer leaves time for no other.
BUDGET_S = 25.0


class Delegation:
    """Which peer to ask first; one per daemon."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.last_good: str | None = None
        self._rng = rng or random.Random()

    def order(self, peers: Sequence[PeerClient]) -> list[PeerClient]:
        rest = [p for p in peers if p.peer_id != self.last_good]
        self._rng.shuffle(rest)
        first = [p for p in peers if p.peer_id == self.last_good]
        return first + rest

    async def ask(self, peers: Sequence[PeerClient], chat: bool,
                  body: dict[str, Any]) -> dict[str, Any] | None:  # fmt: skip
        """The first answer of a peer, {"status": int, "answer": dict} (an error status is the
        request's own fault, the same anywhere); None when no peer could answer in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUDGET_S
        for peer in self.order(peers):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                reply = await peer.post(PATH, {"chat": chat, "body": body}, timeout_s=left)
            except PeerError as exc:
                log.info("peer %s could not answer for this loading node: %s", peer.peer_id, exc)
                if self.last_good == peer.peer_id:
                    self.last_good = None
                continue
            if (not isinstance(reply, dict) or not isinstance(reply.get("status"), int)
                    or not isinstance(reply.get("answer"), dict)):  # fmt: skip
                log.warning("peer %s answered a delegated request malformed", peer.peer_id)
                continue
            self.last_good = peer.peer_id
            return reply
        return None
