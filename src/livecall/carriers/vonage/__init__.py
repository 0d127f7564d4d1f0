"""Vonage Voice API: the WebSocket media stream, the NCCO, signed webhooks and REST control.

One module per job: `wire` (the stream, sans I/O), `answer` (the NCCO and the answer
webhook's fields), `signatures` (signed-webhook JWTs), `control` (REST call control).
`VonageCarrier` ties them together behind `carriers.base.Carrier`.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from livecall.carriers.base import Capabilities, MediaFormat
from livecall.carriers.vonage.answer import (
    AnswerRequest,
    busy_ncco,
    connect_websocket_ncco,
    ncco_json,
    parse_answer_request,
)
from livecall.carriers.vonage.control import VonageApiError, VonageCallControl
from livecall.carriers.vonage.signatures import SignatureRejected, VonageSignature
from livecall.carriers.vonage.wire import CAPABILITIES, VonageStream

__all__ = [
    "AnswerRequest",
    "SignatureRejected",
    "VonageApiError",
    "VonageCallControl",
    "VonageCarrier",
    "VonageSignature",
    "VonageStream",
    "busy_ncco",
    "connect_websocket_ncco",
    "parse_answer_request",
    "stream_url_for",
]


class VonageCarrier:
    """Vonage behind `carriers.base.Carrier`: new streams, the NCCO, webhook signatures."""

    name = "vonage"
    capabilities: Capabilities = CAPABILITIES

    def __init__(
        self,
        signature: VonageSignature | None,
        *,
        sample_rate: int = 16000,
        event_url: str | None = None,
        synchronous_events: bool = False,
    ) -> None:
        self.signature = signature
        self.sample_rate = sample_rate
        self.event_url = event_url
        self.synchronous_events = synchronous_events

    def new_stream(self, *, max_frame_bytes: int) -> VonageStream:
        return VonageStream(
            max_frame_bytes=max_frame_bytes, media_format=MediaFormat("l16", self.sample_rate)
        )

    def answer_document(self, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        """The NCCO (JSON body, content type) that connects the call to `stream_url`."""
        ncco = connect_websocket_ncco(
            stream_url,
            parameters,
            sample_rate=self.sample_rate,
            event_url=self.event_url,
            synchronous_events=self.synchronous_events,
        )
        return ncco_json(ncco)

    def answer_document_for_call(
        self,
        stream_url: str,
        parameters: Mapping[str, str],
        call: AnswerRequest,
        *,
        ws_authorization: str | None = None,
        vonage_authorization: bool = False,
        event_url: str | None = None,
    ) -> tuple[str, str]:
        """As `answer_document`, with the call's uuid and numbers echoed into the stream and,
        optionally, the WebSocket handshake's `Authorization`: Vonage's signed JWT
        (`vonage_authorization`, checked by `verify_upgrade`) or a custom value, and an event
        URL for this call's websocket leg (else the carrier's own, if any)."""
        ncco = connect_websocket_ncco(
            stream_url,
            parameters,
            sample_rate=self.sample_rate,
            call=call,
            event_url=event_url or self.event_url,
            synchronous_events=self.synchronous_events,
            ws_authorization=ws_authorization,
            vonage_authorization=vonage_authorization,
        )
        return ncco_json(ncco)

    def verify_webhook(self, url: str, headers: Mapping[str, str], body: bytes) -> bool:
        """A signed webhook: POST if it has a body, else GET (the answer webhook's default)."""
        if self.signature is None:
            return False  # secure by default: no secret, no trust
        method = "POST" if body else "GET"
        return self.signature.verify(headers, method=method, url=url, body=body)

    def verify_upgrade(self, headers: Mapping[str, str]) -> float:
        """Check a WebSocket upgrade's `Authorization` (the JWT Vonage signs for an endpoint
        with `"authorization": {"type": "vonage"}`): its `iat`, or SignatureRejected saying
        why not (never quoting the token or the secret)."""
        if self.signature is None:
            raise SignatureRejected("no signature secret configured")
        iat = self.signature.check_handshake(headers)["iat"]
        return float(iat)

    def verify_request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> bool:
        """`verify_webhook` when the HTTP method is known (it decides what payload_hash covers)."""
        if self.signature is None:
            return False
        return self.signature.verify(headers, method=method, url=url, body=body)


def stream_url_for(public_url: str, path: str = "/ws/vonage") -> str:
    """The websocket `uri` for a public base URL: https->wss, http->ws, same host:port."""
    parts = urlsplit(public_url)
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"public URL must be absolute http(s)://, got {public_url!r}")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/{path.lstrip('/')}"
