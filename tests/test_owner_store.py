"""The owner's queries on SQLite and PostgreSQL (#16): full-text search over what was said,
numbers by any tail in any format, the business time zone's days and hours, the calls that
need a call back and the owner's statistics."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import event, select, text

import test_store
from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.store import owner, search
from livecall.store.models import Call, SearchDoc
from livecall.store.writer import CallStore

# the per-test SQLite file and PostgreSQL schema of test_store
database, engine, settings, store = (
    test_store.database,
    test_store.engine,
    test_store.settings,
    test_store.store,
)

T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # a Monday


def make_call(
    store: CallStore,
    sid: str,
    *,
    started: datetime = T0,
    from_number: str = "+15550102030",
    lines: tuple[tuple[str, str], ...] = (("agent", "Hello, Bella's, how can I help?"),),
    duration_s: float = 60.0,
    end_reason: str = "caller_stop",
    status: str = "completed",
) -> None:
    obs = store.observer(sid)
    obs.call_started(
        CallInfo(
            call_sid=sid,
            stream_sid="MZ" + sid,
            started_at=started,
            from_number=from_number,
            to_number="+15559990000",
        )
    )
    for i, (speaker, words) in enumerate(lines):
        obs.turn(TurnRecord(sid, i, speaker, words, i * 2000, i * 2000 + 1500))  # type: ignore[arg-type]
    obs.call_ended(
        CallSummary(
            call_sid=sid,
            ended_at=started + timedelta(seconds=duration_s),
            duration_s=duration_s,
            end_reason=end_reason,
            status=status,  # type: ignore[arg-type]
            turns=len(lines),
        )
    )


async def sids(hits: Any) -> list[str]:
    return [h.call.call_sid for h in hits]


# --- search ----------------------------------------------------------------------------------


def test_query_pieces() -> None:
    assert search.looks_like_number("(555) 010-2030") and search.looks_like_number("2030")
    assert not search.looks_like_number("12") and not search.looks_like_number("table 4")
    assert search.rdigits("+1 (555) 010-2030") == "03020105551"
    assert search.search_terms('Garcia "OR" x*') == ["garcia", "or", "x"]
    assert search.fts5_query(["garcia", "or"]) == '"garcia"* "or"*'  # operators stay words
    assert search.tsquery(["garcia", "table"]) == "garcia:* & table:*"
    assert search.highlight("Table for Garcias, please", ["garcia"]) == [
        ("Table for ", False),
        ("Garcias", True),
        (", please", False),
    ]
    long = "word " * 60 + "Garcia at eight " + "word " * 60
    cut = search.snippet(long, ["garcia"])
    assert "Garcia" in cut and cut.startswith("…") and cut.endswith("…") and len(cut) < 170
    docs = search.analysis_docs("CA1", "Booked a table", {"name": "Ana Garcia", "party": 4})
    assert [(d["source"], d["text"]) for d in docs] == [
        ("summary", "Booked a table"),
        ("field:name", "name: Ana Garcia"),
        ("field:party", "party: 4"),
    ]


async def test_search_finds_words_said_on_a_call(store: CallStore) -> None:
    make_call(
        store,
        "CA1",
        lines=(
            ("agent", "Hello, Bella's, how can I help?"),
            ("caller", "A table for four under the name Garcia, please."),
            ("agent", "Done: Garcia, four people, at eight."),
        ),
    )
    make_call(
        store,
        "CA2",
        started=T0 + timedelta(hours=1),
        lines=(("caller", "Are you open on Sundays?"),),
    )
    await store.flush()
    repo = store.repo
    (hit,) = await repo.search("garcia")
    assert hit.call.call_sid == "CA1" and hit.source == "caller" and hit.ref == 1
    assert "Garcia" in (hit.text or "") and hit.matches == 2
    assert await sids(await repo.search("GARC")) == ["CA1"]  # a prefix, any case
    assert await sids(await repo.search("table four")) == ["CA1"]  # every word, any order
    assert await sids(await repo.search("table sundays")) == []
    assert await sids(await repo.search("open")) == ["CA2"]
    assert await sids(await repo.search('" OR * NEAR(')) == []  # no syntax reaches the index
    assert await repo.search("   ") == []
    # dates bound the search
    assert await sids(await repo.search("garcia", since=T0 + timedelta(minutes=1))) == []


async def test_numbers_match_by_any_tail_in_any_format(store: CallStore) -> None:
    make_call(store, "CA1", from_number="+15550102030")
    make_call(store, "CA2", from_number="+447700900123", started=T0 + timedelta(hours=1))
    await store.flush()
    repo = store.repo
    for query in ("+15550102030", "5550102030", "(555) 010-2030", "010 2030", "2030"):
        assert await sids(await repo.search(query)) == ["CA1"], query
    assert await sids(await repo.search("07700 900123")) == []  # a national prefix differs
    assert await sids(await repo.search("7700 900123")) == ["CA2"]
    assert await sids(await repo.search("99999")) == []


async def test_rewritten_turns_and_erased_calls_leave_the_index(store: CallStore) -> None:
    make_call(store, "CA1", lines=(("caller", "Reservation for Okafor"),))
    await store.flush()
    # the same turn written again (a spool replay) with other words: one line, the new words
    replay = {"op": "turn", "call_sid": "CA1", "idx": 0, "speaker": "caller", "start_ms": 0}
    await store.repo.apply([{**replay, "text": "Reservation for Okonkwo"}])
    assert await sids(await store.repo.search("okafor")) == []
    assert await sids(await store.repo.search("okonkwo")) == ["CA1"]
    assert await store.repo.delete_call("CA1")
    assert await store.repo.search("okonkwo") == []
    async with store.repo.sessions() as session:
        assert (await session.scalars(select(SearchDoc))).all() == []


async def test_an_analysis_is_searchable_with_one_call(store: CallStore) -> None:
    make_call(store, "CA1", lines=(("caller", "Hi"),))
    await store.flush()
    async with store.repo.sessions.begin() as session:
        await search.index_docs(
            session, search.analysis_docs("CA1", "Wants a birthday cake", {"name": "Li Wei"})
        )
    (hit,) = await store.repo.search("birthday")
    assert hit.source == "summary"
    (hit,) = await store.repo.search("wei")
    assert hit.source == "field:name"


# --- outcomes, the business's clock, call backs, owner stats -------------------------------


async def test_outcomes_name_abandoned_and_failed_calls(store: CallStore) -> None:
    make_call(store, "CA1", lines=(("caller", "Hi, a table please"),), duration_s=0.6)
    make_call(store, "CA2", lines=(("agent", "Hello, Bella's"),), duration_s=0.6)  # greeting
    make_call(store, "CA3", lines=(), status="failed", end_reason="gemini_failed")
    make_call(store, "CA4", lines=(("agent", "Hello"),), duration_s=45.0)
    await store.flush()
    assert owner.outcome_of("completed", 0.6, spoke=False) == "abandoned"
    assert owner.outcome_of("completed", 0.6, spoke=True) == "answered"
    assert owner.outcome_of("completed", 45.0, spoke=False) == "answered"
    async with store.repo.sessions() as session:
        rows = dict((await session.execute(select(Call.call_sid, owner.outcome_case()))).all())
    assert rows == {"CA1": "answered", "CA2": "abandoned", "CA3": "failed", "CA4": "answered"}
    abandoned = await store.repo.list_calls(outcome="abandoned")
    assert [c.call_sid for c in abandoned.items] == ["CA2"] and abandoned.total == 1
    assert await owner.callers_who_spoke(store.repo.sessions, ["CA1", "CA2"]) == {"CA1"}


async def test_days_and_hours_follow_the_business_time_zone(store: CallStore) -> None:
    ny = ZoneInfo("America/New_York")
    # 9 pm in New York on 2 March is 02:00 UTC on 3 March: the evening rush stays on the 2nd
    evening = datetime(2026, 3, 2, 21, 0, tzinfo=ny)
    for i in range(3):
        make_call(store, f"CAe{i}", started=evening + timedelta(minutes=10 * i))
    # across the spring DST change (8 March): 9:30 local before and after
    make_call(store, "CAd1", started=datetime(2026, 3, 7, 9, 30, tzinfo=ny))
    make_call(store, "CAd2", started=datetime(2026, 3, 9, 9, 30, tzinfo=ny))
    # India is UTC+5:30: a quarter-hour bucket lands in the right local hour
    make_call(store, "CAi", started=datetime(2026, 3, 2, 23, 45, tzinfo=UTC))
    await store.flush()
    seen = await owner.activity(store.repo.sessions, date(2026, 3, 1), date(2026, 3, 10), ny)
    assert seen.days[date(2026, 3, 2)].calls == 3 + 1  # the India call is 18:45 in New York
    assert seen.days[date(2026, 3, 3)].calls == 0
    assert seen.hours[21] == 3 and seen.hours[9] == 2 and seen.hours[18] == 1
    assert seen.weekdays[0] == 4 + 1  # Monday 2 and Monday 9 March
    assert seen.busiest(1) == [(0, 21, 3)]
    assert seen.calls == 6 and seen.outcomes["answered"] == 6
    india = await owner.activity(
        store.repo.sessions, date(2026, 3, 3), date(2026, 3, 3), ZoneInfo("Asia/Kolkata")
    )
    assert india.calls == 1 + 3 and india.hours[5] == 1  # 23:45 UTC = 05:15 on the 3rd
    empty = await owner.activity(store.repo.sessions, date(2025, 1, 1), date(2025, 1, 7), ny)
    assert empty.calls == 0 and empty.busiest() == [] and len(empty.days) == 7


async def test_the_call_back_list(store: CallStore) -> None:
    make_call(store, "CAok", lines=(("caller", "Book me in"), ("agent", "Done.")))
    make_call(
        store,
        "CAgreet",
        started=T0 + timedelta(minutes=1),
        lines=(("agent", "Hello, Bella's, how can"),),
        duration_s=0.6,
    )
    make_call(
        store,
        "CAfail",
        started=T0 + timedelta(minutes=2),
        lines=(("caller", "Is anyone there?"),),
        status="failed",
        end_reason="gemini_failed",
        duration_s=30,
    )
    store.observer("CAfail").event(
        CallEventRecord("CAfail", 900, "error", {"where": "gemini", "error": "unavailable"})
    )
    make_call(
        store,
        "CAshort",
        started=T0 + timedelta(minutes=3),
        lines=(("caller", "Wrong number"),),
        duration_s=12,
    )
    await store.flush()
    sessions = store.repo.sessions
    listed = await owner.callbacks(sessions)
    assert [c.call.call_sid for c in listed] == ["CAshort", "CAfail", "CAgreet"]
    short, failed, greet = listed
    assert greet.outcome == "abandoned" and greet.reason == "Hung up during the greeting"
    assert greet.heard == "Hello, Bella's, how can" and greet.said == ""
    assert failed.outcome == "failed" and "apology" in failed.heard
    assert greet.heard_quoted and not failed.heard_quoted
    assert failed.said == "Is anyone there?"
    assert short.outcome == "answered" and short.reason.startswith("Very short")
    assert await owner.callback_count(sessions) == 3
    assert await owner.mark_handled(sessions, "CAgreet")
    assert not await owner.mark_handled(sessions, "CAnone")
    assert await owner.callback_count(sessions) == 2
    assert [c.call.call_sid for c in await owner.callbacks(sessions, handled=True)] == ["CAgreet"]
    assert await owner.mark_handled(sessions, "CAgreet", handled=False)
    assert await owner.callback_count(sessions) == 3


async def test_repeat_callers(store: CallStore) -> None:
    for i in range(3):
        make_call(store, f"CAa{i}", from_number="+15550000001", started=T0 + timedelta(hours=i))
    for i in range(2):
        make_call(store, f"CAb{i}", from_number="+15550000002", started=T0 + timedelta(hours=i))
    make_call(store, "CAc", from_number="+15550000003")
    await store.flush()
    total, top = await owner.repeat_callers(
        store.repo.sessions, T0 - timedelta(days=1), T0 + timedelta(days=1)
    )
    assert total == 2
    assert [(r["number"], r["calls"]) for r in top] == [("+15550000001", 3), ("+15550000002", 2)]


async def test_another_reason_to_call_back_is_one_line(store: CallStore) -> None:
    """What post-call analysis does: its flagged calls join the list through FLAG_SOURCES."""
    make_call(store, "CAlong", lines=(("caller", "Please ring me back about the cake"),))
    make_call(store, "CAfine", lines=(("caller", "Thanks, bye"),), started=T0 + timedelta(1))
    await store.flush()
    async with store.repo.sessions.begin() as session:
        await search.index_docs(session, search.analysis_docs("CAlong", "Wants a call back", {}))
    assert await owner.callbacks(store.repo.sessions) == []  # both a minute long, answered
    owner.FLAG_SOURCES["the analysis"] = lambda: select(SearchDoc.call_sid).where(
        SearchDoc.source == "summary", SearchDoc.text.contains("call back")
    )
    try:
        (flagged,) = await owner.callbacks(store.repo.sessions)
        assert flagged.call.call_sid == "CAlong" and flagged.reason == "Flagged by the analysis"
        assert await owner.callback_count(store.repo.sessions) == 1
    finally:
        del owner.FLAG_SOURCES["the analysis"]


async def test_a_quarter_s_stats_take_two_queries(store: CallStore) -> None:
    """Days, hours, weekdays and outcomes for 92 days come from two GROUP BY queries, not
    several queries per day."""
    for i in range(30):
        make_call(store, f"CA{i:03d}", started=T0 - timedelta(days=i * 3, minutes=i))
    await store.flush()
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = store.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        seen = await owner.activity(
            store.repo.sessions, date(2025, 12, 2), date(2026, 3, 3), ZoneInfo("UTC")
        )
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(seen.days) == 92 and seen.calls == 30
    assert len([s for s in statements if "GROUP BY" in s.upper()]) == 2
    assert len(statements) == 2


async def test_the_migration_indexes_what_is_already_there(database: Any) -> None:
    """Calls recorded before 0005 (turns, numbers, finished analyses) are searchable after it."""
    from livecall.store import db
    from livecall.store.repository import Repository

    engine = database.engine()
    try:
        await db.upgrade(engine, "0004")
        started = T0.replace(tzinfo=None) if database.kind == "sqlite" else T0
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO calls (call_sid, from_number, direction, status, started_at,"
                    " gemini_sessions, prompt_tokens, response_tokens, total_tokens, turn_count,"
                    " interruptions, frames_in, frames_out, frames_missing, custom_parameters)"
                    " VALUES ('CAold', '+1 (555) 010-2030', 'inbound', 'completed', :t,"
                    " 1, 0, 0, 0, 1, 0, 0, 0, 0, '{}')"
                ),
                {"t": started},
            )
            await conn.execute(
                text(
                    "INSERT INTO turns (call_sid, idx, speaker, text, start_ms, interrupted)"
                    " VALUES ('CAold', 0, 'caller', 'Table for Abernathy please', 0, false)"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO call_analyses (call_sid, status, attempts, next_attempt_at,"
                    " summary, fields, created_at)"
                    " VALUES ('CAold', 'done', 1, :t, 'Booked a birthday dinner',"
                    " :fields, :t)"
                ),
                {"t": started, "fields": '{"party_size": 6}'},
            )
        await db.upgrade(engine)
        repo = Repository(db.make_sessionmaker(engine))
        for query, source in (
            ("abernathy", "caller"),
            ("birthday", "summary"),
            ("party", "field:party_size"),
        ):
            (hit,) = await repo.search(query)
            assert (hit.call.call_sid, hit.source) == ("CAold", source), query
        assert [h.call.call_sid for h in await repo.search("2030")] == ["CAold"]
    finally:
        await engine.dispose()
