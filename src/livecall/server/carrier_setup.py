"""Which carriers beside Twilio are on, from the settings (secure by default: no key, no
route), and what each one's route is made of: its adapter, how its webhook is read and
answered, its busy answer, and its REST call control when the API credentials are set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from livecall.server.carrier_route import (
    CALL_MEMORY_S,
    EXOTEL_TRANSFER_REFUSAL,
    CarrierRoute,
    ControlSite,
    WarmDocuments,
    WebhookCall,
    read_exotel,
    secret_value,
)
from livecall.server.urls import ws_base

if TYPE_CHECKING:
    from livecall.carriers.base import CallStarted, CarrierStream
    from livecall.carriers.vonage.calls import CallDirectory
    from livecall.settings import Settings
    from livecall.store.claims import ClaimStore
    from livecall.telephony.call_control import CallControl

__all__ = [
    "configured_routes",
]

log = structlog.get_logger("livecall.carriers")


def configured_routes(settings: Settings) -> list[CarrierRoute]:
    """The carriers whose credentials are set (secure by default: no key, no route), each
    with its REST call control when that carrier's API credentials are set too."""
    routes: list[CarrierRoute] = []
    if secret_value(settings.telnyx_public_key):
        from livecall.carriers.telnyx import TelnyxCarrier, busy_texml
        from livecall.carriers.telnyx.signatures import single_use as telnyx_once

        routes.append(
            CarrierRoute(
                TelnyxCarrier(secret_value(settings.telnyx_public_key)),
                "/telnyx/texml",
                "CallSid",
                lambda message, reject: busy_texml(message, reject=reject),
                single_use=telnyx_once,
                **_telnyx_control(settings),
            )
        )
    if secret_value(settings.plivo_auth_token):
        from livecall.carriers.plivo import PlivoCarrier, busy_xml
        from livecall.carriers.plivo.signatures import single_use as plivo_once

        routes.append(
            CarrierRoute(
                PlivoCarrier(secret_value(settings.plivo_auth_token)),
                "/plivo/answer",
                "CallUUID",
                lambda message, reject: busy_xml(message, reject=reject),
                alnum_parameters=True,  # extraHeaders: letters and digits only
                single_use=plivo_once,
                **_plivo_control(settings),
            )
        )
    secret = settings.vonage_signature_secret
    if secret is not None and secret.get_secret_value():
        routes.append(
            _vonage_route(secret.get_secret_value(), settings.vonage_sample_rate, settings=settings)
        )
    if settings.exotel_url_secret is not None and settings.exotel_url_secret.get_secret_value():
        from livecall.carriers.exotel import ExotelCarrier
        from livecall.telephony.call_control import StreamEndControl

        # the Voicebot applet's stream is the call: closing it hands the call to the flow's
        # next applet (which ends it), and nothing can move it elsewhere over REST
        exotel_control = StreamEndControl(EXOTEL_TRANSFER_REFUSAL)

        routes.append(
            CarrierRoute(
                ExotelCarrier(
                    settings.exotel_url_secret.get_secret_value(),
                    sample_rate=settings.exotel_sample_rate,
                ),
                "/exotel/voicebot",
                "CallSid",
                None,  # no busy document: a stream closed at start ends the Voicebot applet
                methods=("GET", "HEAD"),
                read_webhook=read_exotel,
                parameters_in_url=True,
                outbound_streams=True,
                control=lambda site: exotel_control,
                on_start=_exotel_rate_check,
            )
        )
    return routes


def _exotel_rate_check(stream: CarrierStream, started: CallStarted) -> None:
    """Exotel streams at the rate its `start` names: the call follows it (the caller's audio
    is coded so, and Exotel plays back at it), but a rate other than the one asked for is
    said once, loudly: the account may not offer that rate, or EXOTEL_SAMPLE_RATE changed
    between the applet's answer and its stream."""
    from livecall.carriers.exotel import ExotelStream

    if isinstance(stream, ExotelStream) and stream.rate_mismatch is not None:
        asked, got = stream.rate_mismatch
        log.warning(
            "exotel.sample_rate_mismatch",
            call_sid=started.call_id,
            asked=asked,
            got=got,
            note="following the start's rate",
        )


