"""The end-of-call webhook contract, without I/O: payload, signature, retry schedule, links.

Everything here is a plain function of its arguments (the clock and the random source are
passed in), so the contract receivers code against is unit tested byte for byte. The I/O
(outbox rows, HTTP, the worker) lives in `livecall.outcomes.webhooks`.

The contract (README, "Webhooks"):

- ``POST`` of one JSON object per call (`build_payload`), ``Content-Type: application/json``.
- ``X-Livecall-Signature: sha256=<hex HMAC-SHA256 of the raw body with CALL_WEBHOOK_SECRET>``.
- ``X-Livecall-Delivery: <id>``: the same id on every attempt; receivers deduplicate on it.
- Retried on any non-2xx or timeout, exponential backoff from ~1 s (`backoff_delay`), capped,
  with jitter, until 24 h after the first attempt; then the delivery is ``failed``.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import orjson

__all__ = [
    "CARRIER",
    "DELIVERY_HEADER",
    "EVENT",
    "PAYLOAD_VERSION",
    "SIGNATURE_HEADER",
    "USER_AGENT",
    "LinkCheck",
    "backoff_delay",
    "build_payload",
    "derive_link_key",
    "encode_payload",
    "link_signature",
    "new_delivery_id",
    "next_attempt",
    "recording_link",
    "request_headers",
    "sample_payload",
    "sign_body",
    "verify_body",
    "verify_link",
]

PAYLOAD_VERSION = 1
EVENT = "call.ended"
CARRIER = "twilio"
SIGNATURE_HEADER = "X-Livecall-Signature"
DELIVERY_HEADER = "X-Livecall-Delivery"
USER_AGENT = "livecall-webhooks/1"
JITTER = 0.25  # each delay is the nominal one ±25 %


class CallLike(Protocol):
    """What `build_payload` reads from a stored call (a `store.models.Call` fits)."""

    call_sid: str
    direction: str
    from_number: str | None
    to_number: str | None
    profile: str | None
    model: str | None
    status: str
    started_at: datetime
    answered_at: datetime | None
    ended_at: datetime | None
    duration_s: float | None
    end_reason: str | None
    gemini_sessions: int
    prompt_tokens: int
    response_tokens: int
    total_tokens: int
    frames_in: int
    frames_out: int
    frames_missing: int
    turns: Any
    events: Any


def new_delivery_id() -> str:
    """A fresh delivery id: ``dlv_`` and 32 random hex digits."""
    return "dlv_" + secrets.token_hex(16)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _turn(turn: Any) -> dict[str, Any]:
    return {
        "index": turn.idx,
        "speaker": turn.speaker,
        "text": turn.text,
        # an agent turn the caller cut short: what they heard before the cut
        "heard_text": turn.heard_text,
        "interrupted": bool(turn.interrupted),
        "start_ms": turn.start_ms,
        "end_ms": turn.end_ms,
        "first_audio_latency_ms": turn.first_audio_latency_ms,
        "barge_in_stop_ms": turn.barge_in_stop_ms,
    }


def _event(event: Any) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "at_ms": event.at_ms,
        "kind": event.kind,
        "name": event.name,
        "duration_ms": event.duration_ms,
        "data": event.data or {},
    }


def build_payload(
    call: CallLike,
    *,
    delivery_id: str,
    recording: Mapping[str, Any] | None = None,
    analysis: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The webhook body for one stored call (with its turns and events loaded).

    `recording` is ``{"url", "expires_at"}`` from `recording_link` (None: no recording, or
    no link key configured); `analysis` is the post-call analysis when there is one.
    """
    turns: Iterable[Any] = call.turns or []
    events: Iterable[Any] = call.events or []
    turn_list = [_turn(t) for t in turns]
    answered_ms = None
    if call.answered_at is not None and call.started_at is not None:
        answered_ms = round((call.answered_at - call.started_at).total_seconds() * 1000)
    return {
        "event": EVENT,
        "version": PAYLOAD_VERSION,
        "delivery_id": delivery_id,
        "call_sid": call.call_sid,
        "carrier": CARRIER,
        "direction": call.direction,
        "from": call.from_number,
        "to": call.to_number,
        "profile": call.profile,
        "started_at": _iso(call.started_at),
        "answered_at": _iso(call.answered_at),
        "ended_at": _iso(call.ended_at),
        "duration_s": call.duration_s,
        "end_reason": call.end_reason,
        "status": call.status,
        "turns": turn_list,
        "events": [_event(e) for e in events],
        "latency": {
            "answer_ms": answered_ms,
            "turns": [
                {
                    "index": t["index"],
                    "first_audio_latency_ms": t["first_audio_latency_ms"],
                    "barge_in_stop_ms": t["barge_in_stop_ms"],
                }
                for t in turn_list
                if t["speaker"] == "agent"
            ],
        },
        "usage": {
            "model": call.model,
            "gemini_sessions": call.gemini_sessions,
            "prompt_tokens": call.prompt_tokens,
            "response_tokens": call.response_tokens,
            "total_tokens": call.total_tokens,
            "frames_in": call.frames_in,
            "frames_out": call.frames_out,
            "frames_missing": call.frames_missing,
        },
        "analysis": dict(analysis) if analysis is not None else None,
        "recording": dict(recording) if recording is not None else None,
    }


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes sent (compact UTF-8 JSON); the signature is over these."""
    return orjson.dumps(payload, default=str)


# --- signature ------------------------------------------------------------------------------


def sign_body(secret: str, body: bytes) -> str:
    """``sha256=`` and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_body(secret: str, body: bytes, header: str | None) -> bool:
    """What a receiver does (constant-time compare)."""
    return hmac.compare_digest(sign_body(secret, body), header or "")


