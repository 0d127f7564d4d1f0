"""Twilio's two doors into livecall: the voice webhook and the media stream socket.

Both are signed by Twilio when an auth token is configured, and nothing happens for a request
whose signature does not check out: no TwiML, no Gemini session, a 403 and a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, Request, Response, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from livecall.agent.gemini import GeminiLink, client_for
from livecall.agent.tools import ToolRunner
from livecall.call.actions import BridgeActions, tool_handler
from livecall.call.bridge import CallBridge, CarrierClosed
from livecall.server.registry import ActiveCall
from livecall.server.urls import public_base, public_url_of, ws_base
from livecall.settings import Settings
from livecall.telephony import twilio as tw

if TYPE_CHECKING:
    from livecall.server.app import AppState

log = structlog.get_logger("livecall.twilio")

STREAM_PATH = "/ws/twilio"
XML = "application/xml"


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

    async def send_text(self, data: str) -> None:
        if self.closed:
            raise CarrierClosed
        try:
            await self.ws.send_text(data)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            self.closed = True
            raise CarrierClosed from exc

    async def close(self, code: int = 1000) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)


def build_twilio_router(state: AppState) -> APIRouter:
    router = APIRouter()
    settings = state.settings

    @router.post("/twiml", include_in_schema=False)
    async def voice_webhook(request: Request) -> Response:
        params = await signed_form(state, request, "twilio.webhook_rejected")
        if params is None:
            return FORBIDDEN()
        call_sid = params.get("CallSid", "")
        if not call_sid or not state.registry.reserve(call_sid):
            if not call_sid:
                reason = "no_call_sid"
            else:
                reason = "draining" if state.registry.draining else "full"
            state.metrics.refused(reason)
            log.warning(
                "twilio.call_refused",
                call_sid=call_sid,
                reason=reason,
                active=len(state.registry.active),
            )
            return Response(
                tw.busy_twiml(settings.busy_message, reject=settings.busy_answer == "reject"),
                media_type=XML,
            )
        base = public_base(request.url, request.headers, settings.public_url)
        parameters = {
            k: v
            for k, v in {
                "from": params.get("From", ""),
                "to": params.get("To", ""),
                "direction": params.get("Direction", "inbound"),
                "profile": request.query_params.get("profile", ""),
            }.items()
            if v
        }
        # Chosen now (called number or ?profile=), carried to the stream as a <Parameter>.
        parameters["profile"] = state.match_profile(parameters).name
        twiml = tw.connect_stream_twiml(ws_base(base) + STREAM_PATH, parameters)
        log.info("twilio.webhook", call_sid=call_sid, to=params.get("To"))
        return Response(twiml, media_type=XML)

    @router.websocket(STREAM_PATH)
    async def media_stream(ws: WebSocket) -> None:
        if state.signature is not None:
            url = ws_base(public_base(ws.url, ws.headers, settings.public_url)) + STREAM_PATH
            signature = ws.headers.get("x-twilio-signature")
            if not state.signature.validate_websocket(url, signature):
                state.metrics.error("twilio_signature")
                log.warning(
                    "twilio.stream_rejected",
                    reason="bad signature",
                    has_signature=signature is not None,
                )
                await ws.close(code=1008)  # before accept: the upgrade is answered 403
                return
        if state.registry.draining:
            state.metrics.refused("draining")
            await ws.close(code=1013)
            return
        opened = await open_stream(ws, settings)
        if opened is not None:
            await _run_call(state, *opened)

    return router


def FORBIDDEN() -> Response:
    return Response("invalid Twilio signature", status_code=403, media_type="text/plain")


async def signed_form(
    state: AppState, request: Request, rejected_event: str
) -> dict[str, str] | None:
    """The POSTed form of a Twilio callback, or None when its signature does not check out."""
    body = (await request.body()).decode("utf-8", "replace")
    params = dict(parse_qsl(body, keep_blank_values=True))
    if state.signature is None:
        return params
    url = public_url_of(request.url, request.headers, state.settings.public_url)
    signature = request.headers.get("x-twilio-signature")
    if state.signature.validate_webhook(url, params, signature):
        return params
    state.metrics.error("twilio_signature")
    log.warning(
        rejected_event,
        reason="bad signature",
        call_sid=params.get("CallSid", ""),
        has_signature=signature is not None,
    )
    return None


async def open_stream(
    ws: WebSocket, settings: Settings
) -> tuple[StarletteCarrier, tw.TwilioStream, tw.Start] | None:
    """Accepts a Media Streams socket and reads up to its `start`; None if it never comes."""
    await ws.accept()
    carrier = StarletteCarrier(ws)
    stream = tw.TwilioStream(max_message_bytes=settings.max_message_bytes)
    start = await _await_start(carrier, stream, settings.first_message_timeout_s)
    if start is None:
        await carrier.close(1008)
        return None
    return carrier, stream, start


async def _await_start(
    carrier: StarletteCarrier, stream: tw.TwilioStream, timeout_s: float
) -> tw.Start | None:
    """Reads `connected` and `start`; a socket that says nothing useful in time is dropped."""
    bad = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                data = await carrier.receive()
                if data is None:
                    return None
                try:
                    event = stream.receive(data, binary=isinstance(data, bytes))
                except tw.ProtocolError as exc:
                    bad += 1
                    if bad <= 20 or bad % 1000 == 0:  # a firehose must not flood the log
                        log.warning(
                            "twilio.bad_frame", error=str(exc), phase="handshake", count=bad
                        )
                    continue
                if isinstance(event, tw.Start):
                    return event
                if isinstance(event, tw.Stop):
                    return None
    except TimeoutError:
        log.warning("twilio.no_start", timeout_s=timeout_s)
        return None


async def _run_call(
    state: AppState, carrier: StarletteCarrier, stream: tw.TwilioStream, start: tw.Start
) -> None:
    registry = state.registry
    previous = registry.active.get(start.call_sid)
    if previous is not None and previous.bridge is not None:
        # Twilio opened a second stream for a call we carry: the newer one is the live one.
        log.warning(
            "twilio.duplicate_stream",
            call_sid=start.call_sid,
            old_stream=previous.stream_sid,
            new_stream=start.stream_sid,
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
        observer=state.observer_for(start.call_sid),
    )
    profile = options.extra["agent_profile"]
    actions = BridgeActions(
        bridge,
        state.call_control,
        profile,
        deferred_greeting=options.extra.get("deferred_greeting"),
    )
    runner = ToolRunner(
        profile,
        actions,
        knowledge=state.knowledge_for(profile),
        http=state.http_tools,
        non_blocking=state.non_blocking_tools(),
    )
    options.tool_handler = tool_handler(runner, state.settings.tool_timeout_s)
    control = state.call_control
    if profile.on_failure != "hangup" and control is not None:
        number = profile.transfer_targets[profile.on_failure]

        async def failure_transfer() -> bool:
            line = "Sorry, I am having trouble on my side. Let me connect you to a colleague."
            return await control.transfer(start.call_sid, number, say=line)

        options.failure_transfer = failure_transfer
    options.extra["actions"] = actions
    entry = ActiveCall(
        start.call_sid,
        start.stream_sid,
        time.monotonic(),
        bridge=bridge,
        task=asyncio.current_task(),
    )
    entry.info["actions"] = actions  # for call control requests (AppState.on_control)
    if not registry.admit(entry):
        reason = "draining" if registry.draining else "full"
        state.metrics.refused(reason)
        log.warning("twilio.stream_refused", call_sid=start.call_sid, reason=reason)
        await carrier.close(1013)
        return
    # Other instances learn of the call through Redis. In the background: a slow Redis must
    # not hold the caller's first words (announce waits up to its op timeout before it knows).
    announced = asyncio.create_task(
        state.cluster.announce(
            start.call_sid,
            {
                "from": options.from_number,
                "to": options.to_number,
                "direction": options.direction,
                "profile": options.profile,
                "started_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            },
        ),
        name=f"announce:{start.call_sid}",
    )
    verdict = state.extras.get("answered_by", {}).pop(start.call_sid, None)
    if verdict is not None:  # the answering-machine verdict came before the stream
        actions.on_answered_by(verdict)
    try:
        await bridge.run()
    finally:
        try:
            if not announced.done():
                announced.cancel()  # a call shorter than Redis's answer: never listed
            await asyncio.wait([announced])  # never raises the task's own cancellation
            if registry.active.get(start.call_sid) in (entry, None):  # no newer stream took it
                await state.cluster.withdraw(start.call_sid)
        finally:
            registry.release(start.call_sid, entry)
            await actions.aclose()
