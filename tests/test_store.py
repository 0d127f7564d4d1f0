"""Call records: repository, buffered writer (database outages included), migrations, CLI.

Every database test runs on SQLite and on PostgreSQL (127.0.0.1:5432, database `test`, each
test in a schema of its own). Without PostgreSQL those are skipped, except under CI=true,
where they fail.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.settings import Settings
from livecall.store import db
from livecall.store.cli import calls_app, db_app
from livecall.store.models import Base, Call, CallEvent, Turn
from livecall.store.repository import percentile_ranks
from livecall.store.search import INDEX_NAMES
from livecall.store.search import include_name as search_index_excluded
from livecall.store.writer import REJECTED_FILE, SPOOL_PREFIX, CallStore
from support import service_missing

PG_URL = os.environ.get(
    "LIVECALL_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
# a port nothing listens on: connections are refused at once
DEAD_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:1/test"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

_pg_problem: list[str | None] = []


async def _postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used here, or None (checked once per run)."""
    if not _pg_problem:
        dsn = PG_URL.replace("postgresql+asyncpg://", "postgresql://")
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            await conn.close()
            _pg_problem.append(None)
        except (OSError, asyncpg.PostgresError, TimeoutError) as error:
            _pg_problem.append(f"PostgreSQL unreachable at {PG_URL}: {error!r}")
    return _pg_problem[0]


@dataclass
class Database:
    """One empty database for one test: its URL and how to open engines on it."""

    kind: str
    url: str
    connect_args: dict[str, Any]

    def engine(self, **kwargs: Any) -> AsyncEngine:
        return db.make_engine(self.url, connect_args=self.connect_args, **kwargs)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        yield Database("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}", {})
        return
    problem = await _postgres_problem()
    if problem:
        service_missing(problem)
    schema = f"test_{uuid.uuid4().hex[:12]}"
    dsn = PG_URL.replace("postgresql+asyncpg://", "postgresql://")
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield Database("postgresql", PG_URL, {"server_settings": {"search_path": schema}})
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()


@pytest.fixture
async def engine(database: Database) -> AsyncIterator[AsyncEngine]:
    engine = database.engine()
    await db.upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url="sqlite+aiosqlite:///unused.db", spool_dir=tmp_path / "spool")


@pytest.fixture
async def store(engine: AsyncEngine, settings: Settings) -> AsyncIterator[CallStore]:
    store = CallStore(settings, engine=engine, migrate=False)
    await store.start()
    yield store
    await store.close()


# --- a simulated call ----------------------------------------------------------------------


def play_call(
    store: CallStore,
    sid: str = "CA0001",
    *,
    started: datetime = T0,
    from_number: str = "+15550001111",
    to_number: str = "+15559990000",
    status: str = "completed",
    duration_s: float = 42.5,
) -> None:
    """Everything the bridge reports during one call with a barge-in and a tool call."""
    obs = store.observer(sid)
    obs.call_started(
        CallInfo(
            call_sid=sid,
            stream_sid="MZ" + sid,
            started_at=started,
            account_sid="AC1",
            from_number=from_number,
            to_number=to_number,
            profile="front-desk",
            model="gemini-live",
            custom_parameters={"lang": "en"},
        )
    )
    obs.turn(TurnRecord(sid, 0, "agent", "Hello, thanks for calling!", 400, 2100))
    obs.turn(TurnRecord(sid, 1, "caller", "What are your opening hours?", 2600, 4300))
    obs.event(CallEventRecord(sid, 4700, "tool_call", {"name": "hours", "args": {"day": "mon"}}))
    obs.event(
        CallEventRecord(
            sid, 4760, "tool_result", {"name": "hours", "result": "9-5", "duration_ms": 58.5}
        )
    )
    obs.turn(
        TurnRecord(
            sid,
            2,
            "agent",
            "We are open from nine to five on weekdays and on Saturdays from ten.",
            5000,
            6900,
            interrupted=True,
            heard_text="We are open from nine to five",
            first_audio_latency_ms=700.0,
            barge_in_stop_ms=3.5,
        )
    )
    obs.event(CallEventRecord(sid, 6880, "interrupted", {}))
    obs.turn(TurnRecord(sid, 3, "caller", "Thanks, bye.", 6900, 7800))
    obs.event(CallEventRecord(sid, 7900, "dtmf", {"digits": "1"}))
    obs.event(CallEventRecord(sid, 8000, "go_away", {"time_left_ms": 5000}))
    obs.event(CallEventRecord(sid, 8100, "session_resumed", {"handle": "h1"}))
    obs.turn(TurnRecord(sid, 4, "agent", "Goodbye!", 8300, 9000, first_audio_latency_ms=500.0))
    obs.call_ended(
        CallSummary(
            call_sid=sid,
            ended_at=started + timedelta(seconds=duration_s),
            duration_s=duration_s,
            end_reason="caller_stop",
            status=status,  # type: ignore[arg-type]
            turns=5,
            interruptions=1,
            frames_in=2100,
            frames_out=900,
            gemini_sessions=2,
            prompt_tokens=100,
            response_tokens=50,
            total_tokens=150,
            recording_path=f"recordings/{sid}.wav",
        )
    )