def request_headers(secret: str, body: bytes, delivery_id: str) -> dict[str, str]:
    """Every header of a delivery attempt."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        SIGNATURE_HEADER: sign_body(secret, body),
        DELIVERY_HEADER: delivery_id,
    }


# --- retries --------------------------------------------------------------------------------


def backoff_delay(
    attempt: int, base_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    ``base_s * 2**(attempt-1)``, capped at `max_s`, then ±25 % jitter so receivers that come
    back are not hit by every sender at once (never above `max_s`).
    """
    nominal = min(max_s, base_s * 2 ** min(max(attempt, 1) - 1, 60))
    return min(max_s, nominal * (1 - JITTER + 2 * JITTER * rand()))


def next_attempt(
    attempt: int,
    now: datetime,
    give_up_at: datetime,
    base_s: float,
    max_s: float,
    rand: Callable[[], float] = random.random,
) -> datetime | None:
    """When to try again after failed attempt `attempt`; None once past `give_up_at`."""
    at = now + timedelta(seconds=backoff_delay(attempt, base_s, max_s, rand))
    return None if at > give_up_at else at


# --- recording links ------------------------------------------------------------------------

LinkCheck = str  # "ok", "expired" or "bad"


def derive_link_key(secret: str) -> bytes:
    """A key for recording links only: knowing a link never tells anything about `secret`."""
    return hmac.new(secret.encode(), b"livecall recording links v1", hashlib.sha256).digest()


def link_signature(key: bytes, call_sid: str, expires: int) -> str:
    message = f"recording\n{call_sid}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def recording_link(
    key: bytes, base_url: str, call_sid: str, now: datetime, ttl_s: float
) -> dict[str, Any]:
    """``{"url", "expires_at"}``: ``{base}/recordings/{sid}?exp=<unix>&sig=<hex>``."""
    expires = int(now.timestamp() + ttl_s)
    query = urlencode({"exp": expires, "sig": link_signature(key, call_sid, expires)})
    return {
        "url": f"{base_url.rstrip('/')}/recordings/{quote(call_sid, safe='')}?{query}",
        "expires_at": _iso(datetime.fromtimestamp(expires, UTC)),
    }


def verify_link(
    key: bytes, call_sid: str, expires: str | None, signature: str | None, now: datetime
) -> LinkCheck:
    """``ok``, ``expired`` (a genuine link past its time) or ``bad`` (anything else)."""
    if not expires or not signature or not expires.isdigit() or len(expires) > 12:
        return "bad"
    if not hmac.compare_digest(link_signature(key, call_sid, int(expires)), signature):
        return "bad"
    return "ok" if now.timestamp() <= int(expires) else "expired"


# --- a sample, for `livecall webhooks test` and the README ----------------------------------


class _Row:
    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def sample_payload(delivery_id: str, now: datetime) -> dict[str, Any]:
    """A realistic payload for a made-up call (what `livecall webhooks test` sends)."""
    start = now - timedelta(seconds=42)
    turn = _Row
    call = _Row(
        call_sid="CA00000000000000000000000000000000",
        direction="inbound",
        from_number="+15551230000",
        to_number="+15559870000",
        profile="front-desk",
        model="gemini-live",
        status="completed",
        started_at=start,
        answered_at=start + timedelta(milliseconds=850),
        ended_at=now,
        duration_s=42.0,
        end_reason="caller_hangup",
        gemini_sessions=1,
        prompt_tokens=812,
        response_tokens=164,
        total_tokens=976,
        frames_in=2100,
        frames_out=1400,
        frames_missing=0,
        turns=[
            turn(
                idx=0,
                speaker="agent",
                text="Thanks for calling, how can I help?",
                heard_text=None,
                interrupted=False,
                start_ms=850,
                end_ms=2600,
                first_audio_latency_ms=None,
                barge_in_stop_ms=None,
            ),
            turn(
                idx=1,
                speaker="caller",
                text="I'd like a table for four tomorrow at eight.",
                heard_text=None,
                interrupted=False,
                start_ms=3100,
                end_ms=5900,
                first_audio_latency_ms=None,
                barge_in_stop_ms=None,
            ),
            turn(
                idx=2,
                speaker="agent",
                text="Of course. A table for four tomorrow at eight, under which name?",
                heard_text=None,
                interrupted=False,
                start_ms=6420,
                end_ms=9100,
                first_audio_latency_ms=520.0,
                barge_in_stop_ms=None,
            ),
        ],
        events=[
            _Row(seq=0, at_ms=120, kind="session", name=None, duration_ms=None, data={}),
        ],
    )
    # `_Row` has every CallLike attribute, set at run time, so mypy cannot see them
    return build_payload(call, delivery_id=delivery_id)  # type: ignore[arg-type]
