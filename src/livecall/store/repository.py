"""Async queries over the call records: batch writes for the writer, reads for the API and CLI.

Writes are upserts on natural keys (call_sid; call_sid+idx; call_sid+seq) so that the same
batch can be applied twice (a retry, a spool replay) without duplicating anything.
Statistics are computed with window functions both SQLite and PostgreSQL have, so the
percentiles are the same (linear interpolation, like PostgreSQL's `percentile_cont`) on both.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    case,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from livecall.store import search
from livecall.store.models import (
    Call,
    CallAnalysis,
    CallerMemory,
    CallEvent,
    DeletedCall,
    SearchDoc,
    Turn,
    WebhookDelivery,
)
from livecall.store.outbox_ops import OUTBOX_OPS, apply_outbox_ops

PERCENTILES = (50, 90, 95, 99)

# The fields each write op may set; anything else in an op is ignored.
_START_FIELDS = (
    "stream_sid",
    "account_sid",
    "from_number",
    "to_number",
    "direction",
    "profile",
    "model",
    "started_at",
    "custom_parameters",
)
_END_FIELDS = (
    "ended_at",
    "duration_s",
    "end_reason",
    "status",
    "turn_count",
    "interruptions",
    "frames_in",
    "frames_out",
    "frames_missing",
    "gemini_sessions",
    "prompt_tokens",
    "response_tokens",
    "total_tokens",
    "recording_key",
)
_TURN_FIELDS = (
    "speaker",
    "text",
    "heard_text",
    "start_ms",
    "end_ms",
    "interrupted",
    "heard_estimated",
    "first_audio_latency_ms",
    "barge_in_stop_ms",
)
_EVENT_FIELDS = ("at_ms", "kind", "name", "duration_ms", "data")
_DIGIT_FIELDS = ("from_rdigits", "to_rdigits")


class InvalidCursor(ValueError):
    """A pagination cursor that this server did not hand out."""


def _ts(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def _insert_for(session: AsyncSession) -> Any:
    """The dialect's INSERT with ON CONFLICT support."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise ValueError(f"call records need SQLite or PostgreSQL, not {name} (see make_engine)")


async def _call_locks(session: AsyncSession, sids: Iterable[str], *, shared: bool) -> None:
    """PostgreSQL: per-call advisory locks for this transaction, so that a delete and a write
    of the same call never interleave (a write checks the tombstone, then inserts). Writes
    share them; a delete takes its one call's lock alone. SQLite serializes writers itself."""
    if session.get_bind().dialect.name != "postgresql":
        return
    fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    await session.execute(
        text(f"SELECT {fn}(hashtextextended(sid, 0)) FROM unnest(CAST(:sids AS text[])) AS sid"),
        {"sids": sorted(sids)},
    )


def encode_cursor(started_at: datetime, call_sid: str) -> str:
    raw = orjson.dumps([started_at.isoformat(), call_sid])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, sid = orjson.loads(raw)
        if not isinstance(stamp, str) or not isinstance(sid, str):
            raise TypeError
        return datetime.fromisoformat(stamp), sid
    except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError) as exc:
        raise InvalidCursor("invalid cursor") from exc


@dataclass(slots=True)
class CallPage:
    items: list[Call]
    total: int
    next_cursor: str | None


@dataclass(slots=True)
class Distribution:
    """Summary of one latency: count, mean, max and interpolated percentiles."""

    count: int = 0
    mean: float | None = None
    max: float | None = None
    percentiles: dict[str, float | None] = field(
        default_factory=lambda: {f"p{p}": None for p in PERCENTILES}
    )


@dataclass(slots=True)
class Stats:
    calls: int
    by_status: dict[str, int]
    by_end_reason: dict[str, int]
    total_duration_s: float
    mean_duration_s: float | None
    max_duration_s: float | None
    turns: int
    interrupted_turns: int
    answer_ms: Distribution
    first_audio_latency_ms: Distribution
    barge_in_stop_ms: Distribution
    total_tokens: int


