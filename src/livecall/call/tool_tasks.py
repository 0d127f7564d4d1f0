"""The model's function calls, each run as its own task so audio never waits on a tool.

A tool's answer goes back to whichever session is current when it is done; a failing tool
answers with an error, never takes the call down; the model may cancel calls by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from livecall.agent import live_protocol as lp
from livecall.agent.gemini import GeminiClosed
from livecall.agent.tools import function_response

if TYPE_CHECKING:
    from livecall.call.core import CallCore
    from livecall.call.gemini_sessions import GeminiSessions

__all__ = ["SPOKE_BEFORE_TOOL", "ToolTasks"]

# In a tool handler: had the agent spoken in the turn in which it made the call? (An
# `end_call` before any word needs the model's goodbye, or a recorded one, before hanging up.)
SPOKE_BEFORE_TOOL: ContextVar[bool] = ContextVar("spoke_before_tool", default=True)


class ToolTasks:
    """The call's running tool calls by id, and what runs each (`CallOptions.tool_handler`)."""

    def __init__(self, bridge: CallCore, gemini: GeminiSessions) -> None:
        self.gemini = gemini
        # the call's shared parts, bound once
        self.options = bridge.options
        self.supervisor = bridge.supervisor
        self.turns = bridge.turns
        self.call_sid = bridge.call_sid
        self.log = bridge.log
        self.now_ms = bridge.now_ms
        self._event = bridge.event
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, call: lp.FunctionCall) -> None:
        """Starts one function call as its own task (it may be cancelled by id)."""
        self._event("tool_call", id=call.id, name=call.name, args=call.args)
        spoke = self.turns.agent_turn_open  # agent audio already in this turn
        self.tasks[call.id] = asyncio.create_task(
            self._run_tool(call, spoke), name=f"tool:{call.name}:{self.call_sid}"
        )

    async def _run_tool(self, call: lp.FunctionCall, spoke: bool = True) -> None:
        SPOKE_BEFORE_TOOL.set(spoke)  # this task's own context: seen by its handler only
        started = time.monotonic()
        handler = self.options.tool_handler
        try:
            if handler is None:
                result: dict[str, Any] = {"error": f"unknown tool {call.name!r}"}
            else:
                result = await handler(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a tool must never take the call down
            self.log.exception("tool.failed", tool=call.name)
            result = {"error": f"{call.name} failed: {type(exc).__name__}"}
        finally:
            self.tasks.pop(call.id, None)
        duration_ms = round((time.monotonic() - started) * 1000.0, 1)
        self._event(
            "tool_result", id=call.id, name=call.name, result=result, duration_ms=duration_ms
        )
        with contextlib.suppress(GeminiClosed):
            await self.gemini.link.send_tool_responses(
                [
                    function_response(
                        call.id,
                        call.name,
                        result,
                        non_blocking=self.options.non_blocking_tools,
                        spoke_first=spoke,
                    )
                ]
            )
            self.supervisor.expect_reply_at = self.now_ms()