def _vonage_route(
    signature_secret: str, sample_rate: int, *, settings: Settings | None = None
) -> CarrierRoute:
    """Vonage: a GET (or POST JSON) answer webhook answered with an NCCO, signed JWTs, binary
    L16 on `/ws/vonage` (its upgrade signed by Vonage too: the NCCO asks for it), leg
    statuses on `GET|POST /vonage/event` (read as the call's: a leg's own uuid leads to it
    through the conversation), REST control (`_vonage_control`) sent to the region the answer
    webhook named."""
    from livecall.carriers.vonage import VonageCarrier, VonageSignature
    from livecall.carriers.vonage.answer import (
        busy_ncco,
        ncco_json,
        parse_answer_request,
        parse_event,
    )
    from livecall.carriers.vonage.calls import CallDirectory

    signature = VonageSignature(signature_secret)
    carrier = VonageCarrier(signature, sample_rate=sample_rate)
    ttl_s = (settings.max_call_duration_s if settings is not None else 3600.0) + CALL_MEMORY_S
    directory = CallDirectory(ttl_s=ttl_s)

    def read(method: str, url: str, body: bytes) -> WebhookCall:
        call = parse_answer_request(method, url, body)
        return WebhookCall(call.uuid, call.from_number, call.to_number, "inbound", call)

    def answer(base: str, parameters: Mapping[str, str], call: WebhookCall) -> tuple[str, str]:
        # the numbers ride in the NCCO's reserved headers (from the call), not as parameters
        params = {k: v for k, v in parameters.items() if k not in ("from", "to")}
        native = call.native
        line = native  # its region, its conversation, the number it rang (a transfer's from)
        if call.direction != "inbound":  # placed by us: E.164, and our number is `from`
            native = replace(native, from_number=call.from_number, to_number=call.to_number)
            line = replace(native, to_number=native.from_number)
        directory.answered(line, time.monotonic())
        return carrier.answer_document_for_call(
            ws_base(base) + "/ws/vonage",
            params,
            native,
            event_url=base + "/vonage/event",
            vonage_authorization=True,  # the upgrade carries Vonage's JWT: see verify_upgrade
        )

    def read_status(method: str, url: str, body: bytes) -> tuple[str, str]:
        event = parse_event(body, urlsplit(url).query if method == "GET" else "")
        known = directory.for_event(event.uuid, event.conversation_uuid, time.monotonic())
        return (known.uuid if known is not None else event.uuid), event.status

    return CarrierRoute(
        carrier,
        "/vonage/answer",
        "uuid",
        lambda message, reject: ncco_json(busy_ncco(None if reject else message))[0],
        content_type="application/json",
        methods=("GET", "POST"),
        read_webhook=read,
        answer=answer,
        status_path="/vonage/event",
        read_status=read_status,
        status_methods=("GET", "POST"),
        verify_upgrade=carrier.verify_upgrade,
        single_use=signature.single_use,
        memory=_VonageMemory(directory),
        **(_vonage_control(settings, directory) if settings is not None else {}),
    )


class _VonageMemory:
    """What Vonage's answer webhook said about a call (its region, its line), in the shared
    store for as long as the directory keeps it: the call's stream, and so its REST control,
    may reach another worker or instance than its answer webhook did."""

    KIND = "vonage-call"

    def __init__(self, directory: CallDirectory) -> None:
        self.directory = directory

    async def share(self, claims: ClaimStore, call_id: str) -> None:
        from livecall.carriers.vonage.calls import shared_form

        known = self.directory.get(call_id, time.monotonic())
        if known is not None:
            await claims.put(self.KIND, call_id, shared_form(known), self.directory.ttl_s)

    async def recall(self, claims: ClaimStore, call_id: str) -> None:
        from livecall.carriers.vonage.calls import from_shared

        now = time.monotonic()
        if self.directory.get(call_id, now) is not None:
            return  # answered here
        text = await claims.get(self.KIND, call_id)
        known = from_shared(call_id, text, now) if text is not None else None
        if known is not None:
            self.directory.add(known, now)


