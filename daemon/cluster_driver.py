"""Temporary: replaced by the driver of edgemoe.cluster's cores."""

from __future__ import annotations

from typing import Any


class ClusterDriver:
    def __init__(self, daemon: Any) -> None:
        self.d = daemon

    def peer_found(self, node_id: str, url: str) -> None:
        pass

    def is_alive(self, node_id: str) -> bool:
        return True

    def suspect(self, node_id: str) -> None:
        pass

    async def start(self) -> None:
        pass

    async def leave(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def on_message(self, sender: str, message: Any) -> Any:
        return {}

    def view(self) -> dict[str, Any]:
        return {}

    async def request_migration(self, *, dry_run: bool, members: Any) -> Any:
        return {}
