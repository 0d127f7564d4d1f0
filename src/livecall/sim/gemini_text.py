"""The fake Gemini's text side: ``POST /{version}/models/{model}:generateContent``.

Served on the same TLS port as the fake Live socket (as Google serves both on one host): a
`Sniffer` looks at the first bytes of each connection and either answers the HTTP request
itself or hands the connection to the WebSocket server untouched, so Live sessions pay
nothing for it. The answer follows the Developer API shape the real SDK parses
(`candidates[].content.parts[].text`, `usageMetadata`, Google's error JSON) and checks what
the service checks (API key, known model, a JSON body).

With ``responseMimeType: application/json`` and a response schema, the "model" reads the
transcript in the request and fills the schema by simple rules: a name after "under the
name", a party size after "table for", a time like "seven thirty", a phone number; success
when the agent confirmed ("see you", "confirmed", "booked"). Deterministic, so tests can
assert on it. `TextFault`s queued on `FakeTextModel.faults` make the next requests fail
(HTTP 500/429/…, a non-JSON answer, an answer outside the schema, or a slow one), and every
request is kept in `FakeTextModel.requests` for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlsplit

import orjson

__all__ = ["FakeTextModel", "Sniffer", "TextFault", "TextRequest", "fill_schema"]

DEFAULT_TEXT_MODELS = frozenset(
    {"gemini-3.5-flash", "gemini-3.5-pro", "gemini-3-flash", "gemini-2.5-flash", "gemini-2.5-pro"}
)
SIM_MODEL_PREFIX = "sim-"
MAX_BODY = 8 * 2**20
OPEN_TIMEOUT_S = 10.0
_PATH = re.compile(r"^/(?P<v>v1|v1beta|v1alpha)/models/(?P<model>[^/:]+):generateContent$")
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


@dataclass(slots=True)
class TextFault:
    """What the next request(s) get instead of a good answer.

    ``http``: that status with Google's error JSON; ``invalid_json``: 200 whose text is not
    JSON; ``off_schema``: 200 with JSON that misses the schema; ``slow``: the good answer after
    `delay_s` (or once `release` is set). `times` requests are affected (None: all from now).
    """

    kind: Literal["http", "invalid_json", "off_schema", "slow"] = "http"
    status: int = 500
    delay_s: float = 0.0
    times: int | None = 1
    release: asyncio.Event | None = None
    """For ``slow``: answer as soon as this is set (still after `delay_s` at the latest)."""


@dataclass(slots=True)
class TextRequest:
    """One generateContent request as received (never holds the API key)."""

    model: str | None
    api_version: str | None
    has_api_key: bool
    body: dict[str, Any] | None
    status: int = 0
    fault: str | None = None
    answer: str | None = None

    @property
    def text(self) -> str:
        """Every text part of the request's contents, joined."""
        parts = []
        for content in (self.body or {}).get("contents") or []:
            for part in content.get("parts") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
        return "\n".join(parts)


# --- the "model" ----------------------------------------------------------------------------

_NUMBERS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}  # fmt: skip
_WORD = "|".join(_NUMBERS)
_NAME = re.compile(
    r"(?:under the name|my name is|name is|under|this is)\s+([A-Z][a-z]+(?: [A-Z][a-z]+)?)"
)
_PARTY = re.compile(rf"(?:table for|party of|for)\s+(\d+|{_WORD})\b", re.IGNORECASE)
_TIME = re.compile(
    rf"\b((?:\d{{1,2}}(?::\d{{2}})?\s*(?:am|pm))|\d{{1,2}}:\d{{2}}|"
    rf"(?:{_WORD})(?:[ -](?:thirty|fifteen|forty[ -]five|o'clock))|(?:{_WORD})\s*(?:am|pm))\b",
    re.IGNORECASE,
)
_PHONE = re.compile(r"\+?\d[\d \-]{6,}\d")
_CONFIRMED = re.compile(r"see you|confirmed|is booked|you're all set|all booked", re.IGNORECASE)


def _lines(transcript: str, speaker: str) -> str:
    picked = [
        line.split(":", 1)[1].strip()
        for line in transcript.splitlines()
        if line.lower().startswith(speaker + ":")
    ]
    return " ".join(picked)


