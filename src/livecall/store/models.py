"""The call-records schema: one row per call, its turns, and its events.

The natural keys carry idempotency: a call is its Twilio `call_sid`, a turn is
(`call_sid`, `idx`) and an event is (`call_sid`, `seq`), so replaying the same records after
an outage updates rows instead of duplicating them. Turns and events go with their call
(`ON DELETE CASCADE`), so erasing a call erases everything said in it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations can drop or alter them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SID_LENGTH = 64
CALL_STATUSES = ("in_progress", "completed", "failed")


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always read back timezone-aware.

    SQLite has no time zones: values are stored as naive UTC there, and tagged UTC on the way
    out, so filters and sorting compare like with like on both backends.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSON everywhere, JSONB on PostgreSQL (indexable, compact).
JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Call(Base):
    """One phone call, from the stream's start to its end."""

    __tablename__ = "calls"

    call_sid: Mapped[str] = mapped_column(String(SID_LENGTH), primary_key=True)
    stream_sid: Mapped[str | None] = mapped_column(String(SID_LENGTH))
    account_sid: Mapped[str | None] = mapped_column(String(SID_LENGTH))
    from_number: Mapped[str | None] = mapped_column(String(64))
    to_number: Mapped[str | None] = mapped_column(String(64))
    direction: Mapped[str] = mapped_column(String(16), default="inbound")
    profile: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(128))
    # in_progress until the call ends, then completed or failed
    status: Mapped[str] = mapped_column(String(16), default="in_progress")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # when the caller first heard the agent (stream start + first agent turn's start)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    duration_s: Mapped[float | None] = mapped_column(Float)
    end_reason: Mapped[str | None] = mapped_column(String(64))
    gemini_sessions: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    response_tokens: Mapped[int] = mapped_column(Integer, default=0)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0)
    turn_count: Mapped[int] = mapped_column(Integer, default=0)
    interruptions: Mapped[int] = mapped_column(Integer, default=0)
    frames_in: Mapped[int] = mapped_column(Integer, default=0)
    frames_out: Mapped[int] = mapped_column(Integer, default=0)
    frames_missing: Mapped[int] = mapped_column(Integer, default=0)
    recording_key: Mapped[str | None] = mapped_column(Text)
    custom_parameters: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # the numbers' digits reversed ("+1 (555) 010-2030" -> "0302010555 1" without the space),
    # so "ends with" is a prefix range an index can answer (see store.search)
    from_rdigits: Mapped[str | None] = mapped_column(String(32))
    to_rdigits: Mapped[str | None] = mapped_column(String(32))
    # "Needs a call back": when someone marked the call handled (None: not yet)
    callback_handled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    turns: Mapped[list[Turn]] = relationship(
        back_populates="call",
        order_by="Turn.idx",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )
    events: Mapped[list[CallEvent]] = relationship(
        back_populates="call",
        order_by="CallEvent.seq",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        # the list view: newest first, then keyset pagination on (started_at, call_sid)
        Index("ix_calls_started_at_call_sid", "started_at", "call_sid"),
        Index("ix_calls_from_number", "from_number"),
        Index("ix_calls_to_number", "to_number"),
        Index("ix_calls_status", "status"),
        Index("ix_calls_from_rdigits", "from_rdigits"),
        Index("ix_calls_to_rdigits", "to_rdigits"),
    )


class Turn(Base):
    """One stretch of speech by the caller or the agent, with its per-turn timings."""

    __tablename__ = "turns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_sid: Mapped[str] = mapped_column(
        String(SID_LENGTH), ForeignKey("calls.call_sid", ondelete="CASCADE")
    )
    idx: Mapped[int] = mapped_column(Integer)
    speaker: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text, default="")
    # for an agent turn cut short: what the caller heard before the `clear`
    heard_text: Mapped[str | None] = mapped_column(Text)
    start_ms: Mapped[int] = mapped_column(Integer)
    end_ms: Mapped[int | None] = mapped_column(Integer)
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    # heard_text from livecall's pacing model: the carrier confirms no playout (no marks)
    heard_estimated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # end of the caller's speech -> first agent audio sent
    first_audio_latency_ms: Mapped[float | None] = mapped_column(Float)
    # the model's `interrupted` -> `clear` sent to the carrier
    barge_in_stop_ms: Mapped[float | None] = mapped_column(Float)

    call: Mapped[Call] = relationship(back_populates="turns")

    __table_args__ = (UniqueConstraint("call_sid", "idx"),)


