"""Single-use claims and shared values: the in-process logic, then the database store that
every worker and instance shares (two stores on one SQLite file, or on one PostgreSQL
schema, as two workers would be), its races, and its fallback when the database is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from livecall.store import db
from livecall.store.claims import LocalClaims, MemoryClaims, storage_key
from livecall.store.claims_db import PRUNE_INTERVAL_S, SharedClaims
from livecall.store.models import Claim
from livecall.telephony.whisper import Whispers
from pg_support import PG_URL, fresh_schema

T0 = 1_800_000_000.0
REF = "a" * 32


# --------------------------------------------------------------------------- the logic


def test_the_first_owner_keeps_a_claim_and_may_present_it_again() -> None:
    claims = LocalClaims()
    assert claims.claim("outbound", REF, "CA1", T0 + 60, T0)
    assert claims.claim("outbound", REF, "CA1", T0 + 60, T0 + 30)  # a reconnect
    assert not claims.claim("outbound", REF, "CA2", T0 + 90, T0 + 30)  # another call
    assert claims.owner("outbound", REF, T0 + 30) == "CA1"
    assert claims.claim("jti", REF, "CA2", T0 + 60, T0)  # kinds do not meet


def test_an_expired_claim_is_anyones_and_expired_entries_go() -> None:
    claims = LocalClaims()
    claims.claim("outbound", REF, "CA1", T0 + 60, T0)
    assert claims.owner("outbound", REF, T0 + 61) is None
    assert claims.claim("outbound", REF, "CA2", T0 + 200, T0 + 61)
    claims.claim("outbound", "b" * 32, "CA3", T0 + 300, T0 + 250)  # CA2's entry expired: gone
    assert len(claims) == 1


def test_memory_is_bounded_oldest_first() -> None:
    claims = LocalClaims(max_entries=2)
    for n in range(3):
        claims.claim("k", str(n), "o", T0 + 60, T0)
    assert len(claims) == 2 and claims.owner("k", "0", T0) is None
    with pytest.raises(ValueError, match="positive"):
        LocalClaims(max_entries=0)


def test_values_the_newest_wins_until_they_expire() -> None:
    claims = LocalClaims()
    claims.put("vonage-call", "u1", "old", T0 + 60, T0)
    claims.put("vonage-call", "u1", "new", T0 + 60, T0)
    assert claims.get("vonage-call", "u1", T0 + 59) == "new"
    assert claims.get("vonage-call", "u1", T0 + 61) is None
    assert claims.get("vonage-call", "u2", T0) is None


def test_long_keys_are_stored_as_their_digest() -> None:
    assert storage_key(REF) == REF
    long = "x" * 500
    assert storage_key(long) != storage_key(long + "y")
    assert len(storage_key(long)) <= 128 and storage_key(long).startswith("sha256:")


async def test_memory_claims_first_use_is_once() -> None:
    now = [T0]
    claims = MemoryClaims(clock=lambda: now[0])
    assert await claims.first_use("jti", "j-1", 60)
    assert not await claims.first_use("jti", "j-1", 60)  # the replay
    now[0] += 61
    assert await claims.first_use("jti", "j-1", 60)  # out of its window: the age rule's job


# --------------------------------------------------------------------------- the database


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def engines(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], AsyncEngine]]:
    """Engines on one database (one SQLite file; one PostgreSQL schema), as workers have."""
    made: list[AsyncEngine] = []
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"

        def make() -> AsyncEngine:
            made.append(db.make_engine(url))
            return made[-1]

        await db.upgrade(make())
        try:
            yield make
        finally:
            for engine in made:
                await engine.dispose()
        return
    async with fresh_schema() as connect_args:

        def make_pg() -> AsyncEngine:
            made.append(db.make_engine(PG_URL, connect_args=connect_args))
            return made[-1]

        try:
            await db.upgrade(make_pg())
            yield make_pg
        finally:
            for engine in made:
                await engine.dispose()


def shared(engine: AsyncEngine, **kwargs: object) -> SharedClaims:
    return SharedClaims(db.make_sessionmaker(engine), **kwargs)  # type: ignore[arg-type]


async def test_a_token_claimed_by_one_worker_is_refused_at_another(
    engines: Callable[[], AsyncEngine],
) -> None:
    first, second = shared(engines()), shared(engines())
    assert await first.claim("twilio-outbound", REF, "CA1", 600)
    assert not await second.claim("twilio-outbound", REF, "CA2", 600)  # another call
    assert await second.claim("twilio-outbound", REF, "CA1", 600)  # the call reconnecting there
    assert await first.first_use("vonage-replay", "jti-1", 300)
    assert not await second.first_use("vonage-replay", "jti-1", 300)  # the replay
    assert not await first.first_use("vonage-replay", "jti-1", 300)  # …here too


async def test_claims_race_to_exactly_one_owner(engines: Callable[[], AsyncEngine]) -> None:
    stores = [shared(engines()) for _ in range(2)]
    for n in range(5):
        key = f"{n:032x}"
        results = await asyncio.gather(
            *(stores[i % 2].claim("outbound", key, f"CA{i}", 600) for i in range(8))
        )
        assert sum(results) == 1, results
        winner = f"CA{results.index(True)}"
        assert all([await s.claim("outbound", key, winner, 600) for s in stores])


async def test_an_expired_claim_is_taken_over_and_pruned(
    engines: Callable[[], AsyncEngine],
) -> None:
    now = [T0]
    engine = engines()
    first = shared(engine, clock=lambda: now[0])
    second = shared(engines(), clock=lambda: now[0])
    assert await first.claim("outbound", REF, "CA1", 60)
    now[0] += 61
    assert await second.claim("outbound", REF, "CA2", 60)  # the row expired: anyone's
    assert await second.claim("outbound", "b" * 32, "CA3", 60)
    now[0] += PRUNE_INTERVAL_S + 61
    assert await second.claim("outbound", "c" * 32, "CA4", 60)  # prunes what expired
    async with db.make_sessionmaker(engine)() as session:
        assert await session.scalar(select(func.count()).select_from(Claim)) == 1


async def test_values_cross_workers(engines: Callable[[], AsyncEngine]) -> None:
    first, second = shared(engines()), shared(engines())
    await first.put("vonage-call", "u1", '{"region_url": "r"}', 60)
    assert await second.get("vonage-call", "u1") == '{"region_url": "r"}'
    await second.put("vonage-call", "u1", "newer", 60)
    assert await shared(engines()).get("vonage-call", "u1") == "newer"
    assert await second.get("vonage-call", "unknown") is None


async def test_without_the_database_claims_fall_back_here_and_say_so_once(
    tmp_path: Path,
) -> None:
    engine = db.make_engine(f"sqlite+aiosqlite:///{tmp_path / 'unmigrated.db'}")  # no table
    fallbacks: list[int] = []
    store = shared(engine, on_fallback=lambda: fallbacks.append(1))
    try:
        with capture_logs() as logs:
            assert await store.claim("outbound", REF, "CA1", 600)  # the call goes on
            assert not await store.claim("outbound", REF, "CA2", 600)  # still once, here
            assert await store.first_use("vonage-replay", "j", 300)
            assert not await store.first_use("vonage-replay", "j", 300)
            await store.put("vonage-call", "u", "v", 60)
            assert await store.get("vonage-call", "u") == "v"
        down = [e for e in logs if e["event"] == "claims.shared_unavailable"]
        assert len(down) == 1 and down[0]["log_level"] == "error"
        assert len(fallbacks) == 3  # each question the database could not answer
        await db.upgrade(engine)  # the database is back
        with capture_logs() as logs:
            assert await store.first_use("vonage-replay", "j2", 300)
        assert [e["event"] for e in logs] == ["claims.shared_again"]
    finally:
        await engine.dispose()


async def test_kinds_are_bounded(engines: Callable[[], AsyncEngine]) -> None:
    store = shared(engines())
    with pytest.raises(ValueError, match="kind"):
        await store.claim("k" * 33, REF, "CA1", 60)
    assert await store.claim("k", "x" * 1000, "CA1", 60)  # a long key: its digest
    assert not await shared(engines()).claim("k", "x" * 1000, "CA2", 60)


async def test_one_shot_documents_are_taken_once_by_any_worker(
    engines: Callable[[], AsyncEngine],
) -> None:
    """Without Redis, a warm transfer's briefing (or a Plivo transfer's XML) published at one
    worker is fetched at whichever the carrier reaches, once."""
    first, second = shared(engines()), shared(engines())
    publisher, fetcher = Whispers(first), Whispers(second)
    token = await publisher.put("Caller wants to book a table for four.")
    assert await fetcher.take(token) == "Caller wants to book a table for four."
    assert await publisher.take(token) is None  # taken: not even its own copy again
    assert await fetcher.take(token) is None
    now = [T0]
    late = shared(engines(), clock=lambda: now[0])
    assert await late.stash("whisper:x", "v", 120)
    now[0] += 121
    assert await late.take("whisper:x") is None  # expired


async def test_without_the_database_documents_stay_with_their_worker(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite+aiosqlite:///{tmp_path / 'unmigrated.db'}")
    try:
        store = shared(engine)
        assert not await store.stash("whisper:x", "v", 120)
        with pytest.raises(LookupError):
            await store.take("whisper:x")
        whispers = Whispers(store)
        token = await whispers.put("briefing")
        assert await whispers.take(token) == "briefing"  # its own copy, once
        assert await whispers.take(token) is None
    finally:
        await engine.dispose()
