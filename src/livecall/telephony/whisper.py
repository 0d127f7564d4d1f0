"""Warm transfers: what the person answering a transfer hears before the caller is connected.

The briefing (the agent's `summary`, else a fallback naming the line and the caller's number,
never transcript text) is kept here, behind an unguessable, short-lived, single-use token:
The carrier fetches ``/{carrier}/whisper/{token}`` when the callee answers (Twilio's and
Telnyx's ``<Number url>``, Plivo's ``<Dial confirmSound>``, Vonage's connect ``onAnswer``), and
the URL is all it and its logs ever see. The briefing is also stashed in the shared store
(Redis when configured, else the database: `store.claims_db`), so whichever worker or instance
the carrier reaches can answer, once.

A briefing is kept with the call it was minted for, its carrier and the profile's language
(`Briefing`): a token is answered only at its own carrier's route, and a fetch naming another
parent call than the one it was minted for is refused.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

from twilio.twiml.voice_response import VoiceResponse

from livecall.log import get_logger

__all__ = [
    "TRANSFER_ENDED_PATH",
    "WHISPER_PATH",
    "WHISPER_TTL_S",
    "Briefing",
    "SharedStash",
    "TransferPlan",
    "WarmTransfer",
    "Whispers",
    "after_dial_twiml",
    "clean_summary",
    "fallback_summary",
    "transfer_ended_path",
    "whisper_path",
    "whisper_twiml",
]

log = get_logger("livecall.whisper")

WHISPER_PATH = "/twilio/whisper"
TRANSFER_ENDED_PATH = "/twilio/transfer-ended"


def whisper_path(carrier: str) -> str:
    return f"/{carrier}/whisper"


def transfer_ended_path(carrier: str) -> str:
    return f"/{carrier}/transfer-ended"


#: `DialCallStatus` of a `<Dial>` whose callee took the call (and has now hung up).
CONNECTED = frozenset({"completed", "answered"})
#: Ringing plus answering: long enough for a person to pick up, short enough to be useless later.
WHISPER_TTL_S = 120.0
MAX_SUMMARY_CHARS = 400
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class SharedStash(Protocol):
    """One-shot values every worker and instance sees (`livecall.cluster` with Redis, else
    `store.claims_db.SharedClaims`)."""

    async def stash(self, key: str, value: str, ttl_s: float) -> bool: ...
    async def take(self, key: str) -> str | None: ...


def clean_summary(text: str | None) -> str | None:
    """The model's briefing as one spoken line (controls out, bounded); None when empty."""
    if not text:
        return None
    line = " ".join(_CONTROL.sub(" ", text).split())
    if len(line) > MAX_SUMMARY_CHARS:
        line = line[:MAX_SUMMARY_CHARS].rsplit(" ", 1)[0] + "…"
    return line or None


def fallback_summary(profile_name: str, caller_number: str | None, target: str) -> str:
    """A briefing that needs nothing said on the call: the line, the number, the target."""
    digits = "".join(c for c in caller_number or "" if c.isdigit())
    who = f"a caller from {' '.join(digits)}" if digits else "a caller"
    return f"Transfer from the {profile_name} line: {who} asked for {target}."


def whisper_twiml(text: str, language: str | None = None) -> str:
    """What the callee hears before being bridged: the briefing, said once (in the profile's
    language when it has one; Twilio's voices are not the agent's, so no voice is named)."""
    response = VoiceResponse()
    response.say(text, **({"language": language} if language else {}))
    return str(response)


@dataclass(frozen=True)
class Briefing:
    """A stored briefing: what is said, and whose it is (empty: unbound, as tests mint)."""

    text: str
    call_id: str = ""
    carrier: str = ""
    language: str | None = None

    def dumps(self) -> str:
        return json.dumps(
            {"t": self.text, "c": self.call_id, "k": self.carrier, "l": self.language},
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, value: str) -> Briefing:
        """A stored briefing (plain text: an unbound one)."""
        try:
            data = json.loads(value)
        except ValueError:
            return cls(value)
        if not isinstance(data, dict) or not isinstance(data.get("t"), str):
            return cls(value)
        language = data.get("l")
        return cls(
            data["t"],
            str(data.get("c") or ""),
            str(data.get("k") or ""),
            language if isinstance(language, str) and language else None,
        )

    def refusal(self, carrier: str, parent_call: str | None) -> str | None:
        """Why this briefing may not be played on `carrier`'s fetch naming `parent_call`."""
        if self.carrier and self.carrier != carrier:
            return "minted for another carrier"
        if self.call_id and parent_call is not None and parent_call != self.call_id:
            return "minted for another call"
        return None


