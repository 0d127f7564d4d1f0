"""Graceful shutdown: a SIGTERM stops new calls, lets live ones finish, then says goodbye.

Platforms send SIGTERM before they kill an instance (Cloud Run ~10 s, Kubernetes
`terminationGracePeriodSeconds`). Dropping every call at that moment is what a phone system
must not do: the webhook starts answering "busy", `/ready` answers 503 (so no new traffic is
routed here; `/health` stays 200 and says "draining"), calls in progress get until the
deadline to end on their own, and whatever is left hears a short goodbye from the agent
before the process exits 0 — every call's end in the log and the records flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import structlog
import uvicorn

from livecall.metrics import LoopLagMonitor
from livecall.server.gc_tuning import freeze_startup_objects
from livecall.server.registry import CallRegistry

log = structlog.get_logger("livecall.drain")

GOODBYE_LINE = (
    "I'm sorry, I have to end our call now for system maintenance. Please call back in a "
    "minute. Goodbye!"
)


async def drain_calls(registry: CallRegistry, deadline_s: float, goodbye_s: float = 8.0) -> None:
    """Stops admitting calls, waits up to `deadline_s` for them to end, then ends the rest."""
    registry.draining = True
    active = len(registry.active)
    log.info("drain.start", active_calls=active, deadline_s=deadline_s)
    if active and not await registry.wait_idle(timeout=max(0.0, deadline_s - goodbye_s)):
        left = [c.bridge for c in registry.active.values() if c.bridge is not None]
        log.info("drain.ending_calls", calls=len(left))
        await asyncio.gather(
            *(b.end_politely("shutdown", GOODBYE_LINE, timeout=goodbye_s) for b in left),
            return_exceptions=True,
        )
        await registry.wait_idle(timeout=5.0)
    log.info("drain.done", remaining=len(registry.active))


class Drain:
    """The process's one drain, whoever asked: `POST /admin/drain` or SIGTERM.

    An operator's drain (`reason="admin"`) can be cancelled: calls are admitted again and
    `/ready` answers 200. A SIGTERM drain cannot: the process is going away.
    """

    def __init__(self, registry: CallRegistry, deadline_s: float) -> None:
        self.registry = registry
        self.deadline_s = deadline_s
        self.task: asyncio.Task[None] | None = None
        self.reason: str | None = None

    @property
    def active(self) -> bool:
        return self.reason is not None

    def start(self, reason: str) -> asyncio.Task[None]:
        """Starts draining (idempotent); a SIGTERM makes a running admin drain final."""
        if self.reason != "signal":
            self.reason = reason
        self.registry.draining = True  # at once: the next webhook is answered "busy"
        if self.task is None:
            self.task = asyncio.create_task(
                drain_calls(self.registry, self.deadline_s), name=f"drain:{reason}"
            )
        return self.task

    async def cancel(self) -> bool:
        """Ends an admin drain: calls are admitted again. False for a SIGTERM drain."""
        if self.reason == "signal":
            return False
        task, self.task, self.reason = self.task, None, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.registry.draining = False
        if task is not None:
            log.info("drain.cancelled", active_calls=len(self.registry.active))
        return True

    async def stop(self) -> None:
        """At shutdown: stops waiting (the calls themselves are ended by the app)."""
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM drains calls before the server stops."""

    def __init__(
        self,
        config: uvicorn.Config,
        registry: CallRegistry,
        deadline_s: float,
        drain: Drain | None = None,
        lag_monitor: LoopLagMonitor | None = None,
    ) -> None:
        super().__init__(config)
        self.registry = registry
        self.deadline_s = deadline_s
        self.drain = drain or Drain(registry, deadline_s)
        self.lag_monitor = lag_monitor
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        if self.lag_monitor is not None:
            self.lag_monitor.start()
        try:
            await super().serve(sockets=sockets)
        finally:
            if self.lag_monitor is not None:
                await self.lag_monitor.stop()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        frozen = freeze_startup_objects()  # startup is done: its objects are here to stay
        log.info("server.gc_frozen", objects=frozen)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig != signal.SIGTERM or self._drain_task is not None or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal, or Ctrl-C: stop now
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.shield(self.drain.start("signal"))
        finally:
            self.should_exit = True
