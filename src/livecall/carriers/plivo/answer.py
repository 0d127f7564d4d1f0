"""Plivo XML answers: connect the call to livecall's stream, turn it away, or transfer it.

Built with the official SDK's `plivo.plivoxml` (escaping and attribute names are its job).
The stream answer is `<Stream bidirectional="true" keepCallAlive="true">` as the only
element: keepCallAlive holds the XML at the stream until the socket closes, and since
nothing follows it the call ends when livecall closes the socket.

Per-call values travel in `extraHeaders` ("k1=v1,k2=v2", at most 512 bytes, letters and
digits only, per https://www.plivo.com/docs/voice/xml/audiostream); Plivo echoes them in the
`start` frame's `extra_headers`. A value outside [A-Za-z0-9] is refused here rather than
mangled, so a per-call token must be alphanumeric (e.g. `secrets.token_hex`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from urllib.parse import urlsplit

from plivo import plivoxml

from livecall.carriers.base import ULAW_8K, MediaFormat
from livecall.carriers.plivo.wire import content_type_for

__all__ = [
    "EXTRA_HEADERS_MAX_BYTES",
    "after_dial_xml",
    "busy_xml",
    "dial_xml",
    "extra_headers",
    "hangup_xml",
    "stream_xml",
    "whisper_xml",
]

EXTRA_HEADERS_MAX_BYTES = 512
_ALNUM = re.compile(r"[A-Za-z0-9]+")
_NUMBER = re.compile(r"\+?[0-9]{3,20}")
_SIP = re.compile(r"sips?:[^\s<>\"]{3,256}")
_NO_PARAMETERS: Mapping[str, str] = MappingProxyType({})


def extra_headers(parameters: Mapping[str, str]) -> str:
    """Per-call values as Plivo's `extraHeaders` attribute; ValueError names a broken rule."""
    parts = []
    for name, value in parameters.items():
        if not isinstance(name, str) or not _ALNUM.fullmatch(name):
            raise ValueError(f"extraHeaders names must be letters and digits, got {name!r}")
        if not isinstance(value, str) or not _ALNUM.fullmatch(value):
            raise ValueError(
                f"extraHeaders value for {name!r} must be letters and digits (Plivo allows no "
                "other characters)"
            )
        parts.append(f"{name}={value}")
    text = ",".join(parts)
    if len(text) > EXTRA_HEADERS_MAX_BYTES:
        raise ValueError(f"extraHeaders is {len(text)} bytes; Plivo takes at most 512")
    return text


def _check_stream_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"<Stream> needs an absolute ws:// or wss:// URL, got {url!r}")
    if parts.fragment:
        raise ValueError(f"<Stream> URL must not carry a fragment, got {url!r}")


def _render(response: plivoxml.ResponseElement) -> str:
    """The document as one line of XML (the SDK is untyped: say what it returns)."""
    xml: str = response.to_string(pretty=False)
    return xml


def stream_xml(
    stream_url: str,
    parameters: Mapping[str, str] = _NO_PARAMETERS,
    *,
    media_format: MediaFormat = ULAW_8K,
    status_callback_url: str | None = None,
    stream_timeout_s: int | None = None,
) -> str:
    """The answer that streams the call to `stream_url`, both ways, until the socket closes."""
    _check_stream_url(stream_url)
    ctype, rate = content_type_for(media_format)
    if stream_timeout_s is not None and stream_timeout_s <= 0:
        raise ValueError("streamTimeout must be a positive number of seconds")
    kwargs: dict[str, object] = {
        "bidirectional": True,
        "audioTrack": "inbound",
        "contentType": f"{ctype};rate={rate}",
        "keepCallAlive": True,
    }
    headers = extra_headers(parameters)
    if headers:
        kwargs["extraHeaders"] = headers
    if status_callback_url:
        kwargs["statusCallbackUrl"] = status_callback_url
        kwargs["statusCallbackMethod"] = "POST"
    if stream_timeout_s is not None:
        kwargs["streamTimeout"] = stream_timeout_s
    response = plivoxml.ResponseElement()
    response.add(plivoxml.StreamElement(stream_url, **kwargs))
    return _render(response)


def hangup_xml(say: str | None = None) -> str:
    """End the call, optionally speaking first."""
    response = plivoxml.ResponseElement()
    if say:
        response.add(plivoxml.SpeakElement(say))
    response.add(plivoxml.HangupElement())
    return _render(response)


def busy_xml(message: str | None, *, reject: bool = False) -> str:
    """Turn a call away: speak then hang up, or `<Hangup reason="busy"/>` before answering."""
    if reject:
        response = plivoxml.ResponseElement()
        response.add(plivoxml.HangupElement(reason="busy"))
        return _render(response)
    return hangup_xml(message)


def dial_xml(
    number: str,
    *,
    caller_id: str | None = None,
    say: str | None = None,
    confirm_sound: str | None = None,
    action: str | None = None,
) -> str:
    """`<Dial><Number>` (or `<User>` for a ``sip:`` address), after `<Speak>say` when given:
    what a transfer's `aleg_url` serves to connect the caller onward.

    Warm: `confirm_sound` is the `<Dial confirmSound>` Plivo fetches (POST) when the called
    party answers, playing its `<Speak>`/`<Play>`/`<Wait>` to them alone before bridging (no
    `confirmKey`: nothing to press); `action` is where Plivo asks what the caller hears once
    the dial ends (`DialStatus`)."""
    if _SIP.fullmatch(number):
        noun = plivoxml.UserElement(number)
    elif _NUMBER.fullmatch(number):
        noun = plivoxml.NumberElement(number)
    else:
        raise ValueError(f"not a phone number or SIP address: {number!r}")
    attrs: dict[str, str] = {}
    if caller_id:
        attrs["caller_id"] = caller_id
    if confirm_sound:
        attrs["confirm_sound"] = confirm_sound
    if action:
        attrs |= {"action": action, "method": "POST", "redirect": "true"}
    dial = plivoxml.DialElement(**attrs)
    dial.add(noun)
    response = plivoxml.ResponseElement()
    if say:
        response.add(plivoxml.SpeakElement(say))
    response.add(dial)
    return _render(response)


def whisper_xml(text: str, language: str | None = None) -> str:
    """What a `confirmSound` fetch answers: the briefing, spoken to the called party alone
    (in the profile's language; Plivo's voices are not the agent's, so none is named)."""
    response = plivoxml.ResponseElement()
    response.add(plivoxml.SpeakElement(text, language=language or None))
    return _render(response)


def after_dial_xml(dial_status: str, no_answer_message: str | None) -> str:
    """The caller's XML once a warm transfer's `<Dial>` ends (its `action`, `DialStatus`):
    hang up after a conversation, say `no_answer_message` first when no one took the call."""
    response = plivoxml.ResponseElement()
    if dial_status not in ("completed", "answered") and no_answer_message:
        response.add(plivoxml.SpeakElement(no_answer_message))
    response.add(plivoxml.HangupElement())
    return _render(response)
