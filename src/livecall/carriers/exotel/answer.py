"""What Exotel's Voicebot applet is told: the stream URL, carried in a small JSON answer.

Exotel has no per-call answer document like TwiML: the flow (App Bazaar) holds a Voicebot
applet whose URL is either a fixed `wss://` URL or an `https://` endpoint that Exotel asks
(HTTP GET, the call's details as query parameters) for `{"url": "wss://..."}` each call.
livecall serves the latter, so each call gets its own stream URL: per-call values ride in its
query string (at most 3 custom parameters, 256 characters in all) and Exotel echoes them
back in `start.custom_parameters`; `sample-rate` picks 8, 16 or 24 kHz PCM. The same URL
goes in the `StreamUrl` of a "Connect Voice AI" outbound call (at most 600 characters).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson

from livecall.carriers.exotel.wire import SAMPLE_RATES

__all__ = [
    "MAX_CUSTOM_PARAMETERS",
    "MAX_PARAMETER_CHARS",
    "MAX_STREAM_URL_CHARS",
    "SAMPLE_RATE_PARAM",
    "stream_url_answer",
    "stream_url_for",
    "voicebot_stream_url",
]

MAX_CUSTOM_PARAMETERS = 3
MAX_PARAMETER_CHARS = 256
MAX_STREAM_URL_CHARS = 600
SAMPLE_RATE_PARAM = "sample-rate"


def stream_url_for(public_url: str, path: str = "/ws/exotel") -> str:
    """The stream endpoint for a public base URL: https->wss, http->ws, same host:port."""
    parts = urlsplit(public_url)
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"public URL must be absolute http(s)://, got {public_url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"public URL must not carry a query or fragment, got {public_url!r}")
    full = parts.path.rstrip("/") + "/" + path.lstrip("/")
    return urlunsplit((scheme, parts.netloc, full.rstrip("/") or "/", "", ""))


def voicebot_stream_url(
    stream_url: str, parameters: Mapping[str, str], *, sample_rate: int = 8000
) -> str:
    """`stream_url` with the per-call parameters and the sample rate in its query string.

    Raises ValueError for what Exotel would refuse or cut: more than 3 parameters, more
    than 256 characters of them, a URL over 600 characters, a rate it does not stream.
    """
    parts = urlsplit(stream_url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"the stream URL must be absolute ws:// or wss://, got {stream_url!r}")
    if parts.query or parts.fragment:
        raise ValueError("the stream URL must not carry a query or fragment of its own")
    if sample_rate not in SAMPLE_RATES:
        raise ValueError(f"Exotel streams at {SAMPLE_RATES} Hz, not {sample_rate}")
    if len(parameters) > MAX_CUSTOM_PARAMETERS:
        raise ValueError(
            f"Exotel passes at most {MAX_CUSTOM_PARAMETERS} custom parameters, "
            f"got {len(parameters)}"
        )
    for name, value in parameters.items():
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise ValueError(f"parameter names and values must be strings, got {name!r}")
        if name == SAMPLE_RATE_PARAM:
            raise ValueError(f"{SAMPLE_RATE_PARAM!r} is Exotel's own parameter")
    custom = urlencode(list(parameters.items()))
    if len(custom) > MAX_PARAMETER_CHARS:
        raise ValueError(
            f"custom parameters take {len(custom)} characters; Exotel allows {MAX_PARAMETER_CHARS}"
        )
    query = f"{SAMPLE_RATE_PARAM}={sample_rate}" + (f"&{custom}" if custom else "")
    url = urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))
    if len(url) > MAX_STREAM_URL_CHARS:
        raise ValueError(f"the stream URL is {len(url)} characters; Exotel allows 600")
    return url


def stream_url_answer(
    stream_url: str, parameters: Mapping[str, str], *, sample_rate: int = 8000
) -> tuple[str, str]:
    """The Voicebot applet's dynamic-URL answer: `{"url": "wss://...?..."}` as JSON."""
    url = voicebot_stream_url(stream_url, parameters, sample_rate=sample_rate)
    return orjson.dumps({"url": url}).decode(), "application/json"
