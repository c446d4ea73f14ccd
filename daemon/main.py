"""Process entry point of `edgemoe daemon`: logging, the event loop, SIGTERM/SIGINT -> leave."""

from __future__ import annotations

import asyncio
import logging
import signal

from edgemoe.daemon.config import DaemonConfig


async def _serve(config: DaemonConfig) -> None:
    from edgemoe.daemon.node import Daemon

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Daemon(config):
        await stop.wait()
        logging.getLogger(__name__).info("signal received: leaving the cluster")


def run_daemon(config: DaemonConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (0 after a graceful leave)."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        logging.getLogger(__name__).error("cannot serve: %s", exc)
        return 1
    return 0
