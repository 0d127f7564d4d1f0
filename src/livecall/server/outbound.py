"""Calls livecall places: `POST /api/calls/outbound`, `livecall call`, and Twilio's verdict on
who (or what) answered.

An outbound call goes out on the carrier the request names (`carrier`, default
OUTBOUND_CARRIER, else Twilio). On Twilio it is created with the REST API and inline TwiML
that connects the answered call straight to our media stream, the profile travelling as a
`<Parameter>` (the stream URL cannot carry a query). On Telnyx, Plivo and Vonage the carrier
fetches the answered call's document from livecall's own voice webhook for it, and Exotel
streams the answered call straight to `/ws/exotel` (`livecall.server.outbound_carriers`);
the same guards apply to every carrier.

With answering-machine detection on (Twilio), Twilio keeps listening in the background and
POSTs its verdict to `/twilio/amd`: for a machine, once the greeting and beep are over, the
agent leaves the profile's voicemail message and hangs up; for a person, the agent greets
them (it held its greeting until then, so it never talks over a voicemail greeting).

Placing a call spends money, so the API guards it (toll fraud): its own token
(`LIVECALL_CALLS_TOKEN`), `PUBLIC_URL` set (the stream and AMD callback never go to a host a
requester names), a destination allowlist (`livecall.telephony.destinations`), and rate and
concurrency caps (`livecall.server.outbound_limits`). Every refusal is a JSON error and a log
line naming the number by its last four digits only. Answering-machine detection is Twilio's
only: asked for on another carrier, the request is refused (400) rather than placed without.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from livecall.agent.profiles import AgentProfile, ProfileRegistry, ProfileSet
from livecall.privacy import mask_number
from livecall.server.auth import calls_auth
from livecall.server.carrier_route import stream_tokens_for
from livecall.server.outbound_carriers import (
    AMD_ONLY_ON,
    CarrierDialer,
    CarrierDialError,
    carrier_dialer,
    dialer_problem,
)
from livecall.server.outbound_limits import OutboundLimits
from livecall.server.twilio_routes import (
    FORBIDDEN,
    STREAM_PATH,
    signed_form,
    twilio_stream_tokens,
)
from livecall.server.urls import ws_base
from livecall.settings import Settings
from livecall.telephony.destinations import DestinationPolicy, DestinationRefused
from livecall.telephony.stream_token import TOKEN_PARAMETER
from livecall.telephony.twilio_rest import TwilioCallControl, TwilioCallError

if TYPE_CHECKING:
    from livecall.server.state import AppState

__all__ = [
    "AMD_PATH",
    "OutboundCallIn",
    "OutboundCallOut",
    "OutboundError",
    "build_amd_router",
    "build_outbound_api_router",
    "destination_policy",
    "place_carrier_call",
    "place_outbound_call",
]

log = structlog.get_logger("livecall.outbound")

AMD_PATH = "/twilio/amd"
E164 = r"^\+[1-9]\d{1,14}$"
TWILIO_MAX_TIME_LIMIT_S = 14400  # Twilio's ceiling for a call's TimeLimit (4 hours)
MAX_PENDING_VERDICTS = 1000


class OutboundError(ValueError):
    """A request livecall cannot place as asked; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class OutboundCallIn(BaseModel):
    """Who to call, as which agent, on which carrier, and whether to listen for a machine."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    to: str = Field(pattern=E164, description="number to call, E.164 (+15551234567)")
    profile: str | None = Field(None, description="agent profile (default: the default one)")
    carrier: Literal["twilio", "telnyx", "plivo", "vonage", "exotel"] | None = Field(
        None, description="carrier to call with (default: OUTBOUND_CARRIER, else twilio)"
    )
    machine_detection: bool = Field(
        False,
        description="detect answering machines and leave the profile's voicemail (Twilio only)",
    )
    from_: str | None = Field(
        None,
        alias="from",
        pattern=E164,
        description="caller ID (default: the profile's first number, else TWILIO_CALLER_ID "
        "on Twilio)",
    )


class OutboundCallOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    call_sid: str = Field(
        description="the carrier's id for the call (Plivo: the request_uuid of the dial; the "
        "call's CallUUID comes once it is answered)"
    )
    to: str
    from_: str = Field(alias="from")
    profile: str
    carrier: str = "twilio"
    machine_detection: bool


def destination_policy(settings: Settings, profiles: ProfileSet) -> DestinationPolicy:
    """The allowlist: OUTBOUND_ALLOWED_DESTINATIONS, else the configured caller IDs' countries
    (TWILIO_CALLER_ID and the profiles' numbers; never a `from` a request names)."""
    caller_ids: Iterable[str | None] = [
        settings.twilio_caller_id,
        *(number for p in profiles.profiles for number in p.numbers),
    ]
    return DestinationPolicy.parse(
        settings.outbound_allowed_destinations,
        caller_ids=caller_ids,
        allow_costly=settings.outbound_allow_premium,
    )


async def place_outbound_call(
    control: TwilioCallControl,
    profiles: ProfileSet,
    *,
    to: str,
    profile: str | None,
    public_base_url: str,
    destinations: DestinationPolicy,
    machine_detection: bool = False,
    from_: str | None = None,
    default_caller_id: str | None = None,
    stream_token: str,
) -> tuple[str, AgentProfile, str]:
    """Create the call with Twilio; returns (call sid, profile, caller ID used).

    `stream_token` (`twilio_stream_tokens(...).for_outbound(...)`) rides in the TwiML as a
    `<Parameter>`: without it the call's media stream is refused.

    Raises `OutboundError` for a request that cannot work (unknown profile, no caller ID, a
    destination `destinations` refuses: 403) and `TwilioCallError` when Twilio refuses.
    """
    chosen, caller_id = _who(
        profiles, destinations, to, profile, from_, default_caller_id, "or set TWILIO_CALLER_ID"
    )
    base = public_base_url.rstrip("/")
    parameters = {"profile": chosen.name, "direction": "outbound-api", "from": caller_id, "to": to}
    if machine_detection:
        parameters["amd"] = "1"
    parameters[TOKEN_PARAMETER] = stream_token
    sid = await control.create_outbound(
        to,
        caller_id,
        ws_base(base) + STREAM_PATH,
        parameters,
        machine_detection=machine_detection,
        amd_callback=base + AMD_PATH if machine_detection else None,
        time_limit_s=min(int(chosen.max_call_duration_s), TWILIO_MAX_TIME_LIMIT_S),
    )
    return sid, chosen, caller_id


def _who(
    profiles: ProfileSet,
    destinations: DestinationPolicy,
    to: str,
    profile: str | None,
    from_: str | None,
    default_caller_id: str | None,
    hint: str,
) -> tuple[AgentProfile, str]:
    """The destination checked, the profile chosen and the caller ID, for any carrier."""
    try:
        destinations.check(to)
    except DestinationRefused as exc:
        raise OutboundError(f"destination refused: {exc}", 403) from None
    if profile:
        chosen = profiles.get(profile)
        if chosen is None:
            raise OutboundError(
                f"unknown profile {profile!r} (profiles: {', '.join(profiles.names)})"
            )
    else:
        chosen = profiles.default
    caller_id = from_ or (chosen.numbers[0] if chosen.numbers else None) or default_caller_id
    if not caller_id:
        raise OutboundError(f"no caller ID: pass 'from', give the profile a number{hint}")
    return chosen, caller_id


async def place_carrier_call(
    dialer: CarrierDialer,
    profiles: ProfileSet,
    *,
    to: str,
    profile: str | None,
    public_base_url: str,
    destinations: DestinationPolicy,
    from_: str | None = None,
    stream_token: str,
) -> tuple[str, AgentProfile, str]:
    """Place the call with a carrier whose answered call fetches livecall's webhook (Telnyx,
    Plivo, Vonage) or streams straight to livecall (Exotel); returns (the carrier's id for
    it, profile, caller ID used).

    `stream_token` is an outbound token of that carrier's stream key
    (`stream_tokens_for(secret, carrier).for_outbound("", now)`): it rides in the answer URL
    (Exotel: the stream URL), and the webhook (Exotel: the stream) claims it for the call it
    answers. Raises `OutboundError` as `place_outbound_call` does and `CarrierDialError` when
    the carrier refuses.
    """
    chosen, caller_id = _who(profiles, destinations, to, profile, from_, None, "")
    try:
        url = dialer.url(public_base_url, stream_token, chosen.name)
    except ValueError as exc:  # Exotel's stream URL: a profile name too long for its limits
        raise OutboundError(f"cannot call on {dialer.name}: {exc}") from None
    return await dialer.dial(to, caller_id, url), chosen, caller_id


def deliver_answered_by(state: AppState, call_sid: str, answered_by: str) -> bool:
    """Hand Twilio's AMD verdict to the call; True if it is live, else kept for its stream."""
    entry = state.registry.active.get(call_sid)
    actions = entry.actions if entry and entry.bridge else None
    if actions is not None:
        actions.on_answered_by(answered_by)
        return True
    pending = state.answered_by
    pending[call_sid] = answered_by
    while len(pending) > MAX_PENDING_VERDICTS:  # streams that never came
        pending.popitem(last=False)
    return False


def build_amd_router(state: AppState) -> APIRouter:
    """`POST /twilio/amd`: Twilio's asynchronous answering-machine verdict (signed)."""
    router = APIRouter()

    @router.post(AMD_PATH, include_in_schema=False)
    async def amd_callback(request: Request) -> Response:
        params = await signed_form(state, request, "twilio.amd_rejected")
        if params is None:
            return FORBIDDEN()
        call_sid = params.get("CallSid", "")
        answered_by = params.get("AnsweredBy", "")
        if not call_sid or not answered_by:
            return Response("CallSid and AnsweredBy are required", status_code=400)
        live = deliver_answered_by(state, call_sid, answered_by)
        log.info("twilio.amd", call_sid=call_sid, answered_by=answered_by, live=live)
        return Response(status_code=204)

    return router


def build_outbound_api_router(state: AppState) -> APIRouter:
    """`POST /api/calls/outbound` behind the API's bearer auth; raises `ApiDisabled`."""
    settings = state.settings
    authorize = calls_auth(settings)
    router = APIRouter(prefix="/api", tags=["calls"], dependencies=[Depends(authorize)])
    limits = OutboundLimits(
        settings.outbound_max_per_minute,
        settings.outbound_max_per_hour,
        settings.outbound_max_concurrent,
    )
    DestinationPolicy.parse(settings.outbound_allowed_destinations)  # a bad entry stops startup

    def refuse(status: int, reason: str, to: str, **headers: str) -> HTTPException:
        masked = mask_number(to)
        shown = reason.replace(to, masked) if to else reason  # Twilio's errors quote the number
        log.warning("outbound.refused", status=status, reason=shown, to=masked)
        return HTTPException(status, reason, headers=headers or None)

    tokens = twilio_stream_tokens(state.stream_secret)
    state.outbound_limits = limits  # the carriers' webhooks re-key answered calls

    @router.post(
        "/calls/outbound",
        status_code=201,
        response_model=OutboundCallOut,
        response_model_by_alias=True,
        summary="Place an outbound call with an agent profile",
        responses={
            400: {
                "description": "unknown profile, no caller ID, or answering-machine detection "
                "asked of a carrier other than Twilio"
            },
            401: {"description": "missing or wrong LIVECALL_CALLS_TOKEN"},
            403: {"description": "not the calls token, or a destination not allowed"},
            429: {"description": "too many outbound calls (rate or concurrency cap)"},
            502: {"description": "the carrier refused the call"},
            503: {
                "description": "the carrier's REST credentials not set, no PUBLIC_URL, or draining"
            },
        },
    )
    async def create_outbound_call(body: OutboundCallIn) -> OutboundCallOut:
        carrier = body.carrier or settings.outbound_carrier
        if body.machine_detection and carrier != AMD_ONLY_ON:
            raise refuse(
                400,
                f"answering-machine detection is Twilio-only; {carrier} calls are placed "
                "without it (leave machine_detection false, or use carrier twilio)",
                body.to,
            )
        control = state.call_control
        dialer: CarrierDialer | None = None
        if carrier == "twilio":
            if control is None:
                raise refuse(
                    503, "outbound calls need TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN", body.to
                )
        else:
            problem = dialer_problem(settings, carrier)
            if problem is not None:
                raise refuse(503, problem, body.to)
            dialer = carrier_dialer(settings, carrier)
        if not settings.public_url:
            # without it the stream URL would come from the request's (forgeable) headers
            raise refuse(
                503,
                f"outbound calls need PUBLIC_URL (where {carrier} reaches this server for the "
                "audio)",
                body.to,
            )
        if state.registry.draining:
            raise refuse(503, "the server is draining", body.to)
        if state.profiles is None:
            state.profiles = ProfileRegistry(None, settings)
        profiles = state.profiles.current
        try:
            destinations = destination_policy(settings, profiles)
            destinations.check(body.to)
        except DestinationRefused as exc:
            raise refuse(403, f"destination refused: {exc}", body.to) from None
        refusal = limits.admit(time.monotonic(), state.registry.active)
        if refusal is not None:
            raise refuse(
                429, refusal.reason, body.to, **{"Retry-After": str(refusal.retry_after_s)}
            )
        ref: str | None = None
        try:
            if dialer is not None:
                token = stream_tokens_for(state.stream_secret, carrier).for_outbound(
                    "", time.time()
                )
                ref = token.split(".")[2]
                sid, profile, caller_id = await place_carrier_call(
                    dialer,
                    profiles,
                    to=body.to,
                    profile=body.profile,
                    public_base_url=settings.public_url,
                    destinations=destinations,
                    from_=body.from_,
                    stream_token=token,
                )
            else:
                assert control is not None
                sid, profile, caller_id = await place_outbound_call(
                    control,
                    profiles,
                    to=body.to,
                    profile=body.profile,
                    public_base_url=settings.public_url,
                    destinations=destinations,
                    machine_detection=body.machine_detection,
                    from_=body.from_,
                    default_caller_id=settings.twilio_caller_id,
                    stream_token=tokens.for_outbound(
                        settings.twilio_account_sid or "", time.time()
                    ),
                )
        except OutboundError as exc:
            limits.release()
            raise refuse(exc.status, str(exc), body.to) from None
        except (TwilioCallError, CarrierDialError) as exc:
            limits.release()
            raise refuse(502, str(exc), body.to) from None
        except BaseException:
            limits.release()
            raise
        limits.placed(sid, time.monotonic(), ref=ref)
        log.info(
            "outbound.placed",
            call_sid=sid,
            carrier=carrier,
            to=mask_number(body.to),
            profile=profile.name,
        )
        return OutboundCallOut(
            call_sid=sid,
            to=body.to,
            from_=caller_id,
            profile=profile.name,
            carrier=carrier,
            machine_detection=body.machine_detection,
        )

    return router
