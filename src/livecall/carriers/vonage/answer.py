"""The NCCO livecall answers Vonage's answer webhook with, and what that webhook carries.

Vonage asks the application's `answer_url` what to do with a call (GET with query parameters
by default, or POST with a JSON body) and runs the returned NCCO, a JSON array of actions
(https://developer.vonage.com/en/voice/voice-api/ncco-reference). livecall answers with one
`connect` action whose endpoint is a `websocket`: Vonage then opens that socket, streams L16
audio both ways, and echoes the endpoint's `headers` in its first message
(`websocket:connected`): that is where the per-call token and profile travel, along with the
call's own uuid and numbers (the socket carries no call id of its own). The endpoint asks for
Vonage's signed handshake (`"authorization": {"type": "vonage"}`): the upgrade then carries
`Authorization: Bearer <JWT>` signed with the signature secret, which a replayed NCCO cannot
supply. When the socket
closes the `connect` action ends, and with nothing after it the NCCO, hence the call, ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from livecall.carriers.vonage.wire import CALL_HEADER_KEYS, content_type_for

__all__ = [
    "MAX_HEADERS_BYTES",
    "AnswerRequest",
    "VonageEvent",
    "busy_ncco",
    "connect_websocket_ncco",
    "ncco_json",
    "parse_answer_request",
    "parse_event",
]

# The documented limit of the websocket endpoint's `headers` (serialized JSON).
MAX_HEADERS_BYTES = 512


@dataclass(frozen=True, slots=True)
class AnswerRequest:
    """What the answer webhook says about the call (GET query or POST JSON body)."""

    uuid: str
    conversation_uuid: str
    from_number: str
    to_number: str
    region_url: str | None = None  # the API region to send this call's REST control to


def parse_answer_request(method: str, url: str, body: bytes = b"") -> AnswerRequest:
    """Read the answer webhook's call fields; ValueError if a required one is missing."""
    if method.upper() == "GET":
        fields: Mapping[str, Any] = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    else:
        try:
            loaded = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            raise ValueError("the answer webhook's body is not JSON") from None
        if type(loaded) is not dict:
            raise ValueError("the answer webhook's body must be a JSON object")
        fields = loaded

    def get(key: str, required: bool = True) -> str:
        value = fields.get(key)
        if value is None or value == "":
            if required:
                raise ValueError(f"the answer webhook lacks {key!r}")
            return ""
        return str(value)

    return AnswerRequest(
        uuid=get("uuid"),
        conversation_uuid=get("conversation_uuid", required=False),
        from_number=get("from", required=False),
        to_number=get("to", required=False),
        region_url=get("region_url", required=False) or None,
    )


@dataclass(frozen=True, slots=True)
class VonageEvent:
    """One event webhook: which leg (`uuid`) reached which `status` (started, answered…)."""

    uuid: str
    status: str
    conversation_uuid: str = ""
    direction: str = ""


def parse_event(body: bytes, query: str = "") -> VonageEvent:
    """Read an event webhook: its JSON body (POST), or its query string (an application set
    to send events by GET); ValueError if it names no leg.

    Vonage sends more kinds than call statuses (transfer, input, recording…); those have no
    `status` and are read as status "" rather than refused.
    """
    loaded: Any
    if not body and query:
        loaded = dict(parse_qsl(query, keep_blank_values=True))
    else:
        try:
            loaded = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            raise ValueError("the event webhook's body is not JSON") from None
    if type(loaded) is not dict:
        raise ValueError("the event webhook's body must be a JSON object")
    uuid = loaded.get("uuid") or loaded.get("call_uuid")
    if type(uuid) is not str or not uuid:
        raise ValueError("the event webhook lacks 'uuid'")
    status = loaded.get("status")
    conversation = loaded.get("conversation_uuid")
    direction = loaded.get("direction")
    return VonageEvent(
        uuid=uuid,
        status=status if type(status) is str else "",
        conversation_uuid=conversation if type(conversation) is str else "",
        direction=direction if type(direction) is str else "",
    )


