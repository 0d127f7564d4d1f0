"""Gemini Live (BidiGenerateContent) messages as plain values: no sockets here.

The official SDK opens the session (endpoint, auth, the `setup` frame); the per-frame traffic
of a call goes through this module instead of the SDK's pydantic models, because turning one
20 ms audio message into a `LiveServerMessage` costs ~40 µs and the same work with orjson and
`binascii` costs ~5 µs (see `bench/gemini_wire.py`). What goes on the wire is exactly what
the SDK would send: the same keys, standard base64, text frames.

Server messages are parsed tolerantly: snake_case or camelCase keys, standard or URL-safe
base64 with or without padding, several parts in one message, unknown fields ignored.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

__all__ = [
    "AgentAudio",
    "AgentTranscript",
    "CallerInterim",
    "CallerTranscript",
    "GenerationComplete",
    "GoAway",
    "InteractionStatus",
    "Interrupted",
    "LiveEvent",
    "LiveProtocolError",
    "ResumptionUpdate",
    "SetupComplete",
    "ToolCall",
    "ToolCallCancellation",
    "TurnComplete",
    "Usage",
    "WaitingForInput",
    "audio_message",
    "audio_message_utf8",
    "audio_stream_end_message",
    "client_text_turn_message",
    "parse_server_message",
    "text_message",
    "tool_response_message",
    "turn_complete_message",
    "turn_failed",
]


class LiveProtocolError(ValueError):
    """A server frame that is not a Gemini Live message."""


@dataclass(slots=True)
class SetupComplete:
    session_id: str | None = None


@dataclass(slots=True)
class AgentAudio:
    pcm: bytes  # PCM16LE mono
    rate: int = 24000


@dataclass(slots=True)
class AgentTranscript:
    text: str


@dataclass(slots=True)
class CallerTranscript:
    text: str


@dataclass(slots=True)
class CallerInterim:
    """`interimInputTranscription`: a low-latency guess at the words the caller is saying now,
    replaced by the next guess and superseded by the final `inputTranscription`."""

    text: str


@dataclass(slots=True)
class Interrupted:
    pass


@dataclass(slots=True)
class WaitingForInput:
    """`waitingForInput`: the model holds its answer because the caller seems to go on."""


class InteractionStatus(StrEnum):
    """`interactionStatus`, sent alongside `turnComplete`. An unknown value reads as
    UNSPECIFIED (what an absent one means); the deprecated REQUIRES_ACTION as IDLE."""

    UNSPECIFIED = "INTERACTION_STATUS_UNSPECIFIED"
    IN_PROGRESS = "IN_PROGRESS"  # more model output may follow (background work, tool results)
    IDLE = "IDLE"  # all processing done


# turnCompleteReason values that are not a failure of the turn (anything else is one: an
# unknown future reason on a turn with no answer is safer re-prompted than left silent)
_NOT_FAILED = frozenset({"TURN_COMPLETE_REASON_UNSPECIFIED", "NEED_MORE_INPUT"})
# the proto enum's numbers, for a server that sends them as numbers
_REASON_NUMBERS = (
    "TURN_COMPLETE_REASON_UNSPECIFIED",
    "MALFORMED_FUNCTION_CALL",
    "RESPONSE_REJECTED",
    "NEED_MORE_INPUT",
    "PROHIBITED_INPUT_CONTENT",
)
_STATUS_NUMBERS = ("INTERACTION_STATUS_UNSPECIFIED", "IN_PROGRESS", "REQUIRES_ACTION", "IDLE")


def turn_failed(reason: str | None) -> bool:
    """Whether a `turnCompleteReason` says the model failed to answer (MALFORMED_FUNCTION_CALL,
    RESPONSE_REJECTED, PROHIBITED_INPUT_CONTENT, ...); None, UNSPECIFIED and NEED_MORE_INPUT
    are not failures."""
    return reason is not None and reason not in _NOT_FAILED


@dataclass(slots=True)
class GenerationComplete:
    pass


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    response_tokens: int = 0
    total_tokens: int = 0


@dataclass(slots=True)
class TurnComplete:
    usage: Usage | None = None
    reason: str | None = None  # `turnCompleteReason`'s enum name (unknown names kept as sent)
    status: InteractionStatus = InteractionStatus.UNSPECIFIED

    @property
    def failed(self) -> bool:
        return turn_failed(self.reason)

    @property
    def in_progress(self) -> bool:
        return self.status is InteractionStatus.IN_PROGRESS


@dataclass(slots=True)
class FunctionCall:
    id: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ToolCall:
    calls: list[FunctionCall]


@dataclass(slots=True)
class ToolCallCancellation:
    ids: list[str]


@dataclass(slots=True)
class GoAway:
    time_left_s: float | None


@dataclass(slots=True)
class ResumptionUpdate:
    handle: str | None
    resumable: bool


@dataclass(slots=True)
class UsageOnly:
    usage: Usage


LiveEvent = (
    SetupComplete
    | AgentAudio
    | AgentTranscript
    | CallerTranscript
    | CallerInterim
    | Interrupted
    | WaitingForInput
    | GenerationComplete
    | TurnComplete
    | ToolCall
    | ToolCallCancellation
    | GoAway
    | ResumptionUpdate
    | UsageOnly
)

# --------------------------------------------------------------------------- client -> server

_AUDIO_PREFIX = b'{"realtimeInput":{"audio":{"data":"'
_AUDIO_SUFFIX_16K = b'","mimeType":"audio/pcm;rate=16000"}}}'


def audio_message(pcm: bytes, rate: int = 16000) -> str:
    """A `realtimeInput.audio` frame: the one message sent ~50 times a second per call."""
    return audio_message_utf8(pcm, rate).decode("ascii")


def audio_message_utf8(pcm: bytes, rate: int = 16000) -> bytes:
    """`audio_message` as the UTF-8 bytes a text frame carries: no str made to be encoded."""
    suffix = (
        _AUDIO_SUFFIX_16K
        if rate == 16000
        else b'","mimeType":"audio/pcm;rate=' + str(rate).encode() + b'"}}}'
    )
    return _AUDIO_PREFIX + binascii.b2a_base64(pcm, newline=False) + suffix


def audio_stream_end_message() -> str:
    return '{"realtimeInput":{"audioStreamEnd":true}}'


def text_message(text: str) -> str:
    """Realtime text: what the caller did that is not speech (keypad digits, a nudge)."""
    return orjson.dumps({"realtimeInput": {"text": text}}).decode()


def client_text_turn_message(text: str, *, turn_complete: bool = True) -> str:
    """A complete user turn in text (e.g. the cue that makes the agent greet first)."""
    return orjson.dumps(
        {
            "clientContent": {
                "turns": [{"role": "user", "parts": [{"text": text}]}],
                "turnComplete": turn_complete,
            }
        }
    ).decode()


def turn_complete_message() -> str:
    """`clientContent` with no new turns that completes the one left open (`turnComplete`)."""
    return '{"clientContent":{"turnComplete":true}}'


def tool_response_message(responses: list[dict[str, Any]]) -> str:
    """`responses`: [{"id", "name", "response": {...}}, ...] (optionally "scheduling")."""
    return orjson.dumps({"toolResponse": {"functionResponses": responses}}).decode()


# --------------------------------------------------------------------------- server -> client

_DURATION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)s\s*$")
_RATE_RE = re.compile(r"rate=(\d+)")


def _get(d: dict[str, Any], camel: str, snake: str) -> Any:
    value = d.get(camel)
    if value is None:
        value = d.get(snake)
    return value


def decode_b64(data: str | bytes) -> bytes:
    """Standard or URL-safe base64, padded or not (proto JSON accepts all of them)."""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        pass
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    text = text.strip().replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as exc:
        raise LiveProtocolError(f"inline audio is not valid base64: {exc}") from None


def parse_duration_s(value: Any) -> float | None:
    """Protobuf Duration JSON ("50s", "1.5s") or a bare number."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):  # {"seconds": 50, "nanos": 0}
        return float(value.get("seconds", 0)) + float(value.get("nanos", 0)) / 1e9
    match = _DURATION_RE.match(str(value))
    return float(match.group(1)) if match else None


