"""The Vonage calls this process answered: where to send their control, which call an event is.

Vonage's answer webhook names the call's `region_url` (the API region its REST control should
go to) and its `conversation_uuid`; the stream's start repeats only the call's uuid, and the
websocket leg's events carry the leg's own uuid with the conversation's. `CallDirectory`
keeps what the answer webhook said, keyed by the call's uuid (and its conversation's), for a
bounded time and number of calls, so the call's control and its events find it later.
`shared_form`/`from_shared` put a call in words for the store every worker and instance
shares: the stream (and its control) may reach another worker than the answer webhook did.

Sans I/O: the caller passes the monotonic clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from livecall.carriers.vonage.answer import AnswerRequest

__all__ = ["CallDirectory", "KnownCall", "from_shared", "region_base", "shared_form"]

# the hosts Vonage's API regions live on (api-us-3.vonage.com, api.nexmo.com…)
_VONAGE_DOMAINS = ("vonage.com", "nexmo.com")


@dataclass(frozen=True, slots=True)
class KnownCall:
    """What the answer webhook said about one call."""

    uuid: str
    conversation_uuid: str
    region_url: str | None  # a base URL the call's control may use (see `region_base`)
    at: float  # monotonic, when it was answered
    # the number the caller rang (the application's own): a transfer's caller id, since a
    # `connect` to a phone must come from one of the account's numbers
    line_number: str = ""


def shared_form(known: KnownCall) -> str:
    """What another worker needs of a known call, as JSON (no clock: each keeps its own)."""
    fields = {
        "conversation_uuid": known.conversation_uuid,
        "region_url": known.region_url,
        "line_number": known.line_number,
    }
    return orjson.dumps(fields).decode()


def from_shared(uuid: str, text: str, now: float) -> KnownCall | None:
    """A call `shared_form` wrote, known here from `now`; None if the text is not one."""
    try:
        fields = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if type(fields) is not dict:
        return None
    conversation, region, line = (
        fields.get("conversation_uuid"),
        fields.get("region_url"),
        fields.get("line_number"),
    )
    if type(conversation) is not str or type(line) is not str:
        return None
    if region is not None and type(region) is not str:
        return None
    return KnownCall(uuid, conversation, region, now, line)


def region_base(region_url: str | None, api_base: str) -> str | None:
    """`region_url` as a base URL to send the call's control to, or None to use `api_base`.

    The application's JWT goes only to https on Vonage's own domains, or to the origin of
    the configured `api_base` (a fake in tests): a region URL naming anything else is ignored.
    """
    if not region_url:
        return None
    parts = urlsplit(region_url)
    host = (parts.hostname or "").lower()
    if parts.query or parts.fragment or parts.username or parts.password or not host:
        return None
    base = urlsplit(api_base)
    same_origin = (parts.scheme, parts.netloc.lower()) == (base.scheme, base.netloc.lower())
    vonage = parts.scheme == "https" and any(
        host == d or host.endswith("." + d) for d in _VONAGE_DOMAINS
    )
    if not (same_origin or vonage):
        return None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class CallDirectory:
    """Calls by uuid for `ttl_s` after their answer, at most `max_calls` of them (the oldest
    go first); a conversation's uuid leads to its call."""

    def __init__(self, *, ttl_s: float, max_calls: int = 10_000) -> None:
        if ttl_s <= 0 or max_calls <= 0:
            raise ValueError("ttl_s and max_calls must be positive")
        self.ttl_s = ttl_s
        self.max_calls = max_calls
        self._calls: OrderedDict[str, KnownCall] = OrderedDict()
        self._conversations: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def answered(self, call: AnswerRequest, now: float) -> KnownCall:
        """Remember a call its answer webhook named (again: the newest answer wins)."""
        known = KnownCall(call.uuid, call.conversation_uuid, call.region_url, now, call.to_number)
        return self.add(known, now)

    def add(self, known: KnownCall, now: float) -> KnownCall:
        """Remember `known` (answered here, or learned from another worker)."""
        self._expire(now)
        self._forget(known.uuid)
        self._calls[known.uuid] = known
        if known.conversation_uuid:
            self._conversations[known.conversation_uuid] = known.uuid
        while len(self._calls) > self.max_calls:
            self._forget(next(iter(self._calls)))
        return known

    def get(self, uuid: str, now: float) -> KnownCall | None:
        self._expire(now)
        return self._calls.get(uuid)

    def for_event(self, uuid: str, conversation_uuid: str, now: float) -> KnownCall | None:
        """The call an event is about: its own uuid, or (a leg of it) its conversation's."""
        self._expire(now)
        known = self._calls.get(uuid)
        if known is None and conversation_uuid:
            call_uuid = self._conversations.get(conversation_uuid)
            known = self._calls.get(call_uuid) if call_uuid is not None else None
        return known

    def _forget(self, uuid: str) -> None:
        known = self._calls.pop(uuid, None)
        if known is not None and self._conversations.get(known.conversation_uuid) == uuid:
            del self._conversations[known.conversation_uuid]

    def _expire(self, now: float) -> None:
        while self._calls:
            oldest = next(iter(self._calls.values()))
            if now - oldest.at <= self.ttl_s:
                return
            self._forget(oldest.uuid)
