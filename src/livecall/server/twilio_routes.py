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
import dataclasses
import os
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, Request, Response, WebSocket

from livecall.carriers.twilio import TwilioCarrierStream
from livecall.server.calls import StarletteCarrier, peer_host, run_call
from livecall.server.forwarded import TrustedProxies
from livecall.server.urls import public_base, signature_urls, ws_base
from livecall.settings import Settings
from livecall.telephony import twilio as tw
from livecall.telephony.stream_token import (
    CALL_SID_RE,
    TOKEN_PARAMETER,
    StreamTokens,
    derive_key,
    outbound_claim_kind,
    outbound_claim_ttl,
)
from livecall.telephony.whisper import (
    TRANSFER_ENDED_PATH,
    WHISPER_PATH,
    Briefing,
    after_dial_twiml,
    whisper_twiml,
)

if TYPE_CHECKING:
    from livecall.server.state import AppState

log = structlog.get_logger("livecall.twilio")

STREAM_PATH = "/ws/twilio"
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


def build_twilio_router(state: AppState) -> APIRouter:
    router = APIRouter()
    settings = state.settings
    trusted = TrustedProxies(settings.trusted_proxies)
    tokens = twilio_stream_tokens(state.stream_secret)

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
            peer=peer_host(request),
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

    @router.post(WHISPER_PATH + "/{token}", include_in_schema=False)
    async def whisper(token: str, request: Request) -> Response:
        """A warm transfer's callee answered: Twilio asks what to play them (signed, once)."""
        params = await signed_form(state, request, "twilio.whisper_rejected")
        if params is None:
            return FORBIDDEN()
        stored = await state.whispers.take(token)
        call_sid = params.get("CallSid", "")[:64] or None
        if stored is None:
            log.warning("twilio.whisper_unknown", call_sid=call_sid)
            return Response("unknown or used whisper", status_code=404, media_type="text/plain")
        briefing = Briefing.loads(stored)
        refusal = briefing.refusal("twilio", params.get("ParentCallSid"))
        if refusal is not None:
            log.warning("twilio.whisper_refused", call_sid=call_sid, reason=refusal)
            return Response(refusal, status_code=403, media_type="text/plain")
        log.info("twilio.whisper", call_sid=call_sid)
        return Response(whisper_twiml(briefing.text, briefing.language), media_type=XML)

    @router.post(TRANSFER_ENDED_PATH, include_in_schema=False)
    async def transfer_ended(request: Request) -> Response:
        """A warm transfer's `<Dial>` ended: hang up, or tell the caller no one took it."""
        params = await signed_form(state, request, "twilio.transfer_ended_rejected")
        if params is None:
            return FORBIDDEN()
        profile = state.match_profile({"profile": request.query_params.get("profile", "")})
        status = params.get("DialCallStatus", "")
        log.info(
            "twilio.transfer_ended",
            call_sid=params.get("CallSid", "")[:64] or None,
            dial_status=status[:32],
        )
        return Response(
            after_dial_twiml(status, profile.transfer.no_answer_message), media_type=XML
        )

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
        refusal = await _stream_problem(state, tokens, start)
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
        await run_twilio_call(
            state, carrier, stream, dataclasses.replace(start, custom_parameters=params)
        )

    return router


def FORBIDDEN(reason: str = "invalid Twilio signature") -> Response:
    return Response(reason, status_code=403, media_type="text/plain")


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
        conn.url, conn.headers, state.settings.public_url, peer=peer_host(conn), trusted=trusted
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


async def _stream_problem(state: AppState, tokens: StreamTokens, start: tw.Start) -> str | None:
    """Why this `start` may not become (or replace) a call, else None.

    The token must be valid for this CallSid and account; an outbound token belongs to the
    first CallSid that presents it, on whichever worker or instance (`AppState.claims`). A
    call live here (a Twilio reconnect) accepts its own
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
    if check.ref is not None and not await state.claims.claim(
        outbound_claim_kind("twilio"),
        check.ref,
        start.call_sid,
        outbound_claim_ttl(tokens, state.settings.max_call_duration_s),
    ):
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


async def run_twilio_call(
    state: AppState, carrier: StarletteCarrier, stream: tw.TwilioStream, start: tw.Start
) -> None:
    """A Twilio stream past its `start`, run as a call (see `calls.run_call`)."""
    adapter = TwilioCarrierStream(stream)
    assert adapter.started is not None  # `stream` has seen its start
    await run_call(
        state, carrier, adapter, adapter.started, carrier_name="twilio", control=state.call_control
    )