def after_dial_twiml(dial_status: str, no_answer_message: str | None) -> str:
    """The caller's TwiML once a warm transfer's `<Dial>` ends (its `action`): hang up after a
    conversation; say `no_answer_message` first when no one took the call (no answer, busy,
    failed, or the callee hung up on the briefing)."""
    response = VoiceResponse()
    if dial_status not in CONNECTED and no_answer_message:
        response.say(no_answer_message)
    response.hangup()
    return str(response)


@dataclass
class _Held:
    text: str
    expires: float
    shared: bool


@dataclass
class Whispers:
    """Briefings by token: kept here, and in the shared stash when there is one.

    When the stash took a briefing it is the one truth (Redis's GETDEL, the database's DELETE
    … RETURNING: once across workers and instances); the local copy only serves when the
    stash could not keep it or cannot answer.
    """

    shared: SharedStash | None = None
    ttl_s: float = WHISPER_TTL_S
    clock: Callable[[], float] = time.monotonic
    _held: dict[str, _Held] = field(default_factory=dict)
    # the shared stash's key prefix: another kind of single-use document keeps its own
    # (a Plivo transfer's XML), so no token of one kind fetches the other
    prefix: str = "whisper"

    def _prune(self, now: float) -> None:
        for token in [t for t, h in self._held.items() if h.expires <= now]:
            del self._held[token]

    async def put(self, text: str) -> str:
        """Keeps `text` and returns the token that fetches it once."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        self._prune(now)
        shared = False
        if self.shared is not None:
            shared = await self.shared.stash(f"{self.prefix}:{token}", text, self.ttl_s)
        self._held[token] = _Held(text, now + self.ttl_s, shared)
        return token

    async def take(self, token: str) -> str | None:
        """The briefing for `token`, at most once and only before it expires."""
        if not _TOKEN.match(token):
            return None
        now = self.clock()
        self._prune(now)
        held = self._held.pop(token, None)
        if held is not None and not held.shared:
            return held.text
        if self.shared is None:
            return None
        try:
            return await self.shared.take(f"{self.prefix}:{token}")
        except LookupError:  # the stash cannot say: this process's copy, if it has one
            return held.text if held is not None else None


@dataclass(frozen=True)
class TransferPlan:
    """What the redirect TwiML says and dials for one transfer."""

    say: str | None = None
    whisper_url: str | None = None
    dial_action: str | None = None


@dataclass
class WarmTransfer:
    """One call's warm transfers: a briefing minted per transfer, its URL in the TwiML."""

    whispers: Whispers
    public_base: str
    profile_name: str
    caller_number: str | None
    hold_message: str | None
    carrier: str = "twilio"
    call_id: str = ""
    language: str | None = None

    async def plan(self, target: str, summary: str | None) -> TransferPlan:
        """Mints this transfer's briefing; the TwiML gets only its URL and the dial's action."""
        briefing = clean_summary(summary)
        text = briefing or fallback_summary(self.profile_name, self.caller_number, target)
        stored = Briefing(text, self.call_id, self.carrier, self.language)
        token = await self.whispers.put(stored.dumps())
        log.info("transfer.whisper_ready", target=target, from_model=briefing is not None)
        base = self.public_base.rstrip("/")
        return TransferPlan(
            say=self.hold_message,
            whisper_url=f"{base}{whisper_path(self.carrier)}/{token}",
            dial_action=f"{base}{transfer_ended_path(self.carrier)}"
            f"?profile={quote(self.profile_name)}",
        )
