"""Every carrier beside Twilio, through one generic pair of routes per carrier.

For a carrier `c` (enabled only when its credentials are set):

- `POST` its voice webhook (`/telnyx/texml`, `/plivo/answer`): the signature is checked with
  the carrier's own scheme (`Carrier.verify_webhook`), the call is admitted or turned away
  with the carrier's busy answer, its agent profile matched exactly as Twilio's `/twiml` does
  (called number or `?profile=`), and a per-call stream token minted; the answer document
  points the call's media at `/ws/c`.
- `/ws/c`: the media socket. Frames go through `c`'s sans-I/O `CarrierStream` until its
  `CallStarted`; the token in its custom parameters must be valid for that call id, then the
  same call core as Twilio's runs it (`calls.run_call`).

Tokens are keyed per carrier (`derive_key(stream secret, "<carrier>-stream")`), bound to the
call id only (a carrier's stream does not always repeat the webhook's account id).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, Request, Response, WebSocket

from livecall.carriers.base import (
    CallStarted,
    CallStopped,
    Carrier,
    CarrierProtocolError,
    CarrierStream,
)
from livecall.server.calls import StarletteCarrier, run_call
from livecall.server.forwarded import TrustedProxies
from livecall.server.urls import public_base, signature_urls, ws_base
from livecall.telephony.stream_token import TOKEN_PARAMETER, StreamTokens, derive_key

if TYPE_CHECKING:
    from livecall.server.state import AppState
    from livecall.settings import Settings

__all__ = ["CarrierRoute", "build_carrier_router", "carrier_routes", "stream_tokens_for"]

log = structlog.get_logger("livecall.carriers")

MAX_CALL_ID = 128


@dataclass(frozen=True)
class CarrierRoute:
    """One carrier's HTTP side: where its webhook lands, how its form names things."""

    carrier: Carrier
    webhook_path: str
    call_id_field: str  # the webhook form field holding the id the stream's start repeats
    busy: Callable[[str | None, bool], str]  # (message, reject) -> the answer body
    content_type: str = "application/xml"
    control: Any = None  # REST call control (hangup/transfer) when configured
    alnum_parameters: bool = False  # the carrier carries only [A-Za-z0-9] names and values

    @property
    def name(self) -> str:
        return self.carrier.name

    @property
    def stream_path(self) -> str:
        return f"/ws/{self.carrier.name}"


def stream_tokens_for(secret: bytes, carrier: str) -> StreamTokens:
    """A carrier's stream tokens: its own key, so one carrier's token opens no other's stream."""
    return StreamTokens(derive_key(secret, f"{carrier}-stream"))


def pack_alnum(parameters: Mapping[str, str]) -> dict[str, str]:
    """Per-call parameters for a carrier that carries only letters and digits (Plivo's
    `extraHeaders`): names lose their other characters, values travel as hex of UTF-8."""
    return {
        "".join(c for c in name if c.isascii() and c.isalnum()): value.encode().hex()
        for name, value in parameters.items()
    }


def unpack_alnum(parameters: Mapping[str, str]) -> dict[str, str]:
    """`pack_alnum` undone (ValueError for a value that is not its hex)."""
    names = {"".join(c for c in n if c.isalnum()): n for n in (TOKEN_PARAMETER,)}
    return {
        names.get(name, name): bytes.fromhex(value).decode() for name, value in parameters.items()
    }


def carrier_routes(settings: Settings) -> list[CarrierRoute]:
    """The carriers whose credentials are set (secure by default: no key, no route)."""
    routes: list[CarrierRoute] = []
    if settings.telnyx_public_key is not None and settings.telnyx_public_key.get_secret_value():
        from livecall.carriers.telnyx import TelnyxCarrier, busy_texml

        routes.append(
            CarrierRoute(
                TelnyxCarrier(settings.telnyx_public_key.get_secret_value()),
                "/telnyx/texml",
                "CallSid",
                lambda message, reject: busy_texml(message, reject=reject),
            )
        )
    if settings.plivo_auth_token is not None and settings.plivo_auth_token.get_secret_value():
        from livecall.carriers.plivo import PlivoCarrier, busy_xml

        routes.append(
            CarrierRoute(
                PlivoCarrier(settings.plivo_auth_token.get_secret_value()),
                "/plivo/answer",
                "CallUUID",
                lambda message, reject: busy_xml(message, reject=reject),
                alnum_parameters=True,  # extraHeaders: letters and digits only
            )
        )
    return routes


