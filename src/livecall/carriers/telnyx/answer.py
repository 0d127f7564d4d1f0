"""TeXML answers for the Telnyx voice webhook: connect the call to livecall's media socket.

Telnyx fetches TeXML from the TeXML Application's voice URL (a signed form POST, like
Twilio's) and runs the verbs in order. `<Connect><Stream>` holds the call on the stream until
either side closes it; nothing after it means the call ends there. `bidirectionalMode="rtp"`
is what makes the socket two-way (the default, mp3, takes whole files about once a second);
`codec` asks Telnyx to transcode the caller's audio (only PCMU <-> PCMA is possible, else the
call's own codec arrives: the start frame says which), `bidirectionalCodec` and
`bidirectionalSamplingRate` fix what livecall plays. `<Parameter>`s come back in the start
frame's `custom_parameters`: the per-call token and the profile travel that way, never in
the URL (URLs end up in logs).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

__all__ = [
    "PLAYBACK_CODECS",
    "busy_texml",
    "connect_stream_texml",
    "hangup_texml",
]

_HEADER = '<?xml version="1.0" encoding="UTF-8"?>'
_NO_PARAMETERS: Mapping[str, str] = MappingProxyType({})
# What livecall can play back through TeXML's bidirectionalCodec (G722/OPUS/AMR-WB exist too,
# but livecall's core has no codec for them). TeXML documents no L16 here.
PLAYBACK_CODECS = ("PCMU", "PCMA")


def _document(response: ET.Element) -> str:
    return _HEADER + ET.tostring(response, encoding="unicode", short_empty_elements=True)


def _check_stream_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"<Stream> url must be an absolute ws:// or wss:// URL, got {url!r}")
    if parts.query or "?" in url or parts.fragment:
        raise ValueError(
            "<Stream> url must carry no query or fragment (it is logged); "
            "pass per-call values as <Parameter>s"
        )


def connect_stream_texml(
    stream_url: str,
    parameters: Mapping[str, str] = _NO_PARAMETERS,
    *,
    codec: Literal["PCMU", "PCMA"] = "PCMU",
    playback_codec: Literal["PCMU", "PCMA"] = "PCMU",
    status_callback: str | None = None,
    name: str | None = None,
) -> str:
    """`<Response><Connect><Stream …bidirectionalMode="rtp">` with `<Parameter>`s.

    The caller's track only (`inbound_track`: the agent must not hear itself), 8 kHz both
    ways (G.711 carries nothing above 4 kHz anyway).
    """
    _check_stream_url(stream_url)
    if codec not in PLAYBACK_CODECS or playback_codec not in PLAYBACK_CODECS:
        raise ValueError(f"codecs must be one of {PLAYBACK_CODECS}, got {codec}/{playback_codec}")
    response = ET.Element("Response")
    connect = ET.SubElement(response, "Connect")
    attrs = {
        "url": stream_url,
        "track": "inbound_track",
        "codec": codec,
        "bidirectionalMode": "rtp",
        "bidirectionalCodec": playback_codec,
        "bidirectionalSamplingRate": "8000",
    }
    if name:
        attrs["name"] = name
    if status_callback:
        attrs["statusCallback"] = status_callback
        attrs["statusCallbackMethod"] = "POST"
    stream = ET.SubElement(connect, "Stream", attrs)
    for key, value in parameters.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ValueError(f"<Parameter> names and values must be strings, got {key!r}")
        ET.SubElement(stream, "Parameter", {"name": key, "value": value})
    return _document(response)


def hangup_texml(say: str | None = None) -> str:
    """End the call, optionally saying something first."""
    response = ET.Element("Response")
    if say:
        ET.SubElement(response, "Say").text = say
    ET.SubElement(response, "Hangup")
    return _document(response)


def busy_texml(message: str | None, *, reject: bool = False) -> str:
    """Turn a call away: `<Reject reason="busy"/>` (not answered, not billed) or say and hang up."""
    if reject:
        response = ET.Element("Response")
        ET.SubElement(response, "Reject", {"reason": "busy"})
        return _document(response)
    return hangup_texml(message)
