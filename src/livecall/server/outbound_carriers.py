"""Outbound calls on carriers other than Twilio: their REST dial, pointed back at livecall.

Twilio's outbound call carries its TwiML inline (`livecall.server.outbound`). Telnyx (TeXML
Calls API) and Plivo (Call API) instead fetch the answered call's document from a URL: here,
livecall's own voice webhook for that carrier (`/telnyx/texml`, `/plivo/answer`) with
`?outbound=<token>&profile=<name>`. The token is an outbound stream token of that carrier's
key (`StreamTokens.for_outbound`: a random reference, since the carrier names the call only
once it is placed). The webhook, signed by the carrier as ever, claims the reference for the
call id it names and answers with a stream token bound to that call id, so only the call we
placed gets a stream (`livecall.server.carrier_routes`).

Answering-machine detection is Twilio's alone here (its asynchronous verdict drives the
voicemail). A dial is never retried: a request that timed out may have placed the call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode

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
]

OUTBOUND_PARAMETER = "outbound"  # the answer URL's query parameter holding the stream token
OUTBOUND_CARRIERS = ("twilio", "telnyx", "plivo")
AMD_ONLY_ON = "twilio"


class CarrierDialError(Exception):
    """The carrier refused the call or could not be reached (status and error, no secrets)."""


# (to, from, answer url) -> the carrier's id for the call it placed
Dial = Callable[[str, str, str], Awaitable[str]]


@dataclass(frozen=True)
class CarrierDialer:
    """How one carrier places a call whose answered leg fetches livecall's webhook."""

    name: str
    webhook_path: str  # livecall's voice webhook the answer URL points at
    dial: Dial


def answer_url(public_url: str, webhook_path: str, token: str, profile: str) -> str:
    """The URL the carrier fetches the answered call's document from."""
    query = urlencode({OUTBOUND_PARAMETER: token, "profile": profile})
    return f"{public_url.rstrip('/')}{webhook_path}?{query}"


def _secret(value: object) -> str:
    get = getattr(value, "get_secret_value", None)
    return get() if get is not None else ""


def dialer_problem(settings: Settings, carrier: str) -> str | None:
    """What keeps `carrier` from placing calls here (the settings to set), else None."""
    if carrier == "telnyx":
        missing = [
            name
            for name, value in (
                ("TELNYX_PUBLIC_KEY", _secret(settings.telnyx_public_key)),
                ("TELNYX_API_KEY", _secret(settings.telnyx_api_key)),
                ("TELNYX_ACCOUNT_SID", settings.telnyx_account_sid),
                ("TELNYX_APPLICATION_SID", settings.telnyx_application_sid),
            )
            if not value
        ]
    elif carrier == "plivo":
        missing = [
            name
            for name, value in (
                ("PLIVO_AUTH_TOKEN", _secret(settings.plivo_auth_token)),
                ("PLIVO_AUTH_ID", settings.plivo_auth_id),
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
    return CarrierDialer("plivo", "/plivo/answer", _plivo_dial(settings))


def _telnyx_dial(settings: Settings) -> Dial:
    key = _secret(settings.telnyx_api_key)
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
    token = _secret(settings.plivo_auth_token)
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
