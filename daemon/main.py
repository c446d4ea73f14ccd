"""Process entry point of `edgemoe daemon`: logging, the event loop, SIGTERM/SIGINT -> leave.

Exit codes: 0 after a graceful leave; 5 (`EXIT_CANNOT_START`) when the start cannot work (a
directory not writable or used by another daemon, exposed without tokens, a bootstrap failure
that leaves nothing to serve), with one line naming the cause; 1 when the port cannot be bound.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from edgemoe.daemon.config import DaemonConfig
from edgemoe.daemon.startup import EXIT_CANNOT_START, StartupError


class _MalformedRequests(logging.Filter):
    """aiohttp logs a traceback for every malformed HTTP message it answers with a 400: a
    client's fault, and a way for anyone to flood the log. The 400 is answer enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


async def _serve(config: DaemonConfig) -> int:
    from edgemoe.daemon.node import Daemon

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Daemon(config) as daemon:
        waits = [asyncio.ensure_future(e.wait()) for e in (stop, daemon.failed)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if daemon.failed.is_set():
            return EXIT_CANNOT_START
        logging.getLogger(__name__).info("signal received: leaving the cluster")
    return 0


def run_daemon(config: DaemonConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (0 after a graceful leave)."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())
    try:
        return asyncio.run(_serve(config))
    except StartupError as exc:
        logging.getLogger(__name__).error("cannot start: %s", exc)
        return EXIT_CANNOT_START
    except OSError as exc:
        logging.getLogger(__name__).error("cannot serve: %s", exc)
        return 1
