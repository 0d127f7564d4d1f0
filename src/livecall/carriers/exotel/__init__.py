"""Exotel: the Voicebot applet's bidirectional stream (JSON + base64 16-bit PCM) over WebSocket.

One file per job: `wire.py` (the stream, sans I/O), `answer.py` (the stream URL the applet's
dynamic-URL endpoint answers with), `signatures.py` (Exotel signs nothing: a URL secret; the
stream carries the per-call token every carrier's does), `control.py` (v1 Calls API over
httpx). `ExotelCarrier` is the `livecall.carriers.base.Carrier` that ties them together for
the call core; `server/carrier_routes.py` serves it.
"""

from __future__ import annotations

from collections.abc import Mapping

from livecall.carriers.exotel.answer import stream_url_answer, voicebot_stream_url
from livecall.carriers.exotel.control import ExotelCall, ExotelClient, ExotelError
from livecall.carriers.exotel.signatures import ExotelUrlAuth
from livecall.carriers.exotel.wire import CAPABILITIES, SAMPLE_RATES, ExotelStream

__all__ = [
    "ExotelCall",
    "ExotelCarrier",
    "ExotelClient",
    "ExotelError",
    "ExotelStream",
    "ExotelUrlAuth",
    "stream_url_answer",
    "voicebot_stream_url",
]


_IN_START = frozenset(("from", "to"))  # what Exotel's `start` carries without being asked


class ExotelCarrier:
    """The Exotel `Carrier`: a stream per call, the stream-URL answer and the URL-secret check.

    `url_secret` is the secret the Exotel flow's applet URLs carry (Basic credentials or
    `?key=`); `sample_rate` the rate livecall asks Exotel to stream at (8, 16 or 24 kHz).
    """

    name = "exotel"
    capabilities = CAPABILITIES

    def __init__(self, url_secret: str, *, sample_rate: int = 16000) -> None:
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"Exotel streams at {SAMPLE_RATES} Hz, not {sample_rate}")
        self.sample_rate = sample_rate
        self._auth = ExotelUrlAuth(url_secret)

    def __repr__(self) -> str:
        return f"ExotelCarrier(sample_rate={self.sample_rate})"

    def new_stream(self, *, max_frame_bytes: int) -> ExotelStream:
        return ExotelStream(max_frame_bytes=max_frame_bytes, sample_rate=self.sample_rate)

    def answer_document(self, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        """`{"url": "wss://.../ws/exotel?sample-rate=16000&lc_token=..."}` for the applet.

        Exotel carries at most 3 custom parameters and its `start` names the caller and the
        called number itself, so `from` and `to` stay out of the URL, and so does the
        direction of an inbound call (the default).
        """
        kept = {
            k: v
            for k, v in parameters.items()
            if k not in _IN_START and not (k == "direction" and v == "inbound")
        }
        return stream_url_answer(stream_url, kept, sample_rate=self.sample_rate)

    def verify_webhook(self, url: str, headers: Mapping[str, str], body: bytes) -> bool:
        """Exotel signs nothing: the request must carry the URL secret (body unused)."""
        return self._auth.verify(url, headers)
