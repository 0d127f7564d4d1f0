"""The owner's questions, asked of the call records: how did each call end in plain terms,
which callers need a call back, when do calls come, who calls again.

Outcomes: a call is `answered`, `abandoned` (the caller hung up within `ABANDON_S` without
saying a word: during the greeting), `failed` (livecall could not serve it) or `in_progress`.
The same rule runs in SQL (`outcome_case`, for counting) and in Python (`outcome_of`).

Time zones: SQLite has none, so activity is grouped by UTC quarter-hour in one GROUP BY query
on both databases, and each quarter-hour is placed in the business's day, hour and weekday in
Python (`LocalActivity`): right across DST changes and for zones 30 or 45 minutes off UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Integer,
    String,
    and_,
    case,
    cast,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql import Select

from livecall.store.models import Call, CallAnalysis, CallEvent, Turn

__all__ = [
    "ABANDON_S",
    "FLAG_SOURCES",
    "OUTCOMES",
    "SHORT_S",
    "Callback",
    "LocalActivity",
    "activity",
    "callback_count",
    "callbacks",
    "callers_who_spoke",
    "mark_handled",
    "needs_callback",
    "outcome_case",
    "outcome_of",
    "repeat_callers",
]

ABANDON_S = 10.0  # hung up this soon without a word: abandoned (during the greeting)
SHORT_S = 20.0  # answered but this short: worth a call back
OUTCOMES = ("answered", "abandoned", "failed", "in_progress")
QUARTER_S = 900


def caller_spoke() -> ColumnElement[bool]:
    return exists().where(Turn.call_sid == Call.call_sid, Turn.speaker == "caller", Turn.text != "")


def outcome_case(abandon_s: float = ABANDON_S) -> ColumnElement[str]:
    """The call's outcome as SQL (see the module's docstring)."""
    return case(
        (Call.status == "in_progress", literal("in_progress")),
        (Call.status == "failed", literal("failed")),
        (
            and_(func.coalesce(Call.duration_s, 0.0) < abandon_s, ~caller_spoke()),
            literal("abandoned"),
        ),
        else_=literal("answered"),
    )


def outcome_of(
    status: str, duration_s: float | None, spoke: bool, abandon_s: float = ABANDON_S
) -> str:
    """The same rule as `outcome_case`, for one call already loaded."""
    if status in ("in_progress", "failed"):
        return status
    if (duration_s or 0.0) < abandon_s and not spoke:
        return "abandoned"
    return "answered"


async def callers_who_spoke(
    sessions: async_sessionmaker[AsyncSession], call_sids: Iterable[str]
) -> set[str]:
    """Which of these calls have a caller line with words."""
    sids = list(call_sids)
    if not sids:
        return set()
    async with sessions() as session:
        rows = await session.scalars(
            select(Turn.call_sid)
            .where(Turn.call_sid.in_(sids), Turn.speaker == "caller", Turn.text != "")
            .distinct()
        )
        return set(rows.all())


# --- activity by the business's clock --------------------------------------------------------


def _quarter_key(dialect: str) -> ColumnElement[str]:
    """'YYYY-MM-DD HH:q' of a call's UTC start (q = quarter of the hour, 0-3)."""
    if dialect == "postgresql":
        utc = func.timezone("UTC", Call.started_at)
        quarter = cast(func.floor(func.extract("minute", utc) / 15), Integer)
        return func.to_char(utc, "YYYY-MM-DD HH24:").op("||")(cast(quarter, String))
    minute_quarter = cast(func.strftime("%M", Call.started_at), Integer) / 15
    return func.strftime("%Y-%m-%d %H:", Call.started_at).op("||")(cast(minute_quarter, String))


def _quarter_start(key: str) -> datetime:
    day_hour, quarter = key.rsplit(":", 1)
    start = datetime.strptime(day_hour, "%Y-%m-%d %H").replace(tzinfo=UTC)
    return start + timedelta(seconds=int(float(quarter)) * QUARTER_S)


@dataclass
class DayCount:
    day: date
    calls: int = 0
    answered: int = 0
    missed: int = 0  # abandoned + failed
    duration_s: float = 0.0
    latency_sum_ms: float = 0.0
    latency_n: int = 0

    @property
    def mean_latency_ms(self) -> float | None:
        return self.latency_sum_ms / self.latency_n if self.latency_n else None


