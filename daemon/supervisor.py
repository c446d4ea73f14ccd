"""Named long-lived tasks that cannot die silently.

A supervised task that raises is logged once with its traceback (later failures of the same
task only by a line), counted in ``edgemoe_task_failures_total{task}``, shown under
``/healthz`` ``tasks.failed``, and, when it is a loop, restarted after a doubling pause. A
one-shot task is not restarted, but its failure is still logged, counted and shown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
RESTART_FIRST_S = 0.5  # pause before the first restart of a failed loop; doubles each failure
RESTART_MAX_S = 30.0

Factory = Callable[[], Coroutine[Any, Any, Any]]


@dataclass
class TaskState:
    failures: int = 0
    last_error: str = ""
    last_failed: float = 0.0
    running: bool = True


class Supervisor:
    """Runs named tasks; `on_failure(name)` is called for each failure (the metric)."""

    def __init__(self, on_failure: Callable[[str], None] | None = None) -> None:
        self.on_failure = on_failure or (lambda name: None)
        self.states: dict[str, TaskState] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, name: str, factory: Factory, *, restart: bool = False) -> asyncio.Task[Any]:
        """Run `factory()` as `name`; with `restart`, run it again after each failure."""
        task = asyncio.ensure_future(self._run(name, factory, restart))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, name: str, factory: Factory, restart: bool) -> Any:
        state = self.states.setdefault(name, TaskState())
        state.running = True
        pause = RESTART_FIRST_S
        while True:
            try:
                result = await factory()
                state.running = False
                return result
            except asyncio.CancelledError:
                state.running = False
                raise
            except Exception as exc:
                state.failures += 1
                state.last_error = f"{type(exc).__name__}: {exc}"[:300]
                state.last_failed = time.time()
                self.on_failure(name)
                if state.failures == 1:
                    log.error("task %s failed%s", name, "; restarting" if restart else "",
                              exc_info=exc)  # fmt: skip
                else:
                    log.error("task %s failed again (%d times): %s", name, state.failures,
                              state.last_error)  # fmt: skip
                if not restart:
                    state.running = False
                    return None
            await asyncio.sleep(pause)
            pause = min(pause * 2, RESTART_MAX_S)

    def failed(self) -> dict[str, dict[str, Any]]:
        """Tasks that failed at least once (what `/healthz` shows)."""
        return {
            name: {"failures": s.failures, "last_error": s.last_error,
                   "last_failed": round(s.last_failed, 3), "running": s.running}
            for name, s in sorted(self.states.items()) if s.failures
        }  # fmt: skip

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
