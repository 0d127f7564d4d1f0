"""Twilio's two doors into livecall: the voice webhook and the media stream socket.

Both are signed by Twilio (`X-Twilio-Signature`, checked against `PUBLIC_URL` and, from a
trusted proxy, the forwarded URL), and nothing happens for a request whose signature does not
check out: no TwiML, no Gemini session, a 403 and a log line naming the URLs tried. Without
`TWILIO_AUTH_TOKEN` both doors stay shut unless `LIVECALL_INSECURE_DEV` is on.

The upgrade signature is the same for every call, so it alone proves little: the webhook's
TwiML also hands the call a per-call stream token (`<Parameter name="lc_token">`, see
`livecall.telephony.stream_token`), and a stream whose `start` lacks a valid token for its
CallSid, has a malformed CallSid or another account's AccountSid is closed before any Gemini
session opens. That is also what keeps a live call from being replaced by a stranger's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, Request, Response, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from livecall.agent.gemini import GeminiLink, client_for
from livecall.agent.http_tools import CallContext
from livecall.agent.tools import ToolRunner
from livecall.call.actions import BridgeActions, tool_handler
from livecall.call.bridge import CallBridge, CarrierClosed
from livecall.server.forwarded import TrustedProxies
from livecall.server.limits import authenticated
from livecall.server.registry import ActiveCall
from livecall.server.urls import public_base, signature_urls, ws_base
from livecall.settings import Settings
from livecall.telephony import twilio as tw
from livecall.telephony.stream_token import (
    CALL_SID_RE,
    TOKEN_PARAMETER,
    OutboundClaims,
    StreamTokens,
    derive_key,
)

if TYPE_CHECKING:
    from livecall.server.app import AppState

log = structlog.get_logger("livecall.twilio")

STREAM_PATH = "/ws/twilio"
#: How long a finished call waits for its records to be safe (a hung database takes the
#: store's write timeout, 15 s, to be given up for the spool).
SETTLE_TIMEOUT_S = 20.0
XML = "application/xml"
TWILIO_STREAM_PURPOSE = "twilio-stream"
_SETTINGS_HEADER = tw.SIGNATURE_SETTINGS_HEADER.lower()


def stream_secret_of(settings: Settings) -> bytes | None:
    """Key material for stream tokens: STREAM_TOKEN_SECRET, else the auth token; else None."""
    for secret in (settings.stream_token_secret, settings.twilio_auth_token):
        if secret is not None and secret.get_secret_value():
            return secret.get_secret_value().encode()
    return None


def app_stream_secret(settings: Settings) -> bytes:
    """This app's token secret: the configured one, or (dev, tests) a random one per process."""
    return stream_secret_of(settings) or os.urandom(32)


def twilio_stream_tokens(secret: bytes) -> StreamTokens:
    """The tokens the TwiML hands Twilio's streams (`livecall call` mints them too)."""
    return StreamTokens(derive_key(secret, TWILIO_STREAM_PURPOSE))


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
    trusted = TrustedProxies(settings.trusted_proxies)
    tokens = twilio_stream_tokens(state.stream_secret)
    claims = OutboundClaims()

    @router.post("/twiml", include_in_schema=False)
    async def voice_webhook(request: Request) -> Response:
        params = await signed_form(state, request, "twilio.webhook_rejected")
        if params is None:
            return FORBIDDEN()
        call_sid = params.get("CallSid", "")
        refusal = _caller_problem(settings, call_sid, params.get("AccountSid", ""))
        if call_sid and refusal is not None:
            state.metrics.error("twilio_call_sid")
            log.warning("twilio.webhook_rejected", reason=refusal)
            return FORBIDDEN(refusal)
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
        base = public_base(
            request.url,
            request.headers,
            settings.public_url,
            peer=_peer(request),
            trusted=trusted,
        )
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
        parameters[TOKEN_PARAMETER] = tokens.for_call(
            call_sid, params.get("AccountSid", ""), time.time()
        )
        twiml = tw.connect_stream_twiml(ws_base(base) + STREAM_PATH, parameters)
        log.info("twilio.webhook", call_sid=call_sid, to=params.get("To"))
        return Response(twiml, media_type=XML)

    @router.websocket(STREAM_PATH)
    async def media_stream(ws: WebSocket) -> None:
        if not _signed_upgrade(state, ws, trusted):
            await ws.close(code=1008)  # before accept: the upgrade is answered 403
            return
        if state.registry.draining:
            state.metrics.refused("draining")
            await ws.close(code=1013)
            return
        opened = await open_stream(ws, settings)
        if opened is None:
            return
        carrier, stream, start = opened
        refusal = _stream_problem(state, tokens, claims, start)
        if refusal is not None:
            state.metrics.error("stream_token")
            log.warning(
                "twilio.stream_refused",
                reason=refusal,
                call_sid=start.call_sid if CALL_SID_RE.match(start.call_sid) else None,
            )
            await carrier.close(1008)
            return
        params = {k: v for k, v in start.custom_parameters.items() if k != TOKEN_PARAMETER}
        await _run_call(
            state, carrier, stream, dataclasses.replace(start, custom_parameters=params)
        )

    return router


def FORBIDDEN(reason: str = "invalid Twilio signature") -> Response:
    return Response(reason, status_code=403, media_type="text/plain")


def _peer(conn: Request | WebSocket) -> str | None:
    return conn.client.host if conn.client is not None else None


