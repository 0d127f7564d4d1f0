"""The browser softphone: its page, its stream token, and the socket where the browser
speaks Twilio Media Streams. The socket checks the cookie and the origin before accepting, and
its `start` must carry a one-minute stream token that `POST /softphone/token` minted for this
session and a server-chosen CallSid (never the API token in the page); then it runs exactly
the Twilio bridge path."""

from __future__ import annotations

import dataclasses
import re
import secrets
import time

from fastapi import Request, Response, WebSocket

from livecall.server.dashboard.auth import client_label, same_origin
from livecall.server.dashboard.core import Ctx, json_bytes, log, profile_names
from livecall.server.twilio_routes import open_stream, run_twilio_call
from livecall.telephony.stream_token import TOKEN_PARAMETER, StreamTokens, derive_key

_SOFTPHONE_CALL_SID = re.compile(r"^CA[0-9a-f]{32}$")
_SOFTPHONE_STREAM_SID = re.compile(r"^MZ[0-9a-f]{32}$")
SOFTPHONE_PURPOSE = "softphone"  # its own key: a softphone token never opens /ws/twilio
SOFTPHONE_TOKEN_TTL_S = 60.0


def softphone_tokens(stream_secret: bytes) -> StreamTokens:
    return StreamTokens(derive_key(stream_secret, SOFTPHONE_PURPOSE), ttl_s=SOFTPHONE_TOKEN_TTL_S)


async def softphone_page(dash: Ctx, request: Request) -> Response:
    session = dash.current(request)
    if session is None:
        return dash.login_redirect(request)
    return dash.render(
        request,
        "softphone.html",
        session,
        nav="softphone",
        profiles=profile_names(dash.state, dash.settings),
    )


async def softphone_token(dash: Ctx, request: Request) -> Response:
    """A CallSid and a one-minute stream token for it, bound to this session (CSRF-checked)."""
    session = dash.require(request)
    dash.check_post(request, session, {})
    call_sid = "CA" + secrets.token_hex(16)
    token = dash.softphone_tokens.for_call(call_sid, session.id, time.time())
    return Response(
        json_bytes({"callSid": call_sid, "token": token}),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def softphone_socket(dash: Ctx, ws: WebSocket) -> None:
    """The browser speaks Twilio Media Streams here; the call runs the Twilio bridge.

    Its `start` must carry the token `/softphone/token` gave this session for its CallSid.
    """
    session = dash.current(ws)
    if session is None or not same_origin(
        ws.url, ws.headers, dash.settings.public_url, required=True
    ):
        log.warning("dashboard.softphone_refused", client=client_label(ws.client))
        await ws.close(code=1008)  # before accept: the upgrade is answered 403
        return
    if dash.state.registry.draining:
        await ws.close(code=1013)
        return
    opened = await open_stream(ws, dash.settings)
    if opened is None:
        return
    carrier, stream, start = opened
    if not (
        _SOFTPHONE_CALL_SID.match(start.call_sid) and _SOFTPHONE_STREAM_SID.match(start.stream_sid)
    ):
        log.warning("dashboard.softphone_bad_start", call_sid=start.call_sid[:64])
        await carrier.close(1008)
        return
    check = dash.softphone_tokens.check(
        start.custom_parameters.get(TOKEN_PARAMETER), start.call_sid, session.id, time.time()
    )
    if not check:
        log.warning("dashboard.softphone_bad_token", reason=check.reason)
        await carrier.close(1008)
        return
    if start.call_sid in dash.state.registry.active:  # never take over somebody's call
        log.warning("dashboard.softphone_sid_taken", call_sid=start.call_sid)
        await carrier.close(1008)
        return
    profile = start.custom_parameters.get("profile", "").strip()[:128]
    params = {"from": "softphone", "direction": "inbound"}
    if profile:
        params["profile"] = profile
    start = dataclasses.replace(start, custom_parameters=params)
    log.info("dashboard.softphone_call", call_sid=start.call_sid, profile=profile or None)
    await run_twilio_call(dash.state, carrier, stream, start)