def _check_ws_uri(uri: str) -> None:
    parts = urlsplit(uri)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"a websocket endpoint uri must be absolute ws(s)://, got {uri!r}")
    if parts.fragment:
        raise ValueError(f"a websocket endpoint uri must not carry a fragment, got {uri!r}")


def connect_websocket_ncco(
    stream_url: str,
    parameters: Mapping[str, str],
    *,
    sample_rate: int = 16000,
    call: AnswerRequest | None = None,
    event_url: str | None = None,
    synchronous_events: bool = False,
    talk_first: str | None = None,
    ws_authorization: str | None = None,
    vonage_authorization: bool = False,
) -> list[dict[str, Any]]:
    """The NCCO connecting the call to `stream_url`, per-call values in the endpoint headers.

    `parameters` (token, profile…) come back as top-level fields of `websocket:connected`; with
    `call`, its uuid, conversation uuid and numbers ride along under `call_uuid`,
    `conversation_uuid`, `from`, `to`. `synchronous_events` lets the event webhook answer a
    failed or dropped socket with a fallback NCCO.

    The endpoint's `authorization` sets the `Authorization` header of the WebSocket opening
    handshake, so the upgrade itself can be refused before any audio flows:
    `vonage_authorization` (`{"type": "vonage"}`) has Vonage send `Bearer <JWT>`, the signed
    webhooks' JWT (HS256 over the signature secret, fresh `iat` and `jti` per handshake);
    `ws_authorization` (`{"type": "custom", "value": …}`) has it send that value verbatim.
    Only the first proves the upgrade comes from Vonage: a custom value is in the NCCO, so
    whoever holds the NCCO holds it too.
    """
    _check_ws_uri(stream_url)
    headers: dict[str, str] = {}
    for name, value in parameters.items():
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise ValueError(f"header names and values must be non-empty strings, got {name!r}")
        if name in CALL_HEADER_KEYS or name in ("event", "content-type"):
            raise ValueError(f"header name {name!r} is reserved")
        headers[name] = value
    if call is not None:
        headers["call_uuid"] = call.uuid
        if call.conversation_uuid:
            headers["conversation_uuid"] = call.conversation_uuid
        if call.from_number:
            headers["from"] = call.from_number
        if call.to_number:
            headers["to"] = call.to_number
    size = len(orjson.dumps(headers))
    if size > MAX_HEADERS_BYTES:
        raise ValueError(f"websocket headers take {size} bytes; Vonage allows {MAX_HEADERS_BYTES}")
    endpoint: dict[str, Any] = {
        "type": "websocket",
        "uri": stream_url,
        "content-type": content_type_for(sample_rate),
        "headers": headers,
    }
    if vonage_authorization and ws_authorization is not None:
        raise ValueError("one websocket authorization: vonage or custom, not both")
    if vonage_authorization:
        endpoint["authorization"] = {"type": "vonage"}
    if ws_authorization is not None:
        if not ws_authorization or any(c in ws_authorization for c in "\r\n"):
            raise ValueError("ws_authorization must be a non-empty single-line header value")
        endpoint["authorization"] = {"type": "custom", "value": ws_authorization}
    connect: dict[str, Any] = {"action": "connect", "endpoint": [endpoint]}
    if event_url is not None:
        connect["eventUrl"] = [event_url]
    if synchronous_events:
        connect["eventType"] = "synchronous"
    ncco: list[dict[str, Any]] = []
    if talk_first:
        ncco.append({"action": "talk", "text": talk_first})
    ncco.append(connect)
    return ncco


def busy_ncco(message: str | None) -> list[dict[str, Any]]:
    """Turn a call away: speak `message` (if any), then the NCCO ends and so does the call.

    Vonage has no reject-with-busy for an answered webhook: an empty NCCO just hangs up.
    """
    return [{"action": "talk", "text": message}] if message else []


def ncco_json(ncco: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """(body, content type) of an NCCO for the webhook response."""
    return orjson.dumps(list(ncco)).decode(), "application/json"