def _unsigned_allowed(state: AppState, event: str) -> bool:
    """No auth token: only the explicit development switch lets Twilio's doors open."""
    if state.settings.insecure_dev:
        log.warning(
            "twilio.unsigned_accepted",
            door=event,
            reason="LIVECALL_INSECURE_DEV: Twilio signatures are not checked",
        )
        return True
    log.warning(
        event,
        reason="TWILIO_AUTH_TOKEN is not set",
        hint="set TWILIO_AUTH_TOKEN (or LIVECALL_INSECURE_DEV=true on a development machine)",
    )
    return False


def _signature_ok(
    state: AppState,
    conn: Request | WebSocket,
    params: dict[str, str],
    trusted: TrustedProxies,
    rejected_event: str,
) -> bool:
    """Checks `X-Twilio-Signature` against every URL Twilio may have signed; logs a hint if not."""
    signer = state.signature
    assert signer is not None
    urls = signature_urls(
        conn.url, conn.headers, state.settings.public_url, peer=_peer(conn), trusted=trusted
    )
    signature = conn.headers.get("x-twilio-signature")
    rules = conn.headers.get(_SETTINGS_HEADER)
    for url in urls:
        if signer.validate_webhook(url, params, signature, settings_header=rules):
            return True
    state.metrics.error("twilio_signature")
    if not signature:
        reason = "no signature"
    elif rules and not signer.has_shared_key:
        reason = "signed by a Webhook Rule, and TWILIO_WEBHOOK_SHARED_KEY is not set"
    else:
        reason = "bad signature"
    log.warning(
        rejected_event,
        reason=reason,
        urls_tried=urls,
        webhook_rule=bool(rules),
        call_sid=params.get("CallSid", "")[:64] or None,
        hint="the signature must be over the URL Twilio calls: set PUBLIC_URL to it, and "
        "TRUSTED_PROXIES when a proxy forwards it",
    )
    return False


def _signed_upgrade(state: AppState, ws: WebSocket, trusted: TrustedProxies) -> bool:
    if state.signature is None:
        return _unsigned_allowed(state, "twilio.stream_unsigned")
    return _signature_ok(state, ws, {}, trusted, "twilio.stream_rejected")


async def signed_form(
    state: AppState, request: Request, rejected_event: str
) -> dict[str, str] | None:
    """The POSTed form of a Twilio callback, or None when its signature does not check out."""
    body = (await request.body()).decode("utf-8", "replace")
    params = dict(parse_qsl(body, keep_blank_values=True))
    if state.signature is None:
        return params if _unsigned_allowed(state, rejected_event) else None
    trusted = TrustedProxies(state.settings.trusted_proxies)
    if _signature_ok(state, request, params, trusted, rejected_event):
        return params
    return None


def _caller_problem(settings: Settings, call_sid: str, account_sid: str) -> str | None:
    """What is wrong with a CallSid/AccountSid pair Twilio would never send, else None."""
    if not CALL_SID_RE.match(call_sid):
        return "malformed CallSid"
    expected = settings.twilio_account_sid
    if expected and account_sid != expected:
        return "accountSid is not the configured TWILIO_ACCOUNT_SID"
    return None


def _stream_problem(
    state: AppState, tokens: StreamTokens, claims: OutboundClaims, start: tw.Start
) -> str | None:
    """Why this `start` may not become (or replace) a call, else None.

    The token must be valid for this CallSid and account; an outbound token belongs to the
    first CallSid that presents it. A call live here (a Twilio reconnect) accepts its own
    token past the first-start window.
    """
    problem = _caller_problem(state.settings, start.call_sid, start.account_sid)
    if problem is not None:
        return problem
    live = state.registry.active.get(start.call_sid)
    check = tokens.check(
        start.custom_parameters.get(TOKEN_PARAMETER),
        start.call_sid,
        start.account_sid,
        time.time(),
        live=live is not None and live.bridge is not None,
    )
    if not check:
        return check.reason
    if check.ref is not None and not claims.claim(check.ref, start.call_sid):
        return "stream token already used by another call"
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
    profile = options.context.profile()
    actions = BridgeActions(
        bridge,
        state.call_control,
        profile,
        deferred_greeting=options.context.deferred_greeting,
    )
    runner = ToolRunner(
        profile,
        actions,
        knowledge=state.knowledge_for(profile),
        http=state.http_tools.for_call(
            CallContext(
                start.call_sid,
                options.to_number if options.direction == "outbound" else options.from_number,
                profile.name,
            )
        ),
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
    options.context.actions = actions
    entry = ActiveCall(
        start.call_sid,
        start.stream_sid,
        time.monotonic(),
        bridge=bridge,
        task=asyncio.current_task(),
    )
    if not registry.admit(entry):
        reason = "draining" if registry.draining else "full"
        state.metrics.refused(reason)
        log.warning("twilio.stream_refused", call_sid=start.call_sid, reason=reason)
        await carrier.close(1013)
        return
    authenticated(carrier.ws)  # a call now: no longer one of its client's pending sockets
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
    verdict = state.answered_by.pop(start.call_sid, None)
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
            # the call's records on disk or in the database before it is let go (bounded)
            await state.store.settled(start.call_sid, timeout=SETTLE_TIMEOUT_S)
            registry.release(start.call_sid, entry)
            await actions.aclose()
