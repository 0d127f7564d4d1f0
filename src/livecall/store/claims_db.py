"""Claims and short-lived values in the database every worker and instance shares.

`livecall serve --workers N` runs N processes behind one port, and instances run behind a
load balancer: a webhook, its stream and a replay of either may each reach a different
process. So a single-use token (an outbound stream token's reference, a signed webhook's
`jti` or nonce) is claimed in the `claims` table (migration 0007): an insert that does
nothing when a live row holds the key (an expired one is taken over), then a read of the
row's owner, in one transaction. The primary key decides a race on SQLite (writers take
turns) and on PostgreSQL (a second insert waits for the first to commit, then sees it).

What the database answered is remembered in this process too (`LocalClaims`), so a token
presented again here (a stream reconnecting, a replay to the same worker) costs no query.
Expired rows are deleted at most once a minute, in the transaction of a claim.

**Database unavailable**: the check falls back to this process's memory rather than failing
the request, so an outage of the database never drops a call; the price is that during the
outage a token replayed to *another* worker is not recognised there. The first failure is
logged as an error (once, until the database answers again) and every fallback counts in
`livecall_errors_total{kind="claims_fallback"}`.

Without Redis the same table keeps the one-shot documents a carrier fetches once (`stash`,
`take`: a warm transfer's briefing, a Plivo transfer's XML), so whichever worker the fetch
reaches can answer it, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from livecall.store.claims import MAX_KIND_CHARS, LocalClaims, storage_key
from livecall.store.models import Claim

__all__ = ["PRUNE_INTERVAL_S", "STASH_KIND", "SharedClaims"]

log = structlog.get_logger("livecall.claims")

PRUNE_INTERVAL_S = 60.0
STASH_KIND = "stash"  # one-shot documents (`stash`/`take`), beside the claims
DEFAULT_TIMEOUT_S = 2.0  # a webhook waits at most this for the database, then goes on local
_TABLE = Claim.__table__
T = TypeVar("T")


def _at(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


class SharedClaims:
    """`ClaimStore` over the database (see the module doc), this process's memory in front."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        local: LocalClaims | None = None,
        clock: Callable[[], float] = time.time,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        on_fallback: Callable[[], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self.local = local if local is not None else LocalClaims()
        self._clock = clock
        self.timeout_s = timeout_s
        self._on_fallback = on_fallback
        self._down = False  # logged as down, not yet back
        self._pruned_at = 0.0

    # ------------------------------------------------------------------ ClaimStore

    async def claim(self, kind: str, key: str, owner: str, ttl_s: float) -> bool:
        _check_kind(kind)
        now = self._clock()
        until = now + ttl_s
        known = self.local.owner(kind, key, now)
        if known is not None:  # the database said so before (or we fell back here)
            return self.local.claim(kind, key, owner, until, now)
        try:
            holder = await self._db(self._claim_row, kind, storage_key(key), owner, now, until)
        except _Unavailable:
            return self.local.claim(kind, key, owner, until, now)
        self.local.held_by(kind, key, holder, until, now)
        return holder == owner

    async def first_use(self, kind: str, key: str, ttl_s: float) -> bool:
        return await self.claim(kind, key, secrets.token_hex(16), ttl_s)

    async def put(self, kind: str, key: str, value: str, ttl_s: float) -> None:
        _check_kind(kind)
        now = self._clock()
        self.local.put(kind, key, value, now + ttl_s, now)
        # unavailable: kept here, so this process's own requests still find it
        with contextlib.suppress(_Unavailable):
            await self._db(self._put_row, kind, storage_key(key), value, now + ttl_s)

    async def get(self, kind: str, key: str) -> str | None:
        _check_kind(kind)
        now = self._clock()
        value = self.local.get(kind, key, now)
        if value is not None:
            return value
        try:
            return await self._db(self._get_row, kind, storage_key(key), now)
        except _Unavailable:
            return None

    # ------------------------------------------------------------------ one-shot documents

    async def stash(self, key: str, value: str, ttl_s: float) -> bool:
        """Keep `value` for one `take` by any worker (`telephony.whisper.SharedStash`: a warm
        transfer's briefing, a Plivo transfer's document, when there is no Redis); False
        when the database cannot keep it (the caller keeps its own copy)."""
        until = self._clock() + ttl_s
        try:
            await self._db(self._put_row, STASH_KIND, storage_key(key), value, until)
        except _Unavailable:
            return False
        return True

    async def take(self, key: str) -> str | None:
        """The value stashed under `key`, deleted in the same statement: once, whichever
        worker asks first. LookupError when the database cannot say."""
        try:
            return await self._db(self._take_row, STASH_KIND, storage_key(key), self._clock())
        except _Unavailable:
            raise LookupError("the claims database is unavailable") from None

    # ------------------------------------------------------------------ the queries

    async def _take_row(self, session: AsyncSession, kind: str, key: str, now: float) -> str | None:
        taken = await session.execute(
            delete(Claim)
            .where(Claim.kind == kind, Claim.key == key, Claim.expires_at >= _at(now))
            .returning(Claim.value)
        )
        value: str | None = taken.scalar_one_or_none()
        return value

    async def _claim_row(
        self, session: AsyncSession, kind: str, key: str, owner: str, now: float, until: float
    ) -> str:
        if now - self._pruned_at >= PRUNE_INTERVAL_S:
            self._pruned_at = now
            await session.execute(delete(Claim).where(Claim.expires_at < _at(now)))
        insert = _insert_for(session).values(
            kind=kind, key=key, owner=owner, value=None, expires_at=_at(until)
        )
        # a live holder keeps the key; an expired row is taken over
        upsert = insert.on_conflict_do_update(
            index_elements=["kind", "key"],
            set_={"owner": owner, "value": None, "expires_at": _at(until)},
            where=_TABLE.c.expires_at < _at(now),
        )
        await session.execute(upsert)
        holder = await session.scalar(
            select(Claim.owner).where(Claim.kind == kind, Claim.key == key)
        )
        return holder if holder is not None else owner

    async def _put_row(
        self, session: AsyncSession, kind: str, key: str, value: str, until: float
    ) -> None:
        insert = _insert_for(session).values(
            kind=kind, key=key, owner="", value=value, expires_at=_at(until)
        )
        await session.execute(
            insert.on_conflict_do_update(
                index_elements=["kind", "key"],
                set_={"owner": "", "value": value, "expires_at": _at(until)},
            )
        )

    async def _get_row(self, session: AsyncSession, kind: str, key: str, now: float) -> str | None:
        value: str | None = await session.scalar(
            select(Claim.value).where(
                Claim.kind == kind, Claim.key == key, Claim.expires_at >= _at(now)
            )
        )
        return value

    async def _db(self, work: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`work(session, *args)` in one transaction; `_Unavailable` when it cannot answer."""
        try:
            async with asyncio.timeout(self.timeout_s), self._sessions.begin() as session:
                result = await work(session, *args)
        except Exception as exc:
            self._fell_back(exc)
            raise _Unavailable from exc
        if self._down:
            self._down = False
            log.warning("claims.shared_again", hint="single-use checks are shared again")
        return result

    def _fell_back(self, exc: BaseException) -> None:
        if self._on_fallback is not None:
            self._on_fallback()
        if not self._down:
            self._down = True
            log.error(
                "claims.shared_unavailable",
                error=type(exc).__name__,
                hint="the database cannot answer: single-use tokens are checked in this "
                "process only until it is back, so a replay to another worker is not refused",
            )


class _Unavailable(Exception):
    """The database could not answer a claim (the caller falls back to this process)."""


def _insert_for(session: AsyncSession) -> Any:
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        return postgresql.insert(Claim)
    return sqlite.insert(Claim)


def _check_kind(kind: str) -> None:
    if not kind or len(kind) > MAX_KIND_CHARS:
        raise ValueError(f"a claim kind is 1-{MAX_KIND_CHARS} characters")
