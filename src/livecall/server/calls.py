"""One admitted media stream, of any carrier, run as a call: the bridge, its tools and
actions, the registry, the cluster's list of live calls, and the records settled at the end.

The carriers' routes (`twilio_routes`, `carrier_routes`) and the dashboard's softphone check
who is calling and hand the stream here; `StarletteCarrier` is the socket they hand over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from datetime import UTC, datetime

import structlog
from fastapi import Request, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from livecall.agent.gemini import GeminiLink, client_for
from livecall.agent.http_tools import CallContext
from livecall.agent.tools import ToolRunner
from livecall.call.actions import BridgeActions, tool_handler
from livecall.call.bridge import CallBridge, CarrierClosed
from livecall.carriers.base import CallStarted, CarrierStream
from livecall.server.forwarded import TrustedProxies
from livecall.server.limits import authenticated
from livecall.server.registry import ActiveCall
from livecall.server.state import AppState
from livecall.server.urls import public_base
from livecall.telephony.call_control import CallControl
from livecall.telephony.whisper import WarmTransfer

__all__ = ["SETTLE_TIMEOUT_S", "StarletteCarrier", "peer_host", "run_call"]

log = structlog.get_logger("livecall.twilio")

#: How long a finished call waits for its records to be safe (a hung database takes the
#: store's write timeout, 15 s, to be given up for the spool).
SETTLE_TIMEOUT_S = 20.0


def peer_host(conn: Request | WebSocket) -> str | None:
    """The TCP peer's address (before any forwarding header is believed)."""
    return conn.client.host if conn.client is not None else None


class StarletteCarrier:
    """Adapts a Starlette WebSocket to the bridge's `CarrierSocket`."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.closed = False

    async def receive(self) -> str | bytes | None:
        if self.closed:
            return None
        try:
            message = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closed = True
            return None
        if message["type"] == "websocket.disconnect":
            self.closed = True
            return None
        text = message.get("text")
        if text is not None:
            return text
        return message.get("bytes") or b""

    async def send(self, frame: str | bytes) -> None:
        if self.closed:
            raise CarrierClosed
        try:
            if isinstance(frame, str):
                await self.ws.send_text(frame)
            else:
                await self.ws.send_bytes(frame)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            self.closed = True
            raise CarrierClosed from exc

    async def send_text(self, data: str) -> None:
        await self.send(data)

    async def close(self, code: int = 1000) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)


async def run_call(
    state: AppState,
    carrier: StarletteCarrier,
    stream: CarrierStream,
    start: CallStarted,
    *,
    carrier_name: str = "twilio",
    control: CallControl | None = None,
) -> None:
    """Runs one admitted stream of any carrier as a call: the same core, records and controls.

    `start` is the stream's `CallStarted` (its token already checked by the carrier's route);
    `control` the carrier's REST call control for hang-up and transfer (`CallControl`), None
    where it has none configured: the call then ends by closing the stream and transfers are
    refused. Warm transfers need a control that has them (`warm_transfer`).
    """
    call_id = start.call_id
    stream_id = start.stream_id or start.call_id
    registry = state.registry
    previous = registry.active.get(call_id)
    if previous is not None and previous.bridge is not None:
        # Twilio opened a second stream for a call we carry: the newer one is the live one.
        log.warning(
            f"{carrier_name}.duplicate_stream",
            call_sid=call_id,
            old_stream=previous.stream_sid,
            new_stream=stream_id,
        )
        previous.bridge.replace()
        if previous.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(previous.task), 5.0)
    params = start.custom_parameters
    options, live = await state.call_setup(params)
    client = client_for(state.settings)

    def link_factory(handle: str | None) -> GeminiLink:
        return GeminiLink(
            client,
            dataclasses.replace(live, resumption_handle=handle),
            state.registry.gemini_sessions,
        )

    bridge = CallBridge(
        carrier,
        stream,
        start,
        link_factory,
        options=options,
        observer=state.observer_for(call_id),
    )
    profile = options.context.profile()
    actions = BridgeActions(
        bridge,
        control,
        profile,
        deferred_greeting=options.context.deferred_greeting,
    )
    runner = ToolRunner(
        profile,
        actions,
        knowledge=state.knowledge_for(profile),
        http=state.http_tools.for_call(
            CallContext(
                call_id,
                options.to_number if options.direction == "outbound" else options.from_number,
                profile.name,
            )
        ),
        non_blocking=state.non_blocking_tools(),
    )
    options.tool_handler = tool_handler(runner, state.settings.tool_timeout_s)
    options.settle_actions = actions.rest_settled
    can_transfer = control is not None and not control.transfer_refusal
    if profile.on_failure != "hangup" and control is not None and can_transfer:
        number = profile.transfer_targets[profile.on_failure]

        async def failure_transfer() -> bool:
            line = "Sorry, I am having trouble on my side. Let me connect you to a colleague."
            return await control.transfer(call_id, number, say=line)

        options.failure_transfer = failure_transfer
    if profile.transfer.mode == "warm" and control is not None and control.warm_transfer:
        trusted = TrustedProxies(state.settings.trusted_proxies)
        ws = carrier.ws
        caller = options.to_number if options.direction == "outbound" else options.from_number
        actions.warm = WarmTransfer(
            state.whispers,
            public_base(
                ws.url, ws.headers, state.settings.public_url, peer=peer_host(ws), trusted=trusted
            ),
            profile.name,
            caller,
            profile.transfer.hold_message,
            carrier=carrier_name,
            call_id=call_id,
            language=profile.language or None,
        )
    entry = ActiveCall(
        call_id,
        stream_id,
        time.monotonic(),
        bridge=bridge,
        task=asyncio.current_task(),
        actions=actions,
    )
    if not registry.admit(entry):
        reason = "draining" if registry.draining else "full"
        state.metrics.refused(reason)
        log.warning(f"{carrier_name}.stream_refused", call_sid=call_id, reason=reason)
        await carrier.close(1013)
        return
    authenticated(carrier.ws)  # a call now: no longer one of its client's pending sockets
    # Other instances learn of the call through Redis. In the background: a slow Redis must
    # not hold the caller's first words (announce waits up to its op timeout before it knows).
    announced = asyncio.create_task(
        state.cluster.announce(
            call_id,
            {
                "from": options.from_number,
                "to": options.to_number,
                "direction": options.direction,
                "profile": options.profile,
                "started_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            },
        ),
        name=f"announce:{call_id}",
    )
    verdict = state.answered_by.pop(call_id, None)
    if verdict is not None:  # the answering-machine verdict came before the stream
        actions.on_answered_by(verdict)
    try:
        await bridge.run()
    finally:
        try:
            if not announced.done():
                announced.cancel()  # a call shorter than Redis's answer: never listed
            await asyncio.wait([announced])  # never raises the task's own cancellation
            if registry.active.get(call_id) in (entry, None):  # no newer stream took it
                await state.cluster.withdraw(call_id)
        finally:
            # the call's records on disk or in the database before it is let go (bounded)
            await state.store.settled(call_id, timeout=SETTLE_TIMEOUT_S)
            registry.release(call_id, entry)
            await actions.aclose()