async def count_rows(engine: AsyncEngine) -> tuple[int, int, int]:
    async with engine.connect() as conn:
        calls = await conn.scalar(select(func.count()).select_from(Call))
        turns = await conn.scalar(select(func.count()).select_from(Turn))
        events = await conn.scalar(select(func.count()).select_from(CallEvent))
    return int(calls or 0), int(turns or 0), int(events or 0)


# --- the record of a call -------------------------------------------------------------------


async def test_simulated_call_is_recorded_whole(store: CallStore) -> None:
    play_call(store)
    assert await store.flush()

    call = await store.repo.get_call("CA0001")
    assert call is not None
    assert (call.stream_sid, call.from_number, call.to_number) == (
        "MZCA0001",
        "+15550001111",
        "+15559990000",
    )
    assert (call.direction, call.profile, call.model) == ("inbound", "front-desk", "gemini-live")
    assert call.status == "completed" and call.end_reason == "caller_stop"
    assert call.started_at == T0
    assert call.answered_at == T0 + timedelta(milliseconds=400)
    assert call.ended_at == T0 + timedelta(seconds=42.5)
    assert call.duration_s == pytest.approx(42.5)
    assert (call.gemini_sessions, call.total_tokens, call.prompt_tokens) == (2, 150, 100)
    assert (call.turn_count, call.interruptions) == (5, 1)
    assert call.custom_parameters == {"lang": "en"}
    assert call.recording_key == "recordings/CA0001.wav"

    assert [t.speaker for t in call.turns] == ["agent", "caller", "agent", "caller", "agent"]
    cut = call.turns[2]
    assert cut.interrupted and cut.heard_text == "We are open from nine to five"
    assert cut.text.startswith(cut.heard_text)
    assert (cut.start_ms, cut.end_ms) == (5000, 6900)
    assert cut.first_audio_latency_ms == pytest.approx(700.0)
    assert cut.barge_in_stop_ms == pytest.approx(3.5)
    assert not call.turns[1].interrupted and call.turns[1].heard_text is None

    kinds = [e.kind for e in call.events]
    assert kinds == [
        "tool_call",
        "tool_result",
        "interrupted",
        "dtmf",
        "go_away",
        "session_resumed",
    ]
    assert [e.seq for e in call.events] == list(range(6))
    result = call.events[1]
    assert result.name == "hours" and result.duration_ms == pytest.approx(58.5)
    assert result.data == {"name": "hours", "result": "9-5", "duration_ms": 58.5}
    assert call.events[0].data["args"] == {"day": "mon"}
    assert call.events[3].data == {"digits": "1"}


