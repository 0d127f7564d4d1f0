"""The parts of a simulated carrier edge that most carriers share, and some do not.

`SimulatedEdge` (sim/edge.py) is what every carrier's simulator does the same way; it leaves
abstract what differs from carrier to carrier. Where several carriers do a step the same way,
that way is one of these parts, each a `SimulatedEdge` subclass a simulator mixes in, and each
asks only for the hooks that way needs (abstract, so a part never leaves one unimplemented):

- `FormAnswerEdge`: the answer webhook as a signed form POST and an XML answer document
  (Twilio, Telnyx, Plivo): hooks `_call_params`, `_signature`, `_read_document`.
  Vonage (a JSON NCCO) and Exotel (a GET for `{"url": …}`) write their own `_webhook`.
- `OneSocketEdge`: the stream's WebSocket opened in one attempt (Twilio, Telnyx, Plivo,
  Vonage): hooks `_new_stream_sid`, `_stream_opened`. Exotel retries, its own way.
- `FrameMediaEdge`: one message per 20 ms caller frame, sent when due (Twilio, Telnyx, Plivo,
  Vonage): hook `_media_message`. Exotel batches frames into ~100 ms chunks.
- `JsonEnvelopeEdge`: the carrier's own frames are JSON envelopes (Twilio, Telnyx, Plivo,
  Exotel): hook `_envelope`, from which key presses, mark echoes and `stop` are built.
  Vonage's few text messages share no envelope.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import websockets

from livecall.sim.edge import SimulatedEdge

__all__ = ["FormAnswerEdge", "FrameMediaEdge", "JsonEnvelopeEdge", "OneSocketEdge"]


class FormAnswerEdge(SimulatedEdge):
    """The answer webhook as a form POST, signed as the carrier signs, answered by an XML
    document (`<Response>` and its verbs). Also the form POSTs of status callbacks.

    `replay_webhook` sends the answer webhook's very same signed request twice (replay tests);
    `webhook_statuses` lists every status the webhooks got.
    """

    # The carrier's words for what goes wrong before the stream (`{why}`, `{ctype}`, `{url}`
    # are filled in) and the content types its answer document may come in.
    FETCH_FAILED: ClassVar[str] = "answer webhook failed: {why}"
    BAD_CONTENT_TYPE: ClassVar[str] = "answer webhook returned content type {ctype!r}, not XML"
    DOCUMENT_TYPES: ClassVar[tuple[str, ...]] = ("xml",)
    XML_INVALID: ClassVar[str] = "invalid answer document: {why}"
    # a webhook request's headers (its signature comes from `_signature`)
    FORM_HEADERS: ClassVar[Mapping[str, str]] = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "*/*",
    }
    STREAM_URL_INVALID: ClassVar[str] = "stream URL is not an absolute ws(s):// URL: {url!r}"
    STREAM_URL_NOT_WSS: ClassVar[str] = "stream URL must use wss://: {url!r}"

    def __init__(self, base_url: str, *, replay_webhook: bool = False, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.replay_webhook = replay_webhook
        self.webhook_statuses: list[int] = []
        self._status_callback: str | None = None  # where stream statuses go, if the doc says

    @abstractmethod
    def _call_params(self, status: str) -> dict[str, str]:
        """The answer webhook's form: the call's details as the carrier names them."""

    @abstractmethod
    def _signature(self, url: str, params: Mapping[str, str], body: bytes) -> dict[str, str]:
        """The headers that sign one webhook request, as the carrier signs."""

    @abstractmethod
    def _read_document(self, body: bytes) -> bool:
        """Read the answer document: run what comes before the stream, note the stream's URL
        (`result.stream_url`) and what follows it; False if the call ends there."""

    def _form_headers(self) -> dict[str, str]:
        """A webhook request's headers before its signature (a fresh idempotency token…)."""
        return dict(self.FORM_HEADERS)

    async def _webhook(self) -> bool:
        r = self.result
        try:
            resp = await self._post(self.webhook_url, self._call_params("ringing"))
        except httpx.HTTPError as exc:
            return self._fail(self.FETCH_FAILED.format(why=type(exc).__name__))
        r.webhook_status = resp.status_code
        r.twiml = resp.text
        if resp.status_code != 200:
            return self._fail(self.FETCH_FAILED.format(why=f"status {resp.status_code}"))
        ctype = resp.headers.get("content-type", "")
        if not any(kind in ctype for kind in self.DOCUMENT_TYPES):
            return self._fail(self.BAD_CONTENT_TYPE.format(ctype=ctype))
        return self._read_document(resp.content)

    async def _post(self, url: str, params: dict[str, str]) -> httpx.Response:
        """POST a webhook as a form, signed (`sign`) as the carrier signs."""
        body = urlencode(params).encode()
        headers = self._form_headers()
        if self.sign:
            headers.update(self._signature(url, params, body))
        return await self._send_form(url, body, headers)

    async def _send_form(self, url: str, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """POST a form as built by `_post`; replayed once, identically, with `replay_webhook`."""
        assert self._client is not None
        resp = await self._client.post(url, content=body, headers=headers)
        if self.replay_webhook and url == self.webhook_url:
            self.webhook_statuses.append(resp.status_code)
            resp = await self._client.post(url, content=body, headers=headers)
        self.webhook_statuses.append(resp.status_code)
        return resp

    def _post_soon(self, url: str, params: dict[str, str]) -> None:
        """POST a status callback in the background (the call does not wait for it)."""

        async def post() -> None:
            try:
                await self._post(urljoin(self.webhook_url, url), params)
            except httpx.HTTPError as exc:
                self.result.protocol_errors.append(f"stream status callback failed: {exc!r}")

        task = asyncio.get_running_loop().create_task(post())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _read_xml(
        self,
        body: bytes,
        stream_tag: str,
        read_stream: Callable[[ET.Element, list[ET.Element]], bool],
        run_verb: Callable[[ET.Element], bool],
    ) -> bool:
        """An XML answer document (`<Response>` and its verbs, TwiML-like): run the verbs
        before the one named `stream_tag` (`run_verb`: True if one ends the call), then
        `read_stream(it, the verbs after it)`. A document without it ends the call."""
        try:
            root = ET.fromstring(body)
        except ET.ParseError as exc:
            return self._fail(self.XML_INVALID.format(why=exc))
        if root.tag != "Response":
            return self._fail(self.XML_INVALID.format(why=f"root is <{root.tag}>, not <Response>"))
        verbs = list(root)
        for i, verb in enumerate(verbs):
            if verb.tag == stream_tag:
                return read_stream(verb, verbs[i + 1 :])
            if run_verb(verb):
                return False
        self.result.ended_by = "server"  # the document ran out: the carrier hangs up
        return False

    def _stream_url_ok(self, url: str) -> bool:
        """The document's stream URL: absolute ws:// or wss:// (wss:// with `require_wss`)."""
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            return self._fail(self.STREAM_URL_INVALID.format(url=url))
        if self.require_wss and parts.scheme != "wss":
            return self._fail(self.STREAM_URL_NOT_WSS.format(url=url))
        return True


class OneSocketEdge(SimulatedEdge):
    """The stream's WebSocket opened once, with the carrier's headers; a failure ends the call
    (`stream-error` goes to `_stream_status`)."""

    # `{status}` and `{exc}` are filled in
    WS_REFUSED: ClassVar[str] = "stream WebSocket refused: status {status}"
    WS_FAILED: ClassVar[str] = "stream WebSocket failed: {exc!r}"

    @abstractmethod
    def _new_stream_sid(self) -> str:
        """The id the carrier gives this stream (known before the socket opens)."""

    @abstractmethod
    def _stream_opened(self) -> None:
        """The socket is up and `_stream_sid` known: precompute what frames need."""

    def _stream_headers(self, url: str) -> dict[str, str]:
        """Extra headers on the WebSocket upgrade (a signature); none unless a carrier adds."""
        return {}

    async def _open_stream(self) -> bool:
        r = self.result
        url = r.stream_url
        assert url is not None
        self._stream_sid = self._new_stream_sid()
        try:
            self._ws = await self._connect(url, self._stream_headers(url))
        except websockets.InvalidStatus as exc:
            r.protocol_errors.append(self.WS_REFUSED.format(status=exc.response.status_code))
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            r.protocol_errors.append(self.WS_FAILED.format(exc=exc))
        if self._ws is None:
            self._stream_status("stream-error", r.protocol_errors[-1])
            r.ended_by = "server"
            return False
        r.stream_sid = self._stream_sid
        self._stream_opened()
        return True


class FrameMediaEdge(SimulatedEdge):
    """The caller's audio as one message per clock frame, each sent once it is due."""

    @abstractmethod
    def _media_message(self, n: int, frame: bytes) -> str | bytes:
        """The caller's `n`-th frame (μ-law 8 kHz, numbered from 1) as the carrier sends it."""

    async def _flush(self, now: float, *, everything: bool = False) -> None:
        """Send the frames due by `now` (all of them with `everything`), in order."""
        ws = self._ws
        assert ws is not None
        pending = self._pending
        while pending and (everything or pending[0][0] <= now):
            _, n, frame, flags, utt = pending.popleft()
            await ws.send(self._media_message(n, frame))
            self.result.frames_sent += 1
            if flags:
                self._frame_sent(asyncio.get_running_loop().time(), flags, utt)


class JsonEnvelopeEdge(SimulatedEdge):
    """The carrier's own frames are JSON envelopes (`{"event": …, …}`), one builder for all."""

    @abstractmethod
    def _envelope(self, event: str, body: dict[str, Any] | None = None) -> str:
        """One JSON frame from the carrier (`body`, if any, under the event's name)."""

    def _dtmf_message(self, digit: str) -> str:
        return self._envelope("dtmf", {"track": "inbound_track", "digit": digit})

    def _mark_echo(self, name: str) -> str:
        return self._envelope("mark", {"name": name})

    def _stop_frame(self) -> str | None:
        return self._envelope("stop")