def _usage(raw: dict[str, Any] | None) -> Usage | None:
    if not raw:
        return None
    return Usage(
        prompt_tokens=int(_get(raw, "promptTokenCount", "prompt_token_count") or 0),
        # Vertex AI names the output side "candidates" (the Developer API: "response")
        response_tokens=int(
            _get(raw, "responseTokenCount", "response_token_count")
            or _get(raw, "candidatesTokenCount", "candidates_token_count")
            or 0
        ),
        total_tokens=int(_get(raw, "totalTokenCount", "total_token_count") or 0),
    )


def _enum_name(value: Any, numbers: tuple[str, ...]) -> str | None:
    """A proto enum as JSON: its name (any case), or its number; None when absent or junk."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return numbers[value] if 0 <= value < len(numbers) else f"{numbers[0]}_{value}"
    if isinstance(value, str) and value.strip():
        return value.strip().upper()
    return None


def _status(value: Any) -> InteractionStatus:
    name = _enum_name(value, _STATUS_NUMBERS)
    if name == "REQUIRES_ACTION":  # deprecated: "use IDLE instead"
        return InteractionStatus.IDLE
    if name is None:
        return InteractionStatus.UNSPECIFIED
    try:
        return InteractionStatus(name)
    except ValueError:
        return InteractionStatus.UNSPECIFIED


def _server_content(content: dict[str, Any], usage: Usage | None, out: list[LiveEvent]) -> bool:
    """Appends the events of one serverContent; returns whether usage was attached."""
    interim = _get(content, "interimInputTranscription", "interim_input_transcription")
    if isinstance(interim, dict) and interim.get("text"):
        out.append(CallerInterim(str(interim["text"])))
    input_tr = _get(content, "inputTranscription", "input_transcription")
    if input_tr and input_tr.get("text"):
        out.append(CallerTranscript(input_tr["text"]))
    if content.get("interrupted"):
        out.append(Interrupted())
    model_turn = _get(content, "modelTurn", "model_turn")
    if model_turn:
        for part in model_turn.get("parts") or ():
            inline = _get(part, "inlineData", "inline_data")
            if inline:
                mime = _get(inline, "mimeType", "mime_type") or ""
                if not mime.startswith("audio/"):
                    continue
                data = inline.get("data")
                if not data:
                    continue
                rate_match = _RATE_RE.search(mime)
                rate = int(rate_match.group(1)) if rate_match else 24000
                out.append(AgentAudio(decode_b64(data), rate))
    output_tr = _get(content, "outputTranscription", "output_transcription")
    if output_tr and output_tr.get("text"):
        out.append(AgentTranscript(output_tr["text"]))
    if _get(content, "generationComplete", "generation_complete"):
        out.append(GenerationComplete())
    if _get(content, "waitingForInput", "waiting_for_input") is True:
        out.append(WaitingForInput())
    if _get(content, "turnComplete", "turn_complete"):
        reason = _enum_name(
            _get(content, "turnCompleteReason", "turn_complete_reason"), _REASON_NUMBERS
        )
        status = _status(_get(content, "interactionStatus", "interaction_status"))
        out.append(TurnComplete(usage, reason, status))
        return True
    return False


def parse_server_message(data: str | bytes) -> list[LiveEvent]:
    """One server frame (text or binary UTF-8 JSON) -> its events, in the order to act on them."""
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise LiveProtocolError(f"server frame is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise LiveProtocolError("server frame is not a JSON object")
    events: list[LiveEvent] = []
    usage = _usage(_get(msg, "usageMetadata", "usage_metadata"))
    usage_attached = False
    content = _get(msg, "serverContent", "server_content")
    if content:
        usage_attached = _server_content(content, usage, events)
    tool_call = _get(msg, "toolCall", "tool_call")
    if tool_call:
        calls = [
            FunctionCall(
                id=str(fc.get("id") or ""),
                name=str(fc.get("name") or ""),
                args=fc.get("args") or {},
            )
            for fc in _get(tool_call, "functionCalls", "function_calls") or ()
        ]
        events.append(ToolCall(calls))
    cancellation = _get(msg, "toolCallCancellation", "tool_call_cancellation")
    if cancellation:
        events.append(ToolCallCancellation([str(i) for i in cancellation.get("ids") or ()]))
    resumption = _get(msg, "sessionResumptionUpdate", "session_resumption_update")
    if resumption is not None:
        events.append(
            ResumptionUpdate(
                handle=_get(resumption, "newHandle", "new_handle"),
                resumable=bool(resumption.get("resumable")),
            )
        )
    go_away = _get(msg, "goAway", "go_away")
    if go_away is not None:
        events.append(GoAway(parse_duration_s(_get(go_away, "timeLeft", "time_left"))))
    setup = _get(msg, "setupComplete", "setup_complete")
    if setup is not None:
        events.append(SetupComplete(_get(setup, "sessionId", "session_id")))
    if usage is not None and not usage_attached:
        events.append(UsageOnly(usage))
    return events