async def test_call_in_progress_is_visible_before_it_ends(store: CallStore) -> None:
    obs = store.observer("CALIVE")
    obs.call_started(CallInfo("CALIVE", "MZ1", T0, from_number="+1555"))
    obs.turn(TurnRecord("CALIVE", 0, "caller", "hi", 0, 500))
    assert await store.flush()
    call = await store.repo.get_call("CALIVE")
    assert call is not None and call.status == "in_progress" and call.ended_at is None
    assert [t.text for t in call.turns] == ["hi"]


async def test_replaying_the_same_records_adds_nothing(store: CallStore) -> None:
    ops: list[dict[str, Any]] = []
    store._put = ops.append  # type: ignore[method-assign]  # capture the ops themselves
    play_call(store)
    del store._put
    await store.repo.apply(ops)
    await store.repo.apply(ops)
    await store.repo.apply(ops[: len(ops) // 2])
    assert await count_rows(store.engine) == (1, 5, 6)
    # a turn sent again with more text (same index) is updated, not duplicated
    revised = next(op for op in ops if op["op"] == "turn" and op["idx"] == 4)
    await store.repo.apply([{**revised, "text": "Goodbye, have a nice day!"}])
    call = await store.repo.get_call("CA0001")
    assert call is not None and call.turns[4].text == "Goodbye, have a nice day!"
    assert call.status == "completed"  # replayed `start` does not reopen the call
    assert await count_rows(store.engine) == (1, 5, 6)


async def test_records_for_a_call_whose_start_was_lost_are_kept(store: CallStore) -> None:
    obs = store.observer("CANOSTART")
    obs.turn(TurnRecord("CANOSTART", 0, "caller", "hello?", 0, 900))
    obs.call_ended(CallSummary("CANOSTART", T0, 10.0, "caller_stop"))
    assert await store.flush()
    call = await store.repo.get_call("CANOSTART")
    assert call is not None
    assert call.started_at == T0 - timedelta(seconds=10) and call.status == "completed"
    assert [t.text for t in call.turns] == ["hello?"]


async def test_observer_never_raises(store: CallStore) -> None:
    obs = store.observer("CABAD")
    obs.turn(TurnRecord("CABAD", "x", "agent", "text", 0))  # type: ignore[arg-type]
    obs.event(CallEventRecord("CABAD", 1, "tool_call", {"obj": object(), 3: {1, 2}}))
    obs.call_started(None)  # type: ignore[arg-type]
    obs.call_ended(CallSummary("CABAD", T0, float("nan"), "x" * 500))
    assert await store.flush()
    call = await store.repo.get_call("CABAD")
    assert call is not None and len(call.end_reason or "") == 64
    assert call.events[0].data["obj"].startswith("<object")


async def test_delete_erases_turns_and_events(store: CallStore) -> None:
    play_call(store, "CA1")
    play_call(store, "CA2")
    assert await store.flush()
    assert await store.repo.delete_call("CA1")
    assert not await store.repo.delete_call("CA1")
    assert await store.repo.get_call("CA1") is None
    assert await count_rows(store.engine) == (1, 5, 6)


async def test_a_deleted_call_stays_deleted_when_its_records_arrive_late(
    store: CallStore,
) -> None:
    """The tombstone: a spool replayed after an outage, or another instance's late writes,
    must not bring an erased call back, in whatever order its records come."""
    play_call(store, "CAGONE")
    assert await store.flush()
    assert await store.repo.delete_call("CAGONE")
    play_call(store, "CAGONE")  # every record again: start, turns, events, end
    store.observer("CAGONE").turn(TurnRecord("CAGONE", 7, "agent", "late", 0, 10))
    play_call(store, "CAKEPT")  # in the same batches: written as usual
    assert await store.flush()
    assert await store.repo.get_call("CAGONE") is None
    assert (await store.repo.get_call("CAKEPT")) is not None
    assert await count_rows(store.engine) == (1, 5, 6)
    # a call never seen before can be erased ahead of its records too
    assert not await store.repo.delete_call("CAFUTURE")
    play_call(store, "CAFUTURE")
    assert await store.flush()
    assert await store.repo.get_call("CAFUTURE") is None


# --- listing and statistics -----------------------------------------------------------------


async def test_list_filters_and_pages(store: CallStore) -> None:
    for i in range(25):
        play_call(
            store,
            f"CA{i:04d}",
            started=T0 + timedelta(minutes=i // 2),  # pairs share a start time
            from_number="+1555000" if i % 3 == 0 else f"+1666{i:04d}",
            status="failed" if i % 5 == 0 else "completed",
        )
    assert await store.flush()
    repo = store.repo

    seen: list[str] = []
    cursor = None
    while True:
        page = await repo.list_calls(limit=10, cursor=cursor)
        assert page.total == 25
        seen += [c.call_sid for c in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    expected = sorted(
        (f"CA{i:04d}" for i in range(25)), key=lambda s: (int(s[2:]) // 2, s), reverse=True
    )
    assert seen == expected

    by_offset = await repo.list_calls(limit=10, offset=20)
    assert [c.call_sid for c in by_offset.items] == expected[20:]
    assert by_offset.next_cursor is None

    mine = await repo.list_calls(number="+1555000")
    assert {c.call_sid for c in mine.items} == {f"CA{i:04d}" for i in range(0, 25, 3)}
    to = await repo.list_calls(number="+15559990000", limit=200)
    assert to.total == 25
    failed = await repo.list_calls(status="failed")
    assert {c.call_sid for c in failed.items} == {f"CA{i:04d}" for i in range(0, 25, 5)}
    window = await repo.list_calls(since=T0 + timedelta(minutes=2), until=T0 + timedelta(minutes=4))
    assert {c.call_sid for c in window.items} == {"CA0004", "CA0005", "CA0006", "CA0007"}
    assert (await repo.list_calls(status="in_progress")).total == 0


def test_percentile_ranks_match_linear_interpolation() -> None:
    values = sorted([5.0, 1.0, 9.0, 3.0, 7.0, 2.0])
    for p, (lo, hi, w) in percentile_ranks(len(values)).items():
        got = values[lo - 1] + (values[hi - 1] - values[lo - 1]) * w
        assert got == pytest.approx(np.percentile(values, p))
    assert percentile_ranks(1) == {p: (1, 1, 0.0) for p in (50, 90, 95, 99)}


async def test_stats(store: CallStore) -> None:
    rng = np.random.default_rng(7)
    latencies = rng.uniform(200, 1500, size=37).round(1)
    for i in range(6):
        play_call(
            store, f"CA{i}", duration_s=10.0 * (i + 1), status="failed" if i == 0 else "completed"
        )
    # more agent turns with latencies on the last call
    obs = store.observer("CA5")
    for n, value in enumerate(latencies[: 37 - 12]):
        obs.turn(
            TurnRecord(
                "CA5", 100 + n, "agent", "ok", 10_000 + n, first_audio_latency_ms=float(value)
            )
        )
    assert await store.flush()
    all_latencies = [700.0, 500.0] * 6 + [float(v) for v in latencies[: 37 - 12]]

    stats = await store.repo.stats()
    assert stats.calls == 6
    assert stats.by_status == {"completed": 5, "failed": 1}
    assert stats.by_end_reason == {"caller_stop": 6}
    assert stats.total_duration_s == pytest.approx(210.0)
    assert stats.mean_duration_s == pytest.approx(35.0)
    assert stats.max_duration_s == pytest.approx(60.0)
    assert stats.turns == 6 * 5 + 25
    assert stats.interrupted_turns == 6
    assert stats.total_tokens == 900
    lat = stats.first_audio_latency_ms
    assert lat.count == len(all_latencies)
    assert lat.mean == pytest.approx(np.mean(all_latencies))
    for p in (50, 90, 95, 99):
        assert lat.percentiles[f"p{p}"] == pytest.approx(np.percentile(all_latencies, p))
    assert stats.barge_in_stop_ms.count == 6
    assert stats.barge_in_stop_ms.percentiles["p50"] == pytest.approx(3.5)
    assert stats.answer_ms.count == 6 and stats.answer_ms.max == pytest.approx(400)

    failed = await store.repo.stats(status="failed")
    assert failed.calls == 1 and failed.first_audio_latency_ms.count == 2
    empty = await store.repo.stats(since=T0 + timedelta(days=1))
    assert empty.calls == 0 and empty.first_audio_latency_ms.percentiles["p50"] is None


# --- the database goes away -----------------------------------------------------------------


class Outage:
    """Makes every statement on an engine fail as if the server had gone, until lifted."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.down = False
        self.failures = 0
        event.listen(engine.sync_engine, "before_cursor_execute", self._check)

    def _check(self, *args: Any) -> None:
        if self.down:
            self.failures += 1
            raise ConnectionResetError("database down (simulated)")


def spool_files(settings: Settings) -> list[Path]:
    return sorted(Path(settings.spool_dir).glob(f"{SPOOL_PREFIX}*"))


async def test_database_down_mid_call_loses_nothing(
    engine: AsyncEngine, settings: Settings
) -> None:
    outage = Outage(engine)
    store = CallStore(settings, engine=engine, migrate=False, retry_max_s=60)
    await store.start()
    try:
        sid = "CAOUTAGE"
        obs = store.observer(sid)
        obs.call_started(CallInfo(sid, "MZ1", T0, from_number="+1555"))
        obs.turn(TurnRecord(sid, 0, "agent", "Hello", 0, 800))
        assert await store.flush()

        outage.down = True
        for i in range(1, 31):  # the call goes on; the bridge never notices
            obs.turn(TurnRecord(sid, i, "caller" if i % 2 else "agent", f"turn {i}", i * 1000))
            obs.event(CallEventRecord(sid, i * 1000 + 10, "dtmf", {"digits": str(i % 10)}))
        assert not await store.flush()
        assert outage.failures > 0
        health = store.health()
        assert not health["healthy"] and health["last_error"]
        # once the database failed, the records went to a spool file, fsynced
        assert await store.settled(sid, timeout=10)
        files = spool_files(settings)
        assert len(files) == 1 and files[0].stat().st_size > 0
        assert store.health()["pending"] == 0 and store.health()["held"] == 0
        obs.call_ended(CallSummary(sid, T0 + timedelta(seconds=40), 40.0, "caller_stop"))

        outage.down = False
        assert await store.flush()
        assert store.health()["healthy"]
        assert spool_files(settings) == []
        assert await count_rows(engine) == (1, 31, 30)
        call = await store.repo.get_call(sid)
        assert call is not None and call.status == "completed"
        assert [t.idx for t in call.turns] == list(range(31))
        assert [e.seq for e in call.events] == list(range(30))
    finally:
        await store.close()


async def test_retry_happens_by_itself_after_backoff(
    engine: AsyncEngine, settings: Settings
) -> None:
    outage = Outage(engine)
    store = CallStore(settings, engine=engine, migrate=False, retry_initial_s=0.05)
    await store.start()
    try:
        outage.down = True
        play_call(store, "CARETRY")
        assert not await store.flush()
        outage.down = False
        async with asyncio.timeout(10):  # no flush(): the back-off timer retries
            await store.drained()
        assert store.health()["healthy"]
        assert await count_rows(engine) == (1, 5, 6)
    finally:
        await store.close()


async def test_shutdown_while_down_spools_and_next_start_replays(
    database: Database, engine: AsyncEngine, settings: Settings
) -> None:
    dead = CallStore(
        Settings(database_url=DEAD_PG_URL, spool_dir=settings.spool_dir), write_timeout_s=5
    )
    await dead.start()
    play_call(dead, "CA1")
    play_call(dead, "CA2")
    assert not await dead.flush()
    await dead.close(timeout=5)
    assert len(spool_files(settings)) == 1
    late = dead.observer("CA3")  # a record after close is spooled too
    late.call_started(CallInfo("CA3", "MZ3", T0))
    assert len(spool_files(settings)) == 2

    store = CallStore(settings, engine=engine, migrate=False)
    await store.start()
    try:
        assert await store.flush()
        assert spool_files(settings) == []
        assert await count_rows(engine) == (3, 10, 12)
    finally:
        await store.close()
    # and once more, to be sure a replayed spool is not replayed again
    again = CallStore(settings, engine=engine, migrate=False)
    await again.start()
    assert await again.flush()
    await again.close()
    assert await count_rows(engine) == (3, 10, 12)


async def test_a_live_process_spool_is_left_alone(tmp_path: Path, engine: AsyncEngine) -> None:
    settings = Settings(spool_dir=tmp_path / "spool")
    other = CallStore(Settings(database_url=DEAD_PG_URL, spool_dir=settings.spool_dir))
    await other.start()
    play_call(other, "CAOTHER")
    assert not await other.flush()  # the database is down: its records go to its spool
    assert await other.settled("CAOTHER", timeout=10)
    store = CallStore(settings, engine=engine, migrate=False)
    await store.start()
    try:
        assert await store.flush()
        assert await count_rows(engine) == (0, 0, 0)  # still locked by `other`
    finally:
        await store.close()
        await other.close(timeout=1)


async def test_a_record_the_database_refuses_does_not_block_the_rest(
    store: CallStore, settings: Settings
) -> None:
    play_call(store, "CA1")
    store._put({"op": "turn", "call_sid": "CA1", "idx": 99, "speaker": None, "start_ms": 0})
    play_call(store, "CA2")
    assert await store.flush()
    assert await count_rows(store.engine) == (2, 10, 12)
    rejected = (Path(settings.spool_dir) / REJECTED_FILE).read_bytes().splitlines()
    assert len(rejected) == 1 and orjson.loads(rejected[0])["op"]["idx"] == 99
    assert store.health()["rejected"] == 1


async def test_unreadable_spool_lines_are_set_aside(
    engine: AsyncEngine, settings: Settings
) -> None:
    spool = Path(settings.spool_dir)
    spool.mkdir(parents=True)  # noqa: ASYNC240 - test setup
    good = {"op": "start", "call_sid": "CAX", "started_at": T0.isoformat()}
    turn = {"op": "turn", "call_sid": "CAX", "idx": 0, "speaker": "caller", "start_ms": 0}
    (spool / f"{SPOOL_PREFIX}1-dead.jsonl").write_bytes(
        orjson.dumps(good) + b"\n{not json\n" + orjson.dumps(turn) + b"\n" + b'{"op": "tur'
    )
    store = CallStore(settings, engine=engine, migrate=False)
    await store.start()
    try:
        assert await store.flush()
    finally:
        await store.close()
    assert await count_rows(engine) == (1, 1, 0)
    assert len((spool / REJECTED_FILE).read_bytes().splitlines()) == 2
    assert spool_files(settings) == []


async def test_close_flushes_everything(engine: AsyncEngine, settings: Settings) -> None:
    store = CallStore(settings, engine=engine, migrate=False)
    await store.start()
    for i in range(20):
        play_call(store, f"CA{i}")
    await store.close()
    assert await count_rows(engine) == (20, 100, 120)
    assert spool_files(settings) == []


# --- migrations ------------------------------------------------------------------------------


async def test_migrations_upgrade_and_downgrade(database: Database) -> None:
    engine = database.engine()
    try:
        assert await db.current_revision(engine) is None
        await db.upgrade(engine)
        assert await db.current_revision(engine) == db.head_revision()

        def diff(sync_conn: Any) -> list[Any]:
            ctx = MigrationContext.configure(
                sync_conn,
                opts={"compare_type": True, "include_name": search_index_excluded},
            )
            return compare_metadata(ctx, Base.metadata)

        def tables(sync_conn: Any) -> set[str]:
            names = set(inspect(sync_conn).get_table_names()) - {"alembic_version"}
            return {n for n in names if not n.startswith(INDEX_NAMES)}

        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []  # migrations build exactly the models
            assert await conn.run_sync(tables) == {
                "calls",
                "turns",
                "call_events",
                "webhook_outbox",
                "deleted_calls",
                "call_analyses",
                "caller_memory",
                "search_docs",
                "claims",
            }
        await db.downgrade(engine, "base")
        assert await db.current_revision(engine) is None
        async with engine.connect() as conn:
            assert await conn.run_sync(tables) == set()
        await db.upgrade(engine)
        assert await db.current_revision(engine) == db.head_revision()
    finally:
        await engine.dispose()


async def test_store_creates_the_sqlite_database_on_first_run(tmp_path: Path) -> None:
    path = tmp_path / "new" / "livecall.db"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{path}", spool_dir=tmp_path / "s")
    async with CallStore(settings) as store:
        play_call(store)
        assert await store.flush()
        assert await store.repo.get_call("CA0001") is not None
        async with store.engine.connect() as conn:
            mode = await conn.exec_driver_sql("PRAGMA journal_mode")
            assert mode.scalar() == "wal"
            fks = await conn.exec_driver_sql("PRAGMA foreign_keys")
            assert fks.scalar() == 1
    assert path.is_file()


# --- CLI -------------------------------------------------------------------------------------


def test_cli(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    env = {"COLUMNS": "200", "NO_COLOR": "1"}

    result = runner.invoke(db_app, ["current", "--database-url", url], env=env)
    assert result.exit_code == 0, result.output
    assert "current none" in result.output

    result = runner.invoke(db_app, ["upgrade", "--database-url", url], env=env)
    assert result.exit_code == 0, result.output

    result = runner.invoke(calls_app, ["--database-url", url], env=env)
    assert result.exit_code == 0 and "No calls recorded yet" in result.output

    async def fill() -> None:
        settings = Settings(database_url=url, spool_dir=tmp_path / "spool")
        async with CallStore(settings) as store:
            play_call(store, "CA1234567890")
            play_call(store, "CA0987654321", status="failed")

    asyncio.run(fill())

    result = runner.invoke(calls_app, ["--database-url", url], env=env)
    assert result.exit_code == 0, result.output
    assert "CA1234567890" in result.output and "CA0987654321" in result.output
    assert "+15550001111" in result.output and "failed" in result.output

    result = runner.invoke(
        calls_app, ["list", "--status", "failed", "--database-url", url], env=env
    )
    assert result.exit_code == 0 and "CA0987654321" in result.output
    assert "CA1234567890" not in result.output

    result = runner.invoke(calls_app, ["show", "CA1234567890", "--database-url", url], env=env)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "[00:00.4] Agent:  Hello, thanks for calling!" in out
    assert "[00:02.6] Caller: What are your opening hours?" in out
    assert (
        "We are open from nine to five [not heard: on weekdays and on Saturdays from ten.]"
        "  (interrupted)  [700 ms]"
    ) in out
    assert "· tool_result hours (58 ms)" in out
    assert "· dtmf digits=1" in out

    result = runner.invoke(calls_app, ["show", "CANOPE", "--database-url", url], env=env)
    assert result.exit_code == 1 and "No call CANOPE" in result.output

    result = runner.invoke(db_app, ["current", "--database-url", url], env=env)
    assert "up to date" in result.output
    result = runner.invoke(db_app, ["downgrade", "base", "--database-url", url], env=env)
    assert result.exit_code == 0, result.output
    result = runner.invoke(calls_app, ["--database-url", url], env=env)
    assert result.exit_code == 1 and "livecall db upgrade" in result.output


def test_an_unsupported_database_is_refused_at_start_with_a_clear_error() -> None:
    from livecall.store.db import make_engine

    with pytest.raises(ValueError, match=r"SQLite .* or PostgreSQL .*not mysql"):
        make_engine("mysql+aiomysql://root@127.0.0.1/test")