@dataclass
class LocalActivity:
    """Calls counted by the business's days, hours (0-23) and weekdays (0 = Monday)."""

    zone: ZoneInfo
    start: date
    end: date  # inclusive
    days: dict[date, DayCount] = field(default_factory=dict)
    hours: list[int] = field(default_factory=lambda: [0] * 24)
    weekdays: list[int] = field(default_factory=lambda: [0] * 7)
    grid: list[list[int]] = field(default_factory=lambda: [[0] * 24 for _ in range(7)])
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    def __post_init__(self) -> None:
        day = self.start
        while day <= self.end:
            self.days[day] = DayCount(day)
            day += timedelta(days=1)

    @property
    def calls(self) -> int:
        return sum(self.outcomes.values())

    def add(self, when_utc: datetime, outcome: str, calls: int, duration_s: float) -> None:
        local = when_utc.astimezone(self.zone)
        day = self.days.get(local.date())
        if day is None:  # the UTC query range is a little wider than the local days
            return
        day.calls += calls
        day.duration_s += duration_s
        if outcome == "answered":
            day.answered += calls
        elif outcome in ("abandoned", "failed"):
            day.missed += calls
        self.hours[local.hour] += calls
        self.weekdays[local.weekday()] += calls
        self.grid[local.weekday()][local.hour] += calls
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + calls

    def add_latency(self, when_utc: datetime, total_ms: float, n: int) -> None:
        day = self.days.get(when_utc.astimezone(self.zone).date())
        if day is not None:
            day.latency_sum_ms += total_ms
            day.latency_n += n

    def busiest(self, top: int = 3) -> list[tuple[int, int, int]]:
        """The busiest (weekday, hour, calls), most calls first; none when there were none."""
        cells = [
            (calls, -wd, -h) for wd, row in enumerate(self.grid) for h, calls in enumerate(row)
        ]
        cells = sorted((c for c in cells if c[0] > 0), reverse=True)[:top]
        return [(-wd, -h, calls) for calls, wd, h in cells]