class Repository:
    """Every query livecall makes against the call records."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    # --- writes ---------------------------------------------------------------------------

    async def apply(self, ops: Sequence[Mapping[str, Any]]) -> None:
        """Write a batch of ops (see `store.writer`) in one transaction, idempotently.

        Rows go in dependency order (calls, then turns and events, then call updates), and
        repeated keys inside a batch collapse to the last value, so PostgreSQL never sees one
        row touched twice by a single statement.
        """
        async with self.sessions.begin() as session:
            # an erased call stays erased: its records arriving late are dropped
            sids = {op["call_sid"] for op in ops}
            await _call_locks(session, sids, shared=True)
            erased = set(
                (
                    await session.scalars(
                        select(DeletedCall.call_sid).where(DeletedCall.call_sid.in_(sids))
                    )
                ).all()
            )
            await self._apply(session, [op for op in ops if op["call_sid"] not in erased])

    async def _apply(self, session: AsyncSession, ops: Sequence[Mapping[str, Any]]) -> None:
        starts: dict[str, dict[str, Any]] = {}
        turns: dict[tuple[str, int], dict[str, Any]] = {}
        events: dict[tuple[str, int], dict[str, Any]] = {}
        answered: dict[str, datetime] = {}
        ends: dict[str, dict[str, Any]] = {}
        # webhook deliveries ride the same batches
        outbox: list[Mapping[str, Any]] = []
        for op in ops:
            kind = op["op"]
            if kind in OUTBOX_OPS:
                outbox.append(op)
                continue
            sid = op["call_sid"]
            if kind == "start":
                starts[sid] = {"call_sid": sid, **{k: op.get(k) for k in _START_FIELDS}}
                starts[sid]["started_at"] = _ts(op["started_at"])
                starts[sid]["direction"] = op.get("direction") or "inbound"
                starts[sid]["custom_parameters"] = op.get("custom_parameters") or {}
                starts[sid]["from_rdigits"] = search.rdigits(op.get("from_number"))
                starts[sid]["to_rdigits"] = search.rdigits(op.get("to_number"))
            elif kind == "turn":
                row = {"call_sid": sid, "idx": op["idx"], **{k: op.get(k) for k in _TURN_FIELDS}}
                row["text"] = row["text"] or ""
                row["interrupted"] = bool(row["interrupted"])
                row["heard_estimated"] = bool(row["heard_estimated"])  # spooled before it existed
                turns[(sid, op["idx"])] = row
            elif kind == "event":
                row = {"call_sid": sid, "seq": op["seq"], **{k: op.get(k) for k in _EVENT_FIELDS}}
                row["data"] = row["data"] or {}
                events.setdefault((sid, op["seq"]), row)
            elif kind == "answered":
                stamp = _ts(op["answered_at"])
                assert stamp is not None
                answered.setdefault(sid, stamp)
            elif kind == "end":
                row = {k: op.get(k) for k in _END_FIELDS}
                row["ended_at"] = _ts(op["ended_at"])
                ends[sid] = row
        insert = _insert_for(session)
        if starts:
            stmt = insert(Call)
            stmt = stmt.on_conflict_do_update(
                index_elements=[Call.call_sid],
                set_={k: stmt.excluded[k] for k in (*_START_FIELDS, *_DIGIT_FIELDS)},
            )
            await session.execute(stmt, list(starts.values()))
        # A turn or event for a call we never saw start (should not happen, but a lost
        # start must not lose the rest): make a placeholder row so the keys hold.
        orphans = {sid for sid, _ in turns} | {sid for sid, _ in events} | set(ends)
        orphans -= starts.keys()
        if orphans:
            await self._ensure_calls(session, orphans, ends)
        if turns:
            stmt = insert(Turn)
            stmt = stmt.on_conflict_do_update(
                index_elements=[Turn.call_sid, Turn.idx],
                set_={k: stmt.excluded[k] for k in _TURN_FIELDS},
            )
            await session.execute(stmt, list(turns.values()))
            docs = (
                search.turn_doc(t["call_sid"], t["speaker"], t["idx"], t["text"])
                for t in turns.values()
            )
            await search.index_docs(session, docs)
        if events:
            stmt = insert(CallEvent).on_conflict_do_nothing(
                index_elements=[CallEvent.call_sid, CallEvent.seq]
            )
            await session.execute(stmt, list(events.values()))
        for sid, stamp in answered.items():
            await session.execute(
                update(Call)
                .where(Call.call_sid == sid, Call.answered_at.is_(None))
                .values(answered_at=stamp)
            )
        for sid, values in ends.items():
            await session.execute(update(Call).where(Call.call_sid == sid).values(**values))
        if outbox:
            await apply_outbox_ops(session, outbox)

    async def _ensure_calls(
        self, session: AsyncSession, sids: Iterable[str], ends: Mapping[str, Mapping[str, Any]]
    ) -> None:
        insert = _insert_for(session)
        rows: list[dict[str, Any]] = []
        for sid in sorted(sids):
            end = ends.get(sid)
            started = end["ended_at"] if end else None
            if end and started is not None and end.get("duration_s"):
                started = started - timedelta(seconds=float(end["duration_s"]))
            rows.append(
                {
                    "call_sid": sid,
                    "started_at": started or datetime.now(UTC),
                    "custom_parameters": {},
                }
            )
        stmt = insert(Call).on_conflict_do_nothing(index_elements=[Call.call_sid])
        await session.execute(stmt, rows)

    async def delete_call(self, call_sid: str) -> bool:
        """Erase a call with its turns and events, for good (a tombstone stops later writes of
        it); False when there was no row."""
        async with self.sessions.begin() as session:
            # waits for a batch writing this call to commit; a later one sees the tombstone
            await _call_locks(session, {call_sid}, shared=False)
            tombstone = _insert_for(session)(DeletedCall).on_conflict_do_nothing(
                index_elements=[DeletedCall.call_sid]
            )
            await session.execute(
                tombstone, [{"call_sid": call_sid, "deleted_at": datetime.now(UTC)}]
            )
            # explicit, in case a SQLite connection was opened without foreign keys
            await session.execute(delete(Turn).where(Turn.call_sid == call_sid))
            await session.execute(delete(CallEvent).where(CallEvent.call_sid == call_sid))
            await session.execute(delete(SearchDoc).where(SearchDoc.call_sid == call_sid))
            await session.execute(  # a pending webhook holds the transcript too
                delete(WebhookDelivery).where(WebhookDelivery.call_sid == call_sid)
            )
            await session.execute(delete(CallAnalysis).where(CallAnalysis.call_sid == call_sid))
            await session.execute(delete(CallerMemory).where(CallerMemory.call_sid == call_sid))
            result = await session.execute(delete(Call).where(Call.call_sid == call_sid))
            return bool(getattr(result, "rowcount", 0))

    async def clear_recordings(self, call_sids: Iterable[str]) -> None:
        """Forget recording keys whose files are gone (retention)."""
        sids = list(call_sids)
        if not sids:
            return
        async with self.sessions.begin() as session:
            await session.execute(
                update(Call).where(Call.call_sid.in_(sids)).values(recording_key=None)
            )

    # --- reads ----------------------------------------------------------------------------

    @staticmethod
    def _filters(
        since: datetime | None,
        until: datetime | None,
        number: str | None,
        status: str | None,
        number_ends: str | None = None,
        outcome: str | None = None,
    ) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if outcome:
            from livecall.store.owner import outcome_case

            where.append(outcome_case() == outcome)
        if number_ends:
            where.append(search.number_suffix(number_ends))
        if since is not None:
            where.append(Call.started_at >= since)
        if until is not None:
            where.append(Call.started_at < until)
        if number:
            where.append(or_(Call.from_number == number, Call.to_number == number))
        if status:
            where.append(Call.status == status)
        return where

    async def list_calls(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        number: str | None = None,
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        offset: int | None = None,
        number_ends: str | None = None,
        outcome: str | None = None,
    ) -> CallPage:
        """Newest calls first. Page with `cursor` (stable under inserts) or `offset`.

        `number` is an exact number; `number_ends` any tail of one, in any format."""
        where = self._filters(since, until, number, status, number_ends, outcome)
        query: Select[Call] = select(Call).where(*where)
        if cursor:
            stamp, sid = decode_cursor(cursor)
            query = query.where(
                or_(
                    Call.started_at < stamp,
                    and_(Call.started_at == stamp, Call.call_sid < sid),
                )
            )
        query = query.order_by(Call.started_at.desc(), Call.call_sid.desc()).limit(limit + 1)
        if offset:
            query = query.offset(offset)
        async with self.sessions() as session:
            rows = list((await session.scalars(query)).all())
            total = await session.scalar(select(func.count()).select_from(Call).where(*where))
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_cursor = encode_cursor(last.started_at, last.call_sid)
        return CallPage(items=rows, total=int(total or 0), next_cursor=next_cursor)

    async def search(
        self,
        query: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        status: str | None = None,
        limit: int = 50,
        outcome: str | None = None,
    ) -> list[search.SearchHit]:
        """Calls (newest first) with a line holding every word of `query`, each with its first
        matching line; a query that is a number matches calls whose number ends with it."""
        if search.looks_like_number(query):
            page = await self.list_calls(
                since=since,
                until=until,
                status=status,
                number_ends=query,
                limit=limit,
                outcome=outcome,
            )
            return [search.SearchHit(call) for call in page.items]
        terms = search.search_terms(query)
        if not terms:
            return []
        where = self._filters(since, until, None, status, outcome=outcome)
        async with self.sessions() as session:
            dialect = session.get_bind().dialect.name
            rows = await session.execute(
                select(SearchDoc.call_sid, SearchDoc.source, SearchDoc.ref, SearchDoc.text)
                .join(Call, Call.call_sid == SearchDoc.call_sid)
                .where(search.text_matches(dialect, terms), *where)
                .order_by(Call.started_at.desc(), Call.call_sid.desc(), SearchDoc.id)
                .limit(limit * 20)
            )
            first: dict[str, tuple[str, int, str]] = {}  # call -> its first matching line
            matches: dict[str, int] = {}
            for sid, source, ref, line in rows:
                if sid not in first:
                    if len(first) >= limit:
                        continue
                    first[sid] = (source, ref, line)
                matches[sid] = matches.get(sid, 0) + 1
            if not first:
                return []
            found = await session.scalars(select(Call).where(Call.call_sid.in_(first)))
            calls = {c.call_sid: c for c in found.all()}
        return [
            search.SearchHit(calls[sid], *first[sid], matches=matches[sid])
            for sid in first
            if sid in calls
        ]

    async def get_call(self, call_sid: str) -> Call | None:
        """A call with its transcript (turns by index) and events (by sequence)."""
        query = (
            select(Call)
            .where(Call.call_sid == call_sid)
            .options(selectinload(Call.turns), selectinload(Call.events))
        )
        async with self.sessions() as session:
            return (await session.scalars(query)).first()

    async def stats(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        number: str | None = None,
        status: str | None = None,
    ) -> Stats:
        where = self._filters(since, until, number, status)
        calls = select(Call.call_sid).where(*where)
        async with self.sessions() as session:
            by_status = {
                s: int(n)
                for s, n in await session.execute(
                    select(Call.status, func.count()).where(*where).group_by(Call.status)
                )
            }
            by_reason = {
                (r or "unknown"): int(n)
                for r, n in await session.execute(
                    select(Call.end_reason, func.count())
                    .where(*where, Call.ended_at.is_not(None))
                    .group_by(Call.end_reason)
                )
            }
            total_s, mean_s, max_s, tokens = (
                await session.execute(
                    select(
                        func.coalesce(func.sum(Call.duration_s), 0.0),
                        func.avg(Call.duration_s),
                        func.max(Call.duration_s),
                        func.coalesce(func.sum(Call.total_tokens), 0),
                    ).where(*where)
                )
            ).one()
            turn_total, interrupted = (
                await session.execute(
                    select(
                        func.count(Turn.id),
                        func.coalesce(func.sum(case((Turn.interrupted, 1), else_=0)), 0),
                    ).where(Turn.call_sid.in_(calls))
                )
            ).one()
            first_answer = (
                select(func.min(Turn.start_ms).label("v"))
                .where(Turn.call_sid.in_(calls), Turn.speaker == "agent")
                .group_by(Turn.call_sid)
            )
            answer = await _distribution(session, first_answer.subquery())
            latency = await _distribution(
                session,
                select(Turn.first_audio_latency_ms.label("v"))
                .where(Turn.call_sid.in_(calls), Turn.first_audio_latency_ms.is_not(None))
                .subquery(),
            )
            barge = await _distribution(
                session,
                select(Turn.barge_in_stop_ms.label("v"))
                .where(Turn.call_sid.in_(calls), Turn.barge_in_stop_ms.is_not(None))
                .subquery(),
            )
        return Stats(
            calls=sum(by_status.values()),
            by_status=by_status,
            by_end_reason=by_reason,
            total_duration_s=float(total_s or 0.0),
            mean_duration_s=None if mean_s is None else float(mean_s),
            max_duration_s=None if max_s is None else float(max_s),
            turns=int(turn_total or 0),
            interrupted_turns=int(interrupted or 0),
            answer_ms=answer,
            first_audio_latency_ms=latency,
            barge_in_stop_ms=barge,
            total_tokens=int(tokens or 0),
        )


def percentile_ranks(
    n: int, percentiles: Iterable[int] = PERCENTILES
) -> dict[int, tuple[int, int, float]]:
    """For each percentile: the 1-based ranks around it and the weight of the upper one."""
    out: dict[int, tuple[int, int, float]] = {}
    for p in percentiles:
        pos = (p / 100) * (n - 1)
        lo = math.floor(pos)
        out[p] = (lo + 1, min(lo + 2, n), pos - lo)
    return out


async def _distribution(session: AsyncSession, values: Any) -> Distribution:
    """Percentiles of the column `v` of a subquery without loading every value.

    One query counts, one fetches only the ranked rows around each percentile.
    """
    count, mean, top = (
        await session.execute(
            select(func.count(values.c.v), func.avg(values.c.v), func.max(values.c.v))
        )
    ).one()
    n = int(count or 0)
    dist = Distribution(count=n)
    if n == 0:
        return dist
    dist.mean = float(mean)
    dist.max = float(top)
    ranks = percentile_ranks(n)
    wanted = sorted({r for lo, hi, _ in ranks.values() for r in (lo, hi)})
    ranked = select(
        values.c.v.label("v"), func.row_number().over(order_by=values.c.v).label("rn")
    ).subquery()
    rows = await session.execute(select(ranked.c.rn, ranked.c.v).where(ranked.c.rn.in_(wanted)))
    at = {int(rn): float(v) for rn, v in rows}
    for p, (lo, hi, weight) in ranks.items():
        dist.percentiles[f"p{p}"] = at[lo] + (at[hi] - at[lo]) * weight
    return dist
