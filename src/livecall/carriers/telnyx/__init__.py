"""Telnyx: Media Streaming over WebSocket (bidirectional RTP), TeXML answers, Ed25519 webhooks.

One file per job: `wire.py` (the stream, sans I/O), `answer.py` (TeXML), `signatures.py`
(webhook checks), `control.py` (REST through the official SDK). `TelnyxCarrier` is the
`livecall.carriers.base.Carrier` that ties them together for the call core.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from livecall.carriers.base import MediaFormat
from livecall.carriers.telnyx.answer import (
    PLAYBACK_CODECS,
    busy_texml,
    connect_stream_texml,
    hangup_texml,
)
from livecall.carriers.telnyx.signatures import TelnyxSignature
from livecall.carriers.telnyx.wire import CAPABILITIES, TelnyxStream, format_for, wire_encoding

__all__ = [
    "TelnyxCarrier",
    "TelnyxSignature",
    "TelnyxStream",
    "busy_texml",
    "connect_stream_texml",
    "hangup_texml",
]


class TelnyxCarrier:
    """The Telnyx `Carrier`: a stream per call, the TeXML answer and the signature check.

    `public_key` is the account's Ed25519 public key (base64); `playback` the codec livecall
    plays back (PCMU or PCMA at 8 kHz), the same in the answer and in every stream.
    """

    name = "telnyx"
    capabilities = CAPABILITIES

    def __init__(self, public_key: str, *, playback: str = "PCMU") -> None:
        if playback not in PLAYBACK_CODECS:
            raise ValueError(f"TeXML plays back {' or '.join(PLAYBACK_CODECS)}, not {playback!r}")
        self.playback_format: MediaFormat = format_for(playback)
        self._signature = TelnyxSignature(public_key)

    def __repr__(self) -> str:
        return f"TelnyxCarrier(playback={wire_encoding(self.playback_format)})"

    def new_stream(self, *, max_frame_bytes: int) -> TelnyxStream:
        return TelnyxStream(max_frame_bytes=max_frame_bytes, playback_format=self.playback_format)

    def answer_document(self, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        # __init__ admits PCMU or PCMA only (what TeXML plays back)
        codec: Literal["PCMU", "PCMA"] = (
            "PCMA" if self.playback_format.encoding == "alaw" else "PCMU"
        )
        body = connect_stream_texml(stream_url, parameters, codec=codec, playback_codec=codec)
        return body, "application/xml"

    def verify_webhook(self, url: str, headers: Mapping[str, str], body: bytes) -> bool:
        """Ed25519 over timestamp|body; the URL is not signed by Telnyx (unused here)."""
        return self._signature.verify(headers, body)