def build_carrier_router(state: AppState, routes: list[CarrierRoute]) -> APIRouter:
    router = APIRouter()
    for route in routes:
        _add_carrier(router, state, route)
    return router


def _add_carrier(router: APIRouter, state: AppState, route: CarrierRoute) -> None:
    settings = state.settings
    trusted = TrustedProxies(settings.trusted_proxies)
    tokens = stream_tokens_for(state.stream_secret, route.name)
    name = route.name

    async def voice_webhook(request: Request) -> Response:
        body = await request.body()
        peer = request.client.host if request.client is not None else None
        urls = signature_urls(
            request.url, request.headers, settings.public_url, peer=peer, trusted=trusted
        )
        if not any(route.carrier.verify_webhook(url, request.headers, body) for url in urls):
            state.metrics.error(f"{name}_signature")
            log.warning(f"{name}.webhook_rejected", reason="bad or missing signature")
            return Response(f"invalid {name} signature", status_code=403, media_type="text/plain")
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        call_id = params.get(route.call_id_field, "")
        if not 0 < len(call_id) <= MAX_CALL_ID or not call_id.isprintable():
            log.warning(f"{name}.webhook_rejected", reason=f"no valid {route.call_id_field}")
            return Response(f"no {route.call_id_field}", status_code=400, media_type="text/plain")
        if not state.registry.reserve(call_id):
            reason = "draining" if state.registry.draining else "full"
            state.metrics.refused(reason)
            log.warning(f"{name}.call_refused", call_sid=call_id, reason=reason)
            return Response(
                route.busy(settings.busy_message, settings.busy_answer == "reject"),
                media_type=route.content_type,
            )
        base = public_base(
            request.url, request.headers, settings.public_url, peer=peer, trusted=trusted
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
        parameters["profile"] = state.match_profile(parameters).name
        parameters[TOKEN_PARAMETER] = tokens.for_call(call_id, "", time.time())
        if route.alnum_parameters:
            parameters = pack_alnum(parameters)
        answer, content_type = route.carrier.answer_document(
            ws_base(base) + route.stream_path, parameters
        )
        log.info(f"{name}.webhook", call_sid=call_id, to=params.get("To"))
        return Response(answer, media_type=content_type)

    async def media_stream(ws: WebSocket) -> None:
        if state.registry.draining:
            state.metrics.refused("draining")
            await ws.close(code=1013)
            return
        await ws.accept()
        socket = StarletteCarrier(ws)
        stream = route.carrier.new_stream(max_frame_bytes=settings.max_message_bytes)
        started = await _await_started(socket, stream, settings.first_message_timeout_s, name)
        if started is None:
            await socket.close(1008)
            return
        if route.alnum_parameters:
            try:
                started = replace(
                    started, custom_parameters=unpack_alnum(started.custom_parameters)
                )
            except ValueError:
                log.warning(f"{name}.stream_refused", reason="malformed parameters")
                await socket.close(1008)
                return
        live = state.registry.active.get(started.call_id)
        check = tokens.check(
            started.custom_parameters.get(TOKEN_PARAMETER),
            started.call_id,
            "",
            time.time(),
            live=live is not None and live.bridge is not None,
        )
        if not check or check.ref is not None:
            state.metrics.error("stream_token")
            log.warning(f"{name}.stream_refused", reason=check.reason or "outbound token")
            await socket.close(1008)
            return
        params = {k: v for k, v in started.custom_parameters.items() if k != TOKEN_PARAMETER}
        await run_call(
            state,
            socket,
            stream,
            replace(started, custom_parameters=params),
            carrier_name=name,
            control=route.control,
        )

    router.add_api_route(
        route.webhook_path, voice_webhook, methods=["POST"], include_in_schema=False
    )
    router.add_api_websocket_route(route.stream_path, media_stream)


async def _await_started(
    socket: StarletteCarrier, stream: CarrierStream, timeout_s: float, name: str
) -> CallStarted | None:
    """Reads frames up to the stream's `CallStarted`; a socket silent or useless is dropped."""
    bad = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                data = await socket.receive()
                if data is None:
                    return None
                try:
                    event = stream.receive(data)
                except CarrierProtocolError as exc:
                    bad += 1
                    if bad <= 20 or bad % 1000 == 0:
                        log.warning(
                            f"{name}.bad_frame", error=str(exc), phase="handshake", count=bad
                        )
                    continue
                if isinstance(event, CallStarted):
                    return event
                if isinstance(event, CallStopped):
                    return None
    except TimeoutError:
        log.warning(f"{name}.no_start", timeout_s=timeout_s)
        return None
