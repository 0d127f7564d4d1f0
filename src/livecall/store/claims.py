"""Single-use claims and short-lived shared values, in memory (sans I/O).

A *claim* names an owner for a key of some kind (an outbound stream token's reference, a
signed webhook's `jti` or nonce) until it expires: the first owner keeps it, the same owner
may present it again (a stream reconnecting), any other owner is refused. A *value* is a
short-lived fact one request learned and a later one needs (what Vonage's answer webhook said
about a call, for its REST control).

`LocalClaims` is the logic for one process, sans I/O: time is passed in (unix seconds).
`store.claims_db.SharedClaims` keeps the same in the database every worker and instance
shares, with a `LocalClaims` in front and as its fallback when the database cannot answer;
`MemoryClaims` is the thin async shell over a `LocalClaims` alone (tests, an app built
without a database).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "MAX_KEY_CHARS",
    "ClaimStore",
    "LocalClaims",
    "MemoryClaims",
    "storage_key",
]

MAX_KEY_CHARS = 128  # longer keys are stored as their SHA-256 (the column's width)
MAX_KIND_CHARS = 32
DEFAULT_MAX_ENTRIES = 100_000


def storage_key(key: str) -> str:
    """`key` as stored: itself when short enough, else a digest of it (same key, same row)."""
    if len(key) <= MAX_KEY_CHARS:
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class ClaimStore(Protocol):
    """What the routes use: claims and values for `ttl_s` seconds from now."""

    async def claim(self, kind: str, key: str, owner: str, ttl_s: float) -> bool:
        """True if `owner` holds `key` (it claimed it now, or had before); False: another."""
        ...

    async def first_use(self, kind: str, key: str, ttl_s: float) -> bool:
        """True the first time `key` is presented within `ttl_s`, False for any repeat."""
        ...

    async def put(self, kind: str, key: str, value: str, ttl_s: float) -> None:
        """Keep `value` under `key` (the newest wins) for `ttl_s`."""
        ...

    async def get(self, kind: str, key: str) -> str | None:
        """The value under `key`, unless it expired or was never put."""
        ...


@dataclass(slots=True)
class _Entry:
    owner: str
    value: str | None
    until: float


class LocalClaims:
    """Claims and values of one process, bounded (the oldest entries go first when full)."""

    __slots__ = ("_entries", "max_entries")

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def owner(self, kind: str, key: str, now: float) -> str | None:
        """Who holds `key` now, if anyone (an expired claim is nobody's)."""
        entry = self._live(kind, key, now)
        return entry.owner if entry is not None else None

    def claim(self, kind: str, key: str, owner: str, until: float, now: float) -> bool:
        """`owner` claims `key` until `until` unless someone else holds it; True if it holds."""
        entry = self._live(kind, key, now)
        if entry is not None:
            return hmac.compare_digest(entry.owner.encode(), owner.encode())
        self._set(kind, key, _Entry(owner, None, until), now)
        return True

    def held_by(self, kind: str, key: str, owner: str, until: float, now: float) -> None:
        """Record what the shared store answered: `owner` holds `key` until `until`."""
        self._set(kind, key, _Entry(owner, None, until), now)

    def put(self, kind: str, key: str, value: str, until: float, now: float) -> None:
        self._set(kind, key, _Entry("", value, until), now)

    def get(self, kind: str, key: str, now: float) -> str | None:
        entry = self._live(kind, key, now)
        return entry.value if entry is not None else None

    def _live(self, kind: str, key: str, now: float) -> _Entry | None:
        entry = self._entries.get((kind, storage_key(key)))
        if entry is None or entry.until < now:
            return None
        return entry

    def _set(self, kind: str, key: str, entry: _Entry, now: float) -> None:
        entries = self._entries
        name = (kind, storage_key(key))
        entries.pop(name, None)
        entries[name] = entry
        # the oldest first: expired ones, and any beyond the bound
        while entries:
            oldest = next(iter(entries.values()))
            if oldest.until >= now and len(entries) <= self.max_entries:
                break
            entries.popitem(last=False)


class MemoryClaims:
    """`ClaimStore` over a `LocalClaims` only: one process's view (tests, no database)."""

    def __init__(self, local: LocalClaims | None = None, clock: Callable[[], float] = time.time):
        self.local = local if local is not None else LocalClaims()
        self._clock = clock

    async def claim(self, kind: str, key: str, owner: str, ttl_s: float) -> bool:
        now = self._clock()
        return self.local.claim(kind, key, owner, now + ttl_s, now)

    async def first_use(self, kind: str, key: str, ttl_s: float) -> bool:
        return await self.claim(kind, key, secrets.token_hex(16), ttl_s)

    async def put(self, kind: str, key: str, value: str, ttl_s: float) -> None:
        now = self._clock()
        self.local.put(kind, key, value, now + ttl_s, now)

    async def get(self, kind: str, key: str) -> str | None:
        return self.local.get(kind, key, self._clock())