def _vonage_control(settings: Settings, directory: CallDirectory) -> dict[str, Any]:
    """Vonage call control: application JWTs, one client; each call's control goes to the
    `region_url` its answer webhook named (when it is Vonage's, or the configured base's), and
    its transfer dials from the number the caller rang."""
    key = secret_value(settings.vonage_private_key)
    if not settings.vonage_application_id or not key:
        return {}
    from livecall.carriers.vonage.calls import region_base
    from livecall.carriers.vonage.control import (
        DEFAULT_API_BASE,
        VonageCall,
        VonageCallControl,
        after_dial_ncco,
        load_private_key,
        whisper_ncco,
    )

    api_base = settings.vonage_api_base or DEFAULT_API_BASE
    rest = VonageCallControl(
        settings.vonage_application_id, load_private_key(key), base_url=api_base
    )

    def control(site: ControlSite) -> CallControl:
        known = directory.get(site.start.call_id, time.monotonic())
        if known is None:  # answered elsewhere or long ago: the base, the caller's own id
            return VonageCall(rest)
        region = region_base(known.region_url, api_base)
        return VonageCall(rest, region, from_number=known.line_number)

    def whisper(text: str, language: str | None) -> str:
        return json.dumps(whisper_ncco(text, language))

    def after_dial(status: str, message: str | None) -> str | None:
        ncco = after_dial_ncco(status, message)
        return None if ncco is None else json.dumps(ncco)

    # `onAnswer` is requested like an answer webhook (GET, signed); the synchronous connect's
    # events are POSTed JSON with its `status`
    warm = WarmDocuments(
        whisper,
        after_dial,
        "status",
        whisper_methods=("GET", "POST"),
        content_type="application/json",
    )
    return {"control": control, "aclose": rest.aclose, "warm": warm}


def _telnyx_control(settings: Settings) -> dict[str, Any]:
    """TeXML call control (the transfer's TeXML goes inline): one client for every call."""
    key = secret_value(settings.telnyx_api_key)
    if not key or not settings.telnyx_account_sid:
        return {}
    from livecall.carriers.telnyx.control import TelnyxCallControl, TelnyxControl

    # no retries, as with Twilio and Plivo: a transfer retried after a 5xx may have moved the
    # call already; a failed one is told to the model, which may try again
    rest = TelnyxControl(
        key, settings.telnyx_account_sid, base_url=settings.telnyx_api_base, max_retries=0
    )
    from livecall.carriers.telnyx.control import after_dial_texml, whisper_texml

    control = TelnyxCallControl(rest)
    # TeXML mirrors TwiML: `<Number url>` fetched (POST) about the answered leg, which names
    # the caller's call as its ParentCallSid; `<Dial action>` posts DialCallStatus
    warm = WarmDocuments(
        whisper_texml, after_dial_texml, "DialCallStatus", parent_field="ParentCallSid"
    )
    return {"control": lambda site: control, "aclose": control.aclose, "warm": warm}


def _plivo_control(settings: Settings) -> dict[str, Any]:
    """Plivo call control: hang-up over REST; a transfer points the caller's leg at a
    single-use document livecall serves (`aleg_url`)."""
    token = secret_value(settings.plivo_auth_token)
    if not settings.plivo_auth_id or not token:
        return {}
    from livecall.carriers.plivo.control import PlivoCallControl, PlivoControl

    rest = (
        PlivoControl(settings.plivo_auth_id, token, base_url=settings.plivo_api_base)
        if settings.plivo_api_base
        else PlivoControl(settings.plivo_auth_id, token)
    )

    from livecall.carriers.plivo.answer import after_dial_xml, whisper_xml

    def control(site: ControlSite) -> CallControl:
        assert site.publish is not None  # `documents=True` below
        return PlivoCallControl(rest, site.publish)

    # `confirmSound` is fetched (POST) about the called leg, naming the caller's as ALegUUID;
    # the `<Dial action>` posts DialStatus
    warm = WarmDocuments(whisper_xml, after_dial_xml, "DialStatus", parent_field="ALegUUID")
    return {"control": control, "documents": True, "aclose": rest.aclose, "warm": warm}