def _types(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    out = [str(k).lower() for k in kinds if k]
    if schema.get("nullable"):
        out.append("null")
    return out


def _extract(key: str, caller: str) -> Any:
    k = key.lower()
    if "name" in k:
        m = _NAME.search(caller)
        return m.group(1) if m else None
    if any(w in k for w in ("party", "size", "people", "guests", "covers")):
        m = _PARTY.search(caller)
        if m is None:
            return None
        word = m.group(1).lower()
        return int(word) if word.isdigit() else _NUMBERS[word]
    if any(w in k for w in ("phone", "number", "callback", "contact")):
        m = _PHONE.search(caller)
        return re.sub(r"[ \-]", "", m.group(0)) if m else None
    if any(w in k for w in ("time", "when", "date")):
        m = _TIME.search(caller)
        if m is None:
            return None
        day = re.search(r"\b(tonight|today|tomorrow)\b", caller, re.IGNORECASE)
        return m.group(1).lower() + (f" {day.group(1).lower()}" if day else "")
    return None


def _coerce(value: Any, kinds: list[str]) -> Any:
    if value is None:
        return None
    if "integer" in kinds or "number" in kinds:
        return value if isinstance(value, int) else None
    if "string" in kinds:
        return str(value)
    return None


def _default(kinds: list[str]) -> Any:
    if "null" in kinds:
        return None
    return {"string": "", "integer": 0, "number": 0, "boolean": False, "array": [], "object": {}}[
        next((k for k in kinds if k != "null"), "string")
    ]


def fill_schema(schema: dict[str, Any], caller: str) -> dict[str, Any]:
    """An object for an object schema, each property found in the caller's words by rules."""
    out: dict[str, Any] = {}
    required = set(schema.get("required") or ())
    for key, prop in (schema.get("properties") or {}).items():
        prop = prop if isinstance(prop, dict) else {}
        kinds = _types(prop)
        value = _coerce(_extract(key, caller), kinds)
        if value is None and "null" not in kinds and key not in required:
            continue
        out[key] = value if value is not None else _default(kinds)
    return out


def analyse(transcript: str, schema: dict[str, Any]) -> dict[str, Any]:
    """What the fake model answers for a post-call analysis schema."""
    caller, agent = _lines(transcript, "caller"), _lines(transcript, "agent")
    if not caller and not agent:
        caller = transcript
    props = schema.get("properties") or {}
    confirmed = bool(_CONFIRMED.search(agent))
    fields_schema = props.get("fields") if isinstance(props.get("fields"), dict) else None
    fields = fill_schema(fields_schema, caller) if fields_schema else {}
    out: dict[str, Any] = {}
    for key, prop in props.items():
        if key == "summary":
            if "book" in caller.lower():
                details = fill_schema(
                    {"properties": {"size": {"type": "integer"}, "time": {"type": "string"},
                                    "name": {"type": "string"}}},
                    caller,
                )  # fmt: skip
                what = "The caller asked to book a table"
                if "size" in details:
                    what += f" for {details['size']}"
                if "time" in details:
                    what += f" at {details['time']}"
                if "name" in details:
                    what += f" under the name {details['name']}"
            else:
                first = re.split(r"(?<=[.?!])\s", caller.strip(), maxsplit=1)[0]
                what = f'The caller said: "{first[:160]}"' if first else "The caller said nothing"
            outcome = "the agent confirmed it" if confirmed else "nothing was confirmed"
            out["summary"] = f"{what}; {outcome}."
        elif key == "fields":
            out["fields"] = fields
        elif key == "success" and isinstance(prop, dict):
            out["success"] = {
                "success": confirmed,
                "reason": "The agent confirmed the request."
                if confirmed
                else "The agent did not confirm anything.",
            }
        elif isinstance(prop, dict):
            out[key] = _default(_types(prop))
    return out


def _schema_of(config: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("responseJsonSchema", "response_json_schema", "responseSchema", "response_schema"):
        if isinstance(config.get(key), dict):
            return config[key]
    return None


# --- the HTTP side --------------------------------------------------------------------------


def _error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    name = _STATUS_NAMES.get(status, HTTPStatus(status).phrase.upper().replace(" ", "_"))
    return status, {"error": {"code": status, "message": message, "status": name}}


class FakeTextModel:
    """The generateContent endpoint's state: known models, queued faults, requests seen."""

    def __init__(self, api_key: str | None = None, models: frozenset[str] | None = None) -> None:
        self.api_key = api_key
        self.models = DEFAULT_TEXT_MODELS if models is None else models
        self.faults: deque[TextFault] = deque()
        self.requests: list[TextRequest] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    def fail_next(self, *faults: TextFault) -> None:
        self.faults.extend(faults)

    def _take_fault(self) -> TextFault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                self.faults.popleft()
        return fault

    async def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[TextRequest]:  # noqa: ASYNC109
        """Until `n` requests have been answered (or TimeoutError)."""
        async with asyncio.timeout(timeout):
            while sum(1 for r in self.requests if r.status) < n:
                changed = self._changed
                await changed.wait()
        return self.requests

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def respond(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[TextRequest, TextFault | None, int, dict[str, Any]]:
        """Everything but the waiting: the record, the fault taken, status and JSON body."""
        parts = urlsplit(target)
        m = _PATH.match(parts.path)
        key = headers.get("x-goog-api-key") or (parse_qs(parts.query).get("key") or [""])[0]
        rec = TextRequest(
            model=m["model"].removeprefix("models/") if m else None,
            api_version=m["v"] if m else None,
            has_api_key=bool(key),
            body=None,
        )
        self.requests.append(rec)
        if method != "POST" or m is None:
            return rec, None, *_error(404, f"Method not found: {parts.path[:200]}")
        if not key:
            return rec, None, *_error(403, "Method doesn't allow unregistered callers.")
        if self.api_key is not None and not secrets.compare_digest(key, self.api_key):
            return rec, None, *_error(400, "API key not valid. Please pass a valid API key.")
        assert rec.model is not None
        if rec.model not in self.models and not rec.model.startswith(SIM_MODEL_PREFIX):
            return rec, None, *_error(404, f"models/{rec.model} is not found for API version.")
        try:
            rec.body = orjson.loads(body)
        except orjson.JSONDecodeError:
            return rec, None, *_error(400, "Invalid JSON payload received.")
        if not isinstance(rec.body, dict) or not rec.body.get("contents"):
            return rec, None, *_error(400, "GenerateContentRequest.contents: not specified")
        config = rec.body.get("generationConfig") or {}
        schema = _schema_of(config)
        fault = self._take_fault()
        if fault is not None and fault.kind == "http":
            message = {429: "Resource has been exhausted (e.g. check quota)."}.get(
                fault.status, "Internal error encountered."
            )
            return rec, fault, *_error(fault.status, message)
        if fault is not None and fault.kind == "invalid_json":
            text = '{"summary": "The caller asked'  # cut off mid-answer
        elif fault is not None and fault.kind == "off_schema":
            text = orjson.dumps({"summary": 42, "fields": "none"}).decode()
        elif schema is not None and config.get("responseMimeType") == "application/json":
            text = orjson.dumps(analyse(rec.text, schema)).decode()
        else:
            text = "This is a simulated answer."
        rec.answer = text
        prompt_tokens = max(1, len(rec.text) // 4)
        answer_tokens = max(1, len(text) // 4)
        return (
            rec,
            fault,
            200,
            {
                "candidates": [
                    {
                        "content": {"role": "model", "parts": [{"text": text}]},
                        "finishReason": "STOP",
                        "index": 0,
                    }
                ],
                "usageMetadata": {
                    "promptTokenCount": prompt_tokens,
                    "candidatesTokenCount": answer_tokens,
                    "totalTokenCount": prompt_tokens + answer_tokens,
                },
                "modelVersion": rec.model,
                "responseId": secrets.token_urlsafe(12),
            },
        )

    async def serve(self, transport: asyncio.Transport, head: bytes, body: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        method, target, *_ = [*lines[0].split(" "), "", ""][:3]
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        rec, fault, status, payload = self.respond(method, target, headers, body)
        if fault is not None and fault.kind == "slow":
            if fault.release is None:
                await asyncio.sleep(fault.delay_s)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fault.release.wait(), fault.delay_s)
        rec.status = status
        data = orjson.dumps(payload)
        reason = HTTPStatus(status).phrase
        transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=UTF-8\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        transport.close()
        self._notify()

    def spawn(self, transport: asyncio.Transport, head: bytes, body: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self.serve(transport, head, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Sniffer(asyncio.Protocol):
    """First bytes ``POST``: an HTTP request for `text`; anything else: the WebSocket server's
    connection (`ws`), handed the transport and the bytes read so far."""

    def __init__(self, ws: asyncio.Protocol, text: FakeTextModel) -> None:
        self.ws = ws
        self.text = text
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: bytes | None = None
        self.length = 0
        self.done = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # what a stream protocol is given
        # a client that never says anything is dropped, as websockets' open_timeout would
        self.timer = asyncio.get_running_loop().call_later(OPEN_TIMEOUT_S, self._undecided)

    def _undecided(self) -> None:
        if not self.done and self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.done:
            return
        self.buffer += data
        early = len(self.buffer) < 5 and b"POST "[: len(self.buffer)] == self.buffer
        if self.head is None and early:
            return  # too early to tell
        if self.head is None and not self.buffer.startswith(b"POST "):
            self.transport.set_protocol(self.ws)
            self.ws.connection_made(self.transport)
            self.ws.data_received(bytes(self.buffer))
            self.done = True
            self.buffer.clear()
            if self.timer is not None:
                self.timer.cancel()
            return
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.close()
                return
            self.head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", self.head)
            self.length = int(m.group(1)) if m else 0
            if self.length > MAX_BODY:
                self.transport.close()
                return
        if len(self.buffer) >= self.length:
            self.done = True
            self.text.spawn(self.transport, self.head, bytes(self.buffer[: self.length]))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.buffer.clear()
