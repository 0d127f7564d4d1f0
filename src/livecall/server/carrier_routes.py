"""Every carrier beside Twilio, through one generic pair of routes per carrier.

For a carrier `c` (enabled only when its credentials are set):

- its voice webhook (`POST /telnyx/texml`, `POST /plivo/answer`, `GET|POST /vonage/answer`,
  `GET /exotel/voicebot`; a form by default, or whatever the route's `read_webhook` reads): the
  request is authenticated with the carrier's own scheme (`Carrier.verify_webhook`), the call
  is admitted or turned away
  with the carrier's busy answer, its agent profile matched exactly as Twilio's `/twiml` does
  (called number or `?profile=`), and a per-call stream token minted; the answer document
  points the call's media at `/ws/c`.
- `/ws/c`: the media socket. Frames go through `c`'s sans-I/O `CarrierStream` until its
  `CallStarted`; the token in its custom parameters (or, for a carrier whose answer is a
  stream URL, in that URL's query string) must be valid for that call id, then the same call
  core as Twilio's runs it (`calls.run_call`). A route with its own upgrade credential
  (`verify_upgrade`: Vonage's signed handshake) checks it before accepting the socket (403
  otherwise), and one issued before the call's token was minted closes the stream at its
  start (another call's).
- its status webhook when it has one (`GET|POST /vonage/event`): signature-checked like the
  voice webhook, the status logged and, for a call answered here, kept as one of its events
  (`server/carrier_status.py`), 200 (403 when forged).

Tokens are keyed per carrier (`derive_key(stream secret, "<carrier>-stream")`), bound to the
call id only (a carrier's stream does not always repeat the webhook's account id).

Outbound calls (`livecall.server.outbound_carriers`): the carrier fetches the voice webhook
with `?outbound=<outbound token>` (`StreamTokens.for_outbound`: a single-claim reference, the
carrier's id for the call being unknown when the dial is written). The webhook claims the
reference for the call id it names (another call presenting it: 403), marks the call
outbound, and answers with a stream token bound to that call id, as for an inbound call: so
only the call we placed gets a stream, the check at the stream stays stateless (any worker or
instance can make it), and a stream presenting the outbound token itself is refused. Exotel
(Connect Voice AI) has no webhook for an outbound call: it streams straight to the URL it was
given, so `/ws/exotel` (`outbound_streams`) claims the outbound token that URL carries for the
call its `start` names, in the same single-claim table.

REST call control (`telephony/call_control.py:CallControl`: the agent's hang-up and transfer) is a
route's `control`: a factory given the call's `ControlSite` (the app, the call's start, the
public base URL). What a carrier's webhook said that its control needs later (Vonage's
`region_url`) stays with the carrier's route, keyed by call id for a bounded time (see
`carriers/vonage/calls.py`), and, through the route's `memory`, in the claims store every
worker and instance shares, recalled before the call runs wherever its stream lands; its
factory looks it up by `ControlSite.start.call_id`. A signed webhook's single-use id (the
route's `single_use`: a `jti`, a nonce) and every outbound token reference are claimed in that
store too (`AppState.claims`), so a replay to another worker is refused like one to this.
A carrier that fetches a transfer's document from livecall (Plivo's
`aleg_url`) sets `documents`: `ControlSite.publish` keeps the document behind a single-use
token, served once at `POST /<carrier>/transfer/<token>` to a request signed by the carrier.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, Request, Response, WebSocket

from livecall.call_ids import MAX_CALL_ID, is_call_id
from livecall.carriers.base import (
    CallStarted,
    CallStopped,
    CarrierProtocolError,
    CarrierStream,
)
from livecall.privacy import mask_number
from livecall.server.calls import StarletteCarrier, run_call
from livecall.server.carrier_route import (
    BUSY_PARAMETER,
    CALL_MEMORY_S,
    STREAM_PARAMETERS,
    TRANSFER_DOCUMENT_TTL_S,
    UPGRADE_CLOCK_SKEW_S,
    CarrierRoute,
    ControlSite,
    WebhookCall,
    e164,
    pack_alnum,
    read_form,
    stream_tokens_for,
    unpack_alnum,
)
from livecall.server.carrier_status import CarrierStatuses
from livecall.server.forwarded import TrustedProxies
from livecall.server.outbound_carriers import OUTBOUND_PARAMETER
from livecall.server.urls import public_base, signature_urls, ws_base
from livecall.telephony.stream_token import (
    TOKEN_PARAMETER,
    outbound_claim_kind,
    outbound_claim_ttl,
)
from livecall.telephony.whisper import (
    Briefing,
    Whispers,
    transfer_ended_path,
    whisper_path,
)

if TYPE_CHECKING:
    from livecall.server.state import AppState
    from livecall.telephony.call_control import CallControl

__all__ = [
    "build_carrier_router",
]

log = structlog.get_logger("livecall.carriers")


def build_carrier_router(state: AppState, routes: list[CarrierRoute]) -> APIRouter:
    router = APIRouter()
    for route in routes:
        _add_carrier(router, state, route)
    state.closers.extend(route.aclose for route in routes if route.aclose is not None)
    return router


def _add_carrier(router: APIRouter, state: AppState, route: CarrierRoute) -> None:
    settings = state.settings
    trusted = TrustedProxies(settings.trusted_proxies)
    tokens = stream_tokens_for(state.stream_secret, route.name)
    name = route.name
    documents_path = f"/{name}/transfer"
    documents = Whispers(state.stash, ttl_s=TRANSFER_DOCUMENT_TTL_S, prefix=f"{name}-transfer")

    read_webhook = route.read_webhook or read_form(route.call_id_field)
    statuses = CarrierStatuses(state, name, ttl_s=settings.max_call_duration_s + CALL_MEMORY_S)
    claim_kind = outbound_claim_kind(name)  # outbound token reference -> the call id
    claim_ttl_s = outbound_claim_ttl(tokens, settings.max_call_duration_s)
    replay_kind = f"{name}-replay"

    def signed(request: Request, body: bytes) -> bool:
        peer = request.client.host if request.client is not None else None
        urls = signature_urls(
            request.url, request.headers, settings.public_url, peer=peer, trusted=trusted
        )
        return any(route.carrier.verify_webhook(url, request.headers, body) for url in urls)

    async def verified(request: Request, body: bytes) -> bool:
        if not signed(request, body):
            state.metrics.error(f"{name}_signature")
            log.warning(f"{name}.webhook_rejected", reason="bad or missing signature")
            return False
        if not await first_use(request):
            state.metrics.error(f"{name}_signature")
            log.warning(f"{name}.webhook_rejected", reason="replayed request")
            return False
        return True

    async def first_use(request: Request) -> bool:
        """A signed request's single-use id (a `jti`, a nonce) seen by no worker before."""
        if route.single_use is None:
            return True
        once = route.single_use(request.headers)
        if once is None:
            return True
        key, ttl_s = once
        return await state.claims.first_use(replay_kind, key, ttl_s)

    async def voice_webhook(request: Request) -> Response:
        body = await request.body()
        if not await verified(request, body):
            return Response(f"invalid {name} signature", status_code=403, media_type="text/plain")
        if request.method == "HEAD":  # a probe before the real request: nothing to admit
            return Response(status_code=200)
        peer = request.client.host if request.client is not None else None
        try:
            call = read_webhook(request.method, str(request.url), body)
        except ValueError:
            call = WebhookCall(call_id="")
        call_id = call.call_id
        if not is_call_id(call_id):
            log.warning(f"{name}.webhook_rejected", reason=f"no valid {route.call_id_field}")
            return Response(f"no {route.call_id_field}", status_code=400, media_type="text/plain")
        outbound = request.query_params.get(OUTBOUND_PARAMETER)
        if outbound is not None:
            problem = await claim_outbound(outbound, call_id)
            if problem is not None:
                state.metrics.error("stream_token")
                log.warning(f"{name}.webhook_rejected", call_sid=call_id, reason=problem)
                return Response(problem, status_code=403, media_type="text/plain")
            call = replace(
                call,
                direction="outbound-api",
                from_number=e164(call.from_number),
                to_number=e164(call.to_number),
            )
        base = public_base(
            request.url, request.headers, settings.public_url, peer=peer, trusted=trusted
        )
        stream_url = ws_base(base) + route.stream_path
        if not state.registry.reserve(call_id):
            reason = "draining" if state.registry.draining else "full"
            state.metrics.refused(reason)
            log.warning(f"{name}.call_refused", call_sid=call_id, reason=reason)
            if route.busy is None:
                answer, content_type = route.carrier.answer_document(
                    stream_url, {BUSY_PARAMETER: "1"}
                )
                return Response(answer, media_type=content_type)
            return Response(
                route.busy(settings.busy_message, settings.busy_answer == "reject"),
                media_type=route.content_type,
            )
        parameters = {
            k: v
            for k, v in {
                "from": call.from_number,
                "to": call.to_number,
                "direction": call.direction,
                "profile": request.query_params.get("profile", ""),
            }.items()
            if v
        }
        parameters["profile"] = state.match_profile(parameters).name
        if route.status_path is not None:
            statuses.answered(call_id)
        parameters[TOKEN_PARAMETER] = tokens.for_call(call_id, "", time.time())
        if route.alnum_parameters:
            parameters = pack_alnum(parameters)
        if route.answer is not None:
            answer, content_type = route.answer(base, parameters, call)
        else:
            answer, content_type = route.carrier.answer_document(stream_url, parameters)
        if route.memory is not None:
            await route.memory.share(state.claims, call_id)
        # our number on an inbound call; on an outbound one the callee's: masked
        to = mask_number(call.to_number) if outbound is not None else call.to_number
        log.info(f"{name}.webhook", call_sid=call_id, to=to or None, outbound=outbound is not None)
        return Response(answer, media_type=content_type)

    async def claim_outbound(token: str, call_id: str) -> str | None:
        """Why an outbound call's webhook may not go on, else None (the reference claimed)."""
        check = tokens.check(token, call_id, "", time.time())
        if not check or check.ref is None:
            return check.reason or "not an outbound token"
        return await claim_ref(check.ref, call_id)

    async def claim_ref(ref: str, call_id: str) -> str | None:
        """Claim an outbound token's reference for `call_id` (on every worker and instance:
        `AppState.claims`); why not, else None."""
        if not await state.claims.claim(claim_kind, ref, call_id, claim_ttl_s):
            return "outbound token already used by another call"
        limits = state.outbound_limits
        if limits is not None:  # it counts under the call's id now (Plivo's differs)
            limits.answered(ref, call_id)
        return None

    async def status_webhook(request: Request) -> Response:
        body = await request.body()
        if not await verified(request, body):
            return Response(f"invalid {name} signature", status_code=403, media_type="text/plain")
        assert route.read_status is not None
        try:
            call_id, status = route.read_status(request.method, str(request.url), body)
        except ValueError as exc:
            log.warning(f"{name}.status_unreadable", error=str(exc))
            return Response(status_code=200)  # genuine but not understood: no retries
        kept = statuses.record(call_id, status) if status else False
        log.info(f"{name}.status", call_sid=call_id[:MAX_CALL_ID], status=status[:32], kept=kept)
        return Response(status_code=200)

    def upgrade_issued(ws: WebSocket) -> float | None:
        """The upgrade's own credential (when the route has one): when it was issued, or
        None after logging why it is refused. Nothing here quotes the header."""
        assert route.verify_upgrade is not None
        try:
            return route.verify_upgrade(ws.headers)
        except ValueError as exc:
            state.metrics.error(f"{name}_signature")
            log.warning(f"{name}.stream_refused", reason=f"handshake: {exc}", phase="upgrade")
            return None

    async def media_stream(ws: WebSocket) -> None:
        issued: float | None = None
        if route.verify_upgrade is not None:
            issued = upgrade_issued(ws)
            if issued is None:
                await ws.close(code=1008)  # before accept: the upgrade is answered 403
                return
        query = ws.query_params if route.parameters_in_url else None
        busy = query is not None and BUSY_PARAMETER in query  # turned away at the webhook
        if state.registry.draining and not busy:
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
        params = dict(started.custom_parameters)
        if route.alnum_parameters:
            try:
                params = unpack_alnum(params)
            except ValueError:
                log.warning(f"{name}.stream_refused", reason="malformed parameters")
                await socket.close(1008)
                return
        if query is not None:  # the URL we answered, as the carrier opened it
            if TOKEN_PARAMETER in query:
                params = {k: v for k, v in query.items() if k in STREAM_PARAMETERS}
            busy = busy or (TOKEN_PARAMETER not in params and BUSY_PARAMETER in params)
        if busy:
            log.info(f"{name}.busy_stream_closed", call_sid=started.call_id)
            await socket.close(1000)  # turned away: the carrier's flow moves on
            return
        live = state.registry.active.get(started.call_id)
        check = tokens.check(
            params.get(TOKEN_PARAMETER),
            started.call_id,
            "",
            time.time(),
            live=live is not None and live.bridge is not None,
        )
        # an outbound token opens webhooks only, except where the carrier streams an outbound
        # call straight to us (Exotel): there the stream claims it for the call it names
        outbound = bool(check) and check.ref is not None and route.outbound_streams
        problem: str | None = None
        if not check:
            problem = check.reason or "bad stream token"
        elif issued is not None and issued < (check.minted or 0.0) - UPGRADE_CLOCK_SKEW_S:
            # signed for an upgrade before this call was answered: another call's
            problem = "handshake Authorization issued before this call's answer"
        elif check.ref is not None:
            problem = await claim_ref(check.ref, started.call_id) if outbound else "outbound token"
        if problem is not None:
            state.metrics.error("stream_token")
            log.warning(f"{name}.stream_refused", reason=problem)
            await socket.close(1008)
            return
        params = {k: v for k, v in params.items() if k != TOKEN_PARAMETER}
        if outbound:  # placed by us: outbound whatever the URL says, numbers as E.164
            params["direction"] = "outbound-api"
            started = replace(
                started,
                from_number=e164(started.from_number) if started.from_number else None,
                to_number=e164(started.to_number) if started.to_number else None,
            )
            log.info(
                f"{name}.outbound_stream",
                call_sid=started.call_id,
                to=mask_number(started.to_number) or None,
            )
        # a carrier naming the numbers in its start rather than in the parameters (Vonage)
        for key, value in (("from", started.from_number), ("to", started.to_number)):
            if value and not params.get(key):
                params[key] = value
        started = replace(started, custom_parameters=params)
        if route.on_start is not None:
            route.on_start(stream, started)
        if route.status_path is not None:
            statuses.started(started.call_id)
        if route.memory is not None:  # its webhook may have reached another worker
            await route.memory.recall(state.claims, started.call_id)
        try:
            await run_call(
                state,
                socket,
                stream,
                started,
                carrier_name=name,
                control=control_for(ws, started),
            )
        finally:
            if route.status_path is not None:
                statuses.ended(started.call_id)

    def control_for(ws: WebSocket, started: CallStarted) -> CallControl | None:
        if route.control is None:
            return None
        peer = ws.client.host if ws.client is not None else None
        base = public_base(ws.url, ws.headers, settings.public_url, peer=peer, trusted=trusted)

        async def publish(document: str) -> str:
            return f"{base}{documents_path}/{await documents.put(document)}"

        site = ControlSite(state, started, base, publish if route.documents else None)
        return route.control(site)

    async def transfer_document(token: str, request: Request) -> Response:
        """The carrier fetches a transfer's document (Plivo's `aleg_url`): signed, once."""
        body = await request.body()
        if not signed(request, body) or not await first_use(request):
            state.metrics.error(f"{name}_signature")
            log.warning(f"{name}.transfer_document_rejected", reason="bad signature or replay")
            return Response(f"invalid {name} signature", status_code=403, media_type="text/plain")
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        call_id = params.get(route.call_id_field, "")[:MAX_CALL_ID] or None
        document = await documents.take(token)
        if document is None:
            log.warning(f"{name}.transfer_document_unknown", call_sid=call_id)
            return Response("unknown or used document", status_code=404, media_type="text/plain")
        log.info(f"{name}.transfer_document", call_sid=call_id)
        return Response(document, media_type=route.content_type)

    def callback_params(request: Request, body: bytes) -> dict[str, str]:
        """A carrier callback's fields: its query (GET), JSON object or form."""
        if request.method == "GET":
            return dict(request.query_params)
        if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                return {}
            return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))

    def forbidden(event: str) -> Response:
        state.metrics.error(f"{name}_signature")
        log.warning(event, reason="bad or missing signature")
        return Response(f"invalid {name} signature", status_code=403, media_type="text/plain")

    async def whisper(token: str, request: Request) -> Response:
        """A warm transfer's callee answered: the carrier asks what to play them (signed,
        once, only for the call and carrier it was minted for)."""
        assert route.warm is not None
        body = await request.body()
        if not signed(request, body):
            return forbidden(f"{name}.whisper_rejected")
        params = callback_params(request, body)
        stored = await state.whispers.take(token)
        if stored is None:
            log.warning(f"{name}.whisper_unknown")
            return Response("unknown or used whisper", status_code=404, media_type="text/plain")
        briefing = Briefing.loads(stored)
        parent = params.get(route.warm.parent_field) if route.warm.parent_field else None
        refusal = briefing.refusal(name, parent)
        if refusal is not None:
            log.warning(f"{name}.whisper_refused", reason=refusal)
            return Response(refusal, status_code=403, media_type="text/plain")
        log.info(f"{name}.whisper", call_sid=briefing.call_id[:MAX_CALL_ID] or None)
        document = route.warm.whisper(briefing.text, briefing.language)
        return Response(document, media_type=route.warm.content_type)

    async def transfer_ended(request: Request) -> Response:
        """A warm transfer's dial ended: hang up, or tell the caller no one took it."""
        assert route.warm is not None
        body = await request.body()
        if not signed(request, body):
            return forbidden(f"{name}.transfer_ended_rejected")
        params = callback_params(request, body)
        profile = state.match_profile({"profile": request.query_params.get("profile", "")})
        status = params.get(route.warm.status_field, "")
        log.info(f"{name}.transfer_ended", dial_status=status[:32])
        document = route.warm.after_dial(status, profile.transfer.no_answer_message)
        if document is None:
            return Response(status_code=204)
        return Response(document, media_type=route.warm.content_type)

    router.add_api_route(
        route.webhook_path, voice_webhook, methods=list(route.methods), include_in_schema=False
    )
    if route.warm is not None:
        router.add_api_route(
            whisper_path(name) + "/{token}",
            whisper,
            methods=list(route.warm.whisper_methods),
            include_in_schema=False,
        )
        router.add_api_route(
            transfer_ended_path(name), transfer_ended, methods=["POST"], include_in_schema=False
        )
    if route.status_path is not None and route.read_status is not None:
        router.add_api_route(
            route.status_path,
            status_webhook,
            methods=list(route.status_methods),
            include_in_schema=False,
        )
    router.add_api_websocket_route(route.stream_path, media_stream)
    if route.documents:
        router.add_api_route(
            documents_path + "/{token}",
            transfer_document,
            methods=["POST"],
            include_in_schema=False,
        )


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