class CallEvent(Base):
    """Anything else that happened in a call: keypad, tools, sessions, errors.

    `name` and `duration_ms` are lifted out of `data` (when present) so tool calls can be
    filtered and timed without parsing JSON.
    """

    __tablename__ = "call_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_sid: Mapped[str] = mapped_column(
        String(SID_LENGTH), ForeignKey("calls.call_sid", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    at_ms: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(128))
    duration_ms: Mapped[float | None] = mapped_column(Float)
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    call: Mapped[Call] = relationship(back_populates="events")

    __table_args__ = (
        UniqueConstraint("call_sid", "seq"),
        Index("ix_call_events_kind", "kind"),
    )


class WebhookDelivery(Base):
    """One end-of-call webhook in the outbox (`livecall.outcomes.webhooks` delivers it).

    `id` is the delivery id receivers deduplicate on: the same on every attempt. `payload`
    holds the exact body once built, so every retry sends the same bytes. A worker owns a row
    while `lease_until` is in the future, so several instances never send it at once.
    """

    __tablename__ = "webhook_outbox"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    call_sid: Mapped[str] = mapped_column(
        String(SID_LENGTH), ForeignKey("calls.call_sid", ondelete="CASCADE")
    )
    url: Mapped[str] = mapped_column(Text)
    # pending until a 2xx (delivered) or the give-up deadline (failed)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    # waiting for the call's post-call analysis (see `WebhookService.analysis_settled`)
    await_analysis: Mapped[bool] = mapped_column(Boolean, default=False)
    analysis: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    give_up_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    payload: Mapped[str | None] = mapped_column(Text)
    # the latest attempts: [{"at", "status_code", "error", "ms"}], bounded
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)

    __table_args__ = (
        UniqueConstraint("call_sid", "url"),
        Index("ix_webhook_outbox_status_next_attempt_at", "status", "next_attempt_at"),
    )


class DeletedCall(Base):
    """A tombstone: this call was erased, and records of it arriving later (a spool replayed
    after an outage, another instance's late writes) are dropped instead of bringing it back."""

    __tablename__ = "deleted_calls"

    call_sid: Mapped[str] = mapped_column(String(SID_LENGTH), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(UTCDateTime())


ANALYSIS_STATUSES = ("pending", "done", "failed", "skipped")


class CallAnalysis(Base):
    """The post-call analysis of one call (`livecall.outcomes.analysis`): its state and result.

    A row is the durable to-do item as much as the result: `pending` rows are what the
    analysis worker picks up (after `next_attempt_at`), so pending work survives a restart.
    """

    __tablename__ = "call_analyses"

    call_sid: Mapped[str] = mapped_column(
        String(SID_LENGTH), ForeignKey("calls.call_sid", ondelete="CASCADE"), primary_key=True
    )
    profile: Mapped[str | None] = mapped_column(String(128))
    # pending until done, failed (attempts used up) or skipped (nothing was said)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(128))
    summary: Mapped[str | None] = mapped_column(Text)
    fields: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    success: Mapped[bool | None] = mapped_column(Boolean)
    success_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_call_analyses_status_next", "status", "next_attempt_at"),)


class CallerMemory(Base):
    """What the agent may remember of one past call with a number (opt-in per profile).

    Keyed by the normalized remote number and the profile, so one business never sees what a
    caller told another; deleted with its call, per number on request, and by retention.
    """

    __tablename__ = "caller_memory"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_sid: Mapped[str] = mapped_column(
        String(SID_LENGTH), ForeignKey("calls.call_sid", ondelete="CASCADE"), unique=True
    )
    number: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(128))
    call_started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    summary: Mapped[str] = mapped_column(Text, default="")
    fields: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    __table_args__ = (
        Index("ix_caller_memory_number_profile", "number", "profile", "call_started_at"),
    )


class SearchDoc(Base):
    """One searchable line of a call: a transcript turn now; a summary or an extracted field
    once post-call analysis writes them (`store.search.analysis_docs`).

    Full-text indexed outside the models (migration 0005): an FTS5 table `search_fts` kept in
    step by triggers on SQLite, a GIN index on `to_tsvector('simple', text)` on PostgreSQL.
    """

    __tablename__ = "search_docs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_sid: Mapped[str] = mapped_column(
        String(SID_LENGTH), ForeignKey("calls.call_sid", ondelete="CASCADE")
    )
    # caller | agent (a turn, ref = its index) | summary | field:<name> (ref 0)
    source: Mapped[str] = mapped_column(String(64))
    ref: Mapped[int] = mapped_column(Integer, default=0)
    text: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (UniqueConstraint("call_sid", "source", "ref"),)


class Claim(Base):
    """A single-use claim or a short-lived shared value, shared by every worker and instance
    on this database (`store.claims_db`): who holds `key` of `kind` until `expires_at`.

    The primary key makes the first insert win; an expired row is anyone's again, and pruned.
    """

    __tablename__ = "claims"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), default="")
    value: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_claims_expires_at", "expires_at"),)