def local_range(start: date, end: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants of the business's midnight starting `start` and ending `end`."""
    lo = datetime(start.year, start.month, start.day, tzinfo=zone).astimezone(UTC)
    after = end + timedelta(days=1)
    hi = datetime(after.year, after.month, after.day, tzinfo=zone).astimezone(UTC)
    return lo, hi


async def activity(
    sessions: async_sessionmaker[AsyncSession], start: date, end: date, zone: ZoneInfo
) -> LocalActivity:
    """Every count the stats page draws, for the business's days `start`..`end`: two GROUP BY
    queries (calls by quarter-hour and outcome; agent reply latency by quarter-hour)."""
    lo, hi = local_range(start, end, zone)
    out = LocalActivity(zone, start, end)
    async with sessions() as session:
        dialect = session.get_bind().dialect.name
        key = _quarter_key(dialect).label("q")
        outcome = outcome_case().label("outcome")
        rows = await session.execute(
            select(key, outcome, func.count(), func.coalesce(func.sum(Call.duration_s), 0.0))
            .where(Call.started_at >= lo, Call.started_at < hi)
            .group_by(key, outcome)
        )
        for q, kind, calls, seconds in rows:
            out.add(_quarter_start(q), kind, int(calls), float(seconds or 0.0))
        latencies = await session.execute(
            select(key, func.sum(Turn.first_audio_latency_ms), func.count())
            .join(Turn, Turn.call_sid == Call.call_sid)
            .where(
                Call.started_at >= lo,
                Call.started_at < hi,
                Turn.first_audio_latency_ms.is_not(None),
            )
            .group_by(key)
        )
        for q, total, n in latencies:
            out.add_latency(_quarter_start(q), float(total or 0.0), int(n))
    return out


async def repeat_callers(
    sessions: async_sessionmaker[AsyncSession],
    since: datetime,
    until: datetime,
    limit: int = 10,
) -> tuple[int, list[dict[str, Any]]]:
    """(how many numbers called more than once, the top `limit` of them with their counts)."""
    number = Call.from_number
    where = (
        Call.started_at >= since,
        Call.started_at < until,
        Call.direction == "inbound",
        number.is_not(None),
        number != "softphone",
    )
    grouped = (
        select(number.label("number"), func.count().label("calls"), func.max(Call.started_at))
        .where(*where)
        .group_by(number)
        .having(func.count() > 1)
    )
    async with sessions() as session:
        total = await session.scalar(select(func.count()).select_from(grouped.subquery()))
        rows = await session.execute(
            grouped.order_by(func.count().desc(), func.max(Call.started_at).desc()).limit(limit)
        )
        top = [{"number": n, "calls": int(c), "last": last} for n, c, last in rows]
    return int(total or 0), top


# --- needs a call back ------------------------------------------------------------------------


# More reasons to call back, each a query of call SIDs (one line each): post-call analysis
# flags the calls that missed their goal.
FLAG_SOURCES: dict[str, Callable[[], Select[str]]] = {
    # post-call analysis said the call did not reach its goal
    "the call's analysis": lambda: select(CallAnalysis.call_sid).where(
        CallAnalysis.status == "done", CallAnalysis.success.is_(False)
    ),
}


def _needs_callback(short_s: float) -> ColumnElement[bool]:
    return and_(
        Call.direction == "inbound",
        Call.status != "in_progress",
        or_(
            Call.status == "failed",
            func.coalesce(Call.duration_s, 0.0) < short_s,
            *(Call.call_sid.in_(source()) for source in FLAG_SOURCES.values()),
        ),
    )


def needs_callback(call: Call, short_s: float = SHORT_S) -> bool:
    """The same rule as the list's, for one call already loaded."""
    if call.direction != "inbound" or call.status == "in_progress":
        return False
    return call.status == "failed" or (call.duration_s or 0.0) < short_s


@dataclass(slots=True)
class Callback:
    call: Call
    outcome: str
    reason: str  # why it is listed, in the owner's words
    heard: str  # what the caller heard before the call ended
    said: str  # the caller's last words, if any
    heard_quoted: bool = True  # `heard` is the agent's words (else a description)


def _heard(call: Call, agent_text: str | None, apology: bool) -> str:
    if agent_text:
        return agent_text
    if apology:
        return "the apology message (the agent could not be reached)"
    if call.status == "failed":
        return "nothing: the call failed before the agent spoke"
    return "nothing: they hung up before the agent spoke"


async def callbacks(
    sessions: async_sessionmaker[AsyncSession],
    *,
    handled: bool = False,
    since: datetime | None = None,
    short_s: float = SHORT_S,
    limit: int = 100,
) -> list[Callback]:
    """Failed, abandoned and very short inbound calls not yet marked handled (or, with
    `handled`, the ones that were), newest first, with what the caller heard and said."""
    where = [_needs_callback(short_s)]
    where.append(
        Call.callback_handled_at.is_not(None) if handled else Call.callback_handled_at.is_(None)
    )
    if since is not None:
        where.append(Call.started_at >= since)
    async with sessions() as session:
        calls = list(
            (
                await session.scalars(
                    select(Call)
                    .where(*where)
                    .order_by(Call.started_at.desc(), Call.call_sid.desc())
                    .limit(limit)
                )
            ).all()
        )
        sids = [c.call_sid for c in calls]
        if not sids:
            return []
        lines: dict[tuple[str, str], str] = {}
        last = (
            select(Turn.call_sid, Turn.speaker, func.max(Turn.idx).label("idx"))
            .where(Turn.call_sid.in_(sids), Turn.text != "")
            .group_by(Turn.call_sid, Turn.speaker)
            .subquery()
        )
        rows = await session.execute(
            select(Turn.call_sid, Turn.speaker, Turn.text, Turn.heard_text, Turn.interrupted).join(
                last,
                and_(
                    Turn.call_sid == last.c.call_sid,
                    Turn.speaker == last.c.speaker,
                    Turn.idx == last.c.idx,
                ),
            )
        )
        for sid, speaker, words, heard, interrupted in rows:
            lines[(sid, speaker)] = (heard if interrupted and heard is not None else words) or ""
        apologised = set(
            (
                await session.scalars(
                    select(CallEvent.call_sid)
                    .where(
                        CallEvent.call_sid.in_(sids),
                        CallEvent.kind == "error",
                    )
                    .distinct()
                )
            ).all()
        )
        flags: dict[str, set[str]] = {}
        for name, source in FLAG_SOURCES.items():
            flagged_here = select(Call.call_sid).where(
                Call.call_sid.in_(sids), Call.call_sid.in_(source())
            )
            flags[name] = set((await session.scalars(flagged_here)).all())
    out = []
    for call in calls:
        said = lines.get((call.call_sid, "caller"), "")
        kind = outcome_of(call.status, call.duration_s, bool(said))
        flagged = [name for name, marked in flags.items() if call.call_sid in marked]
        if flagged and kind == "answered" and (call.duration_s or 0.0) >= short_s:
            reason = f"Flagged by {', '.join(flagged)}"
        elif kind == "failed":
            reason = "The call failed"
        elif kind == "abandoned":
            reason = "Hung up during the greeting"
        else:
            reason = f"Very short call (under {short_s:.0f} s)"
        apology = call.end_reason == "gemini_failed" and call.call_sid in apologised
        agent_words = lines.get((call.call_sid, "agent"))
        heard = _heard(call, agent_words, apology)
        out.append(Callback(call, kind, reason, heard, said, heard_quoted=bool(agent_words)))
    return out


async def callback_count(
    sessions: async_sessionmaker[AsyncSession], short_s: float = SHORT_S
) -> int:
    async with sessions() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(Call)
            .where(_needs_callback(short_s), Call.callback_handled_at.is_(None))
        )
    return int(count or 0)


async def mark_handled(
    sessions: async_sessionmaker[AsyncSession], call_sid: str, handled: bool = True
) -> bool:
    """Marks a call handled (or not again); False when there is no such call."""
    async with sessions.begin() as session:
        result = await session.execute(
            update(Call)
            .where(Call.call_sid == call_sid)
            .values(callback_handled_at=datetime.now(UTC) if handled else None)
        )
        return bool(getattr(result, "rowcount", 0))
