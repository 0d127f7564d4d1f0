"""Plivo: Audio Streaming over WebSocket (bidirectional JSON), Plivo XML answers, V3 signatures.

One file per job: `wire.py` (the stream, sans I/O), `answer.py` (Plivo XML), `signatures.py`
(webhook checks), `control.py` (REST). `PlivoCarrier` is the `livecall.carriers.base.Carrier`
that ties them together for the call core.
"""

from __future__ import annotations

from collections.abc import Mapping

from livecall.carriers.base import ULAW_8K, MediaFormat
from livecall.carriers.plivo.answer import busy_xml, dial_xml, hangup_xml, stream_xml
from livecall.carriers.plivo.control import CallEnded, PlivoControl, PlivoRestError
from livecall.carriers.plivo.signatures import NonceLedger, PlivoSignature
from livecall.carriers.plivo.wire import CAPABILITIES, PlivoStream, content_type_for

__all__ = [
    "CallEnded",
    "NonceLedger",
    "PlivoCarrier",
    "PlivoControl",
    "PlivoRestError",
    "PlivoSignature",
    "PlivoStream",
    "busy_xml",
    "dial_xml",
    "hangup_xml",
    "stream_xml",
]


class PlivoCarrier:
    """The Plivo `Carrier`: a stream per call, the XML answer and the V3 signature check.

    `media_format` is what livecall asks Plivo to stream both ways (μ-law 8 kHz by default;
    L16 at 8 or 16 kHz also work). `main_account_token` also accepts X-Plivo-Signature-Ma-V3
    (for numbers on a subaccount). The nonce ledger is per process (see signatures.py).
    """

    name = "plivo"
    capabilities = CAPABILITIES

    def __init__(
        self,
        auth_token: str,
        *,
        main_account_token: str | None = None,
        media_format: MediaFormat = ULAW_8K,
        ledger: NonceLedger | None = None,
    ) -> None:
        content_type_for(media_format)
        self.media_format = media_format
        self._signature = PlivoSignature(
            auth_token, main_account_token=main_account_token, ledger=ledger
        )

    def __repr__(self) -> str:
        return f"PlivoCarrier(media_format={self.media_format})"

    def new_stream(self, *, max_frame_bytes: int) -> PlivoStream:
        return PlivoStream(max_frame_bytes=max_frame_bytes, media_format=self.media_format)

    def answer_document(self, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        return stream_xml(stream_url, parameters, media_format=self.media_format), "application/xml"

    def verify_webhook(self, url: str, headers: Mapping[str, str], body: bytes) -> bool:
        return self._signature.verify_request(url, headers, body)
