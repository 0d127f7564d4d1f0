"""Outbound calls on carriers other than Twilio: their REST dial, pointed back at livecall.

Twilio's outbound call carries its TwiML inline (`livecall.server.outbound`). Telnyx (TeXML
Calls API), Plivo (Call API) and Vonage (Voice API `POST /v1/calls`) instead fetch the
answered call's document from a URL: here, livecall's own voice webhook for that carrier
(`/telnyx/texml`, `/plivo/answer`, `/vonage/answer`) with `?outbound=<token>&profile=<name>`.
The token is an outbound stream token of that carrier's key (`StreamTokens.for_outbound`: a
random reference, since the carrier names the call only once it is placed). The webhook,
signed by the carrier as ever, claims the reference for the call id it names and answers with
a stream token bound to that call id, so only the call we placed gets a stream
(`livecall.server.carrier_routes`).

Exotel's "Connect Voice AI" has no document to fetch: it dials, then streams the answered
call straight to the `StreamUrl` given. That URL (`/ws/exotel?sample-rate=…&profile=…&
direction=outbound-api&lc_token=<outbound token>`) carries the token, and `/ws/exotel` claims
its reference for the call its `start` names, as the other carriers' webhooks do.

Answering-machine detection is Twilio's alone here (its asynchronous verdict drives the
voicemail). A dial is never retried: a request that timed out may have placed the call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from livecall.server.carrier_route import secret_value

if TYPE_CHECKING:
    from livecall.settings import Settings

__all__ = [
    "OUTBOUND_CARRIERS",
    "OUTBOUND_PARAMETER",
    "CarrierDialError",
    "CarrierDialer",
    "answer_url",
    "carrier_dialer",
    "dialer_problem",
    "exotel_stream_url",
]

OUTBOUND_PARAMETER = "outbound"  # the answer URL's query parameter holding the stream token
OUTBOUND_CARRIERS = ("twilio", "telnyx", "plivo", "vonage", "exotel")
AMD_ONLY_ON = "twilio"


class CarrierDialError(Exception):
    """The carrier refused the call or could not be reached (status and error, no secrets)."""


# (to, from, answer url) -> the carrier's id for the call it placed
Dial = Callable[[str, str, str], Awaitable[str]]
# (public url, outbound token, profile) -> the URL the dial hands the carrier
DialUrl = Callable[[str, str, str], str]


@dataclass(frozen=True)
class CarrierDialer:
    """How one carrier places a call whose answered leg comes back to livecall: by fetching
    its webhook (`webhook_path`), or, with `dial_url` set, by streaming to that URL."""

    name: str
    webhook_path: str  # livecall's voice webhook the answer URL points at (or its stream)
    dial: Dial
    dial_url: DialUrl | None = None

    def url(self, public_url: str, token: str, profile: str) -> str:
        """The URL the dial hands the carrier (answer URL, or Exotel's stream URL)."""
        if self.dial_url is not None:
            return self.dial_url(public_url, token, profile)
        return answer_url(public_url, self.webhook_path, token, profile)


def answer_url(public_url: str, webhook_path: str, token: str, profile: str) -> str:
    """The URL the carrier fetches the answered call's document from."""
    query = urlencode({OUTBOUND_PARAMETER: token, "profile": profile})
    return f"{public_url.rstrip('/')}{webhook_path}?{query}"


def exotel_stream_url(
    public_url: str, token: str, profile: str, *, sample_rate: int = 16000
) -> str:
    """The `StreamUrl` of a Connect Voice AI call: `/ws/exotel` at `sample-rate` (the
    route's EXOTEL_SAMPLE_RATE) with the profile, the outbound direction and the outbound
    token as its 3 custom parameters (Exotel's limit); ValueError when they do not fit
    Exotel's 256 characters."""
    from livecall.carriers.exotel.answer import stream_url_for, voicebot_stream_url
    from livecall.telephony.stream_token import TOKEN_PARAMETER

    parameters = {"profile": profile, "direction": "outbound-api", TOKEN_PARAMETER: token}
    return voicebot_stream_url(stream_url_for(public_url), parameters, sample_rate=sample_rate)


def dialer_problem(settings: Settings, carrier: str) -> str | None:
    """What keeps `carrier` from placing calls here (the settings to set), else None."""
    if carrier == "telnyx":
        missing = [
            name
            for name, value in (
                ("TELNYX_PUBLIC_KEY", secret_value(settings.telnyx_public_key)),
                ("TELNYX_API_KEY", secret_value(settings.telnyx_api_key)),
                ("TELNYX_ACCOUNT_SID", settings.telnyx_account_sid),
                ("TELNYX_APPLICATION_SID", settings.telnyx_application_sid),
            )
            if not value
        ]
    elif carrier == "plivo":
        missing = [
            name
            for name, value in (
                ("PLIVO_AUTH_TOKEN", secret_value(settings.plivo_auth_token)),
                ("PLIVO_AUTH_ID", settings.plivo_auth_id),
            )
            if not value
        ]
    elif carrier == "vonage":
        missing = [
            name
            for name, value in (
                ("VONAGE_SIGNATURE_SECRET", secret_value(settings.vonage_signature_secret)),
                ("VONAGE_APPLICATION_ID", settings.vonage_application_id),
                ("VONAGE_PRIVATE_KEY", secret_value(settings.vonage_private_key)),
            )
            if not value
        ]
    elif carrier == "exotel":
        missing = [
            name
            for name, value in (
                ("EXOTEL_URL_SECRET", secret_value(settings.exotel_url_secret)),  # /ws/exotel
                ("EXOTEL_ACCOUNT_SID", settings.exotel_account_sid),
                ("EXOTEL_API_KEY", settings.exotel_api_key),
                ("EXOTEL_API_TOKEN", secret_value(settings.exotel_api_token)),
            )
            if not value
        ]
    else:
        return f"no outbound calls on {carrier!r} (carriers: {', '.join(OUTBOUND_CARRIERS)})"
    if missing:
        return f"outbound calls on {carrier} need {', '.join(missing)}"
    return None


def carrier_dialer(settings: Settings, carrier: str) -> CarrierDialer:
    """`carrier`'s dialer; ValueError (with `dialer_problem`'s text) when it is not set up."""
    problem = dialer_problem(settings, carrier)
    if problem is not None:
        raise ValueError(problem)
    if carrier == "telnyx":
        return CarrierDialer("telnyx", "/telnyx/texml", _telnyx_dial(settings))
    if carrier == "vonage":
        return CarrierDialer("vonage", "/vonage/answer", _vonage_dial(settings))
    if carrier == "exotel":
        rate = settings.exotel_sample_rate
        return CarrierDialer(
            "exotel",
            "/ws/exotel",
            _exotel_dial(settings),
            lambda base, token, profile: exotel_stream_url(base, token, profile, sample_rate=rate),
        )
    return CarrierDialer("plivo", "/plivo/answer", _plivo_dial(settings))


def _telnyx_dial(settings: Settings) -> Dial:
    key = secret_value(settings.telnyx_api_key)
    account = settings.telnyx_account_sid or ""
    application = settings.telnyx_application_sid or ""
    base = settings.telnyx_api_base

    async def dial(to: str, from_: str, url: str) -> str:
        from telnyx import APIConnectionError, APIStatusError

        from livecall.carriers.telnyx.control import TelnyxControl

        rest = TelnyxControl(key, account, base_url=base, max_retries=0)
        try:
            return await rest.dial(to=to, from_=from_, application_sid=application, url=url)
        except APIStatusError as exc:
            raise CarrierDialError(
                f"Telnyx refused the call: HTTP {exc.status_code} {_telnyx_title(exc.body)}"
            ) from None
        except APIConnectionError as exc:
            raise CarrierDialError(f"Telnyx not reached: {type(exc).__name__}") from None
        except (ValueError, RuntimeError) as exc:
            raise CarrierDialError(f"Telnyx call not placed: {exc}") from None
        finally:
            await rest.aclose()

    return dial


def _telnyx_title(body: object) -> str:
    errors = body.get("errors") if isinstance(body, dict) else None
    first = errors[0] if isinstance(errors, list) and errors else None
    title = first.get("title") if isinstance(first, dict) else None
    return str(title)[:120] if title else ""


def _plivo_dial(settings: Settings) -> Dial:
    auth_id = settings.plivo_auth_id or ""
    token = secret_value(settings.plivo_auth_token)
    base = settings.plivo_api_base

    async def dial(to: str, from_: str, url: str) -> str:
        import httpx

        from livecall.carriers.plivo.control import PlivoControl
        from livecall.telephony.call_control import CallControlError

        try:
            rest = (
                PlivoControl(auth_id, token, base_url=base)
                if base
                else PlivoControl(auth_id, token)
            )
        except ValueError as exc:  # a malformed PLIVO_AUTH_ID
            raise CarrierDialError(f"Plivo call not placed: {exc}") from None
        try:
            # Plivo writes numbers as digits, country code first, no "+"
            return await rest.dial(to.removeprefix("+"), from_.removeprefix("+"), url)
        except CallControlError as exc:
            raise CarrierDialError(f"Plivo refused the call: {exc}") from None
        except httpx.HTTPError as exc:
            raise CarrierDialError(f"Plivo not reached: {type(exc).__name__}") from None
        except ValueError as exc:
            raise CarrierDialError(f"Plivo call not placed: {exc}") from None
        finally:
            await rest.aclose()

    return dial


def _vonage_dial(settings: Settings) -> Dial:
    application_id = settings.vonage_application_id or ""
    key = secret_value(settings.vonage_private_key)
    base = settings.vonage_api_base

    async def dial(to: str, from_: str, url: str) -> str:
        from livecall.carriers.vonage.control import (
            DEFAULT_API_BASE,
            VonageApiError,
            VonageCallControl,
            load_private_key,
        )

        try:
            rest = VonageCallControl(
                application_id, load_private_key(key), base_url=base or DEFAULT_API_BASE
            )
        except ValueError as exc:  # an unreadable VONAGE_PRIVATE_KEY (the key itself unsaid)
            raise CarrierDialError(f"Vonage call not placed: {exc}") from None
        try:
            # the answer webhook is fetched with GET, Vonage adding the call's fields to the
            # query string our URL already has
            return await rest.create_call(to, from_, answer_url=url, answer_method="GET")
        except VonageApiError as exc:
            if exc.status == 0:
                raise CarrierDialError("Vonage not reached") from None
            raise CarrierDialError(f"Vonage refused the call: HTTP {exc.status}") from None
        except ValueError as exc:
            raise CarrierDialError(f"Vonage call not placed: {exc}") from None
        finally:
            await rest.aclose()

    return dial


def _exotel_dial(settings: Settings) -> Dial:
    account = settings.exotel_account_sid or ""
    key = settings.exotel_api_key or ""
    token = secret_value(settings.exotel_api_token)
    base = settings.exotel_api_base

    async def dial(to: str, from_: str, url: str) -> str:
        import httpx

        from livecall.carriers.exotel.control import MUMBAI, ExotelClient, ExotelError

        rest = ExotelClient(account, key, token, base_url=base or MUMBAI)
        try:
            # Connect Voice AI: Exotel dials `From` (the callee) from the ExoPhone `CallerId`
            call = await rest.connect_stream(to, from_, url)
        except ExotelError as exc:
            raise CarrierDialError(
                f"Exotel refused the call: HTTP {exc.status} {exc.message[:120]}"
            ) from None
        except httpx.HTTPError as exc:
            raise CarrierDialError(f"Exotel not reached: {type(exc).__name__}") from None
        except ValueError as exc:
            raise CarrierDialError(f"Exotel call not placed: {exc}") from None
        finally:
            await rest.aclose()
        return call.sid

    return dial
