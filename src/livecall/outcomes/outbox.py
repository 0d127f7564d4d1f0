"""The webhook outbox in the database: rows written through the call records' writer, and the
queries the delivery worker, the API and the dashboard make.

Enqueueing goes through `CallStore.enqueue` as two kinds of writer op (built here, applied by
the writer through `livecall.store.outbox_ops`), so an outbox row is
kept exactly like a call record: in memory, then spooled to disk while the database is down,
replayed in order (after the call's own `end` op), idempotent on replay:

- ``webhook``: one delivery for a call and URL (unique on both: a replay or a second stream
  of the same call adds nothing).
- ``webhook_analysis``: the call's post-call analysis is stored (or has finally failed): the
  delivery, still waiting and never attempted, becomes due now with it.

Claiming works on SQLite and PostgreSQL alike: a conditional UPDATE sets a lease only where
none is live, and only the rows that carry this claim's token are sent (on PostgreSQL the
candidate SELECT also uses ``FOR UPDATE SKIP LOCKED``). A claim's token is ``<owner>:<random>``,
so a stopping worker hands back every lease it still holds at once (`release_owned`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from livecall.outcomes.webhook_payload import new_delivery_id
from livecall.store.models import SID_LENGTH, WebhookDelivery

__all__ = [
    "HISTORY_LIMIT",
    "Outbox",
    "analysis_op",
    "webhook_op",
]

HISTORY_LIMIT = 50  # attempts kept per delivery (a day of backoff is ~30)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _prefix(owner: str) -> str:
    """What every claim token of `owner` starts with (the column holds 64 characters)."""
    return f"{owner[:40]}:"


def webhook_op(
    call_sid: str,
    url: str,
    *,
    now: datetime,
    await_analysis: bool = False,
    analysis_wait_s: float = 900.0,
) -> dict[str, Any]:
    """The writer op that puts one delivery in the outbox.

    A delivery that waits for analysis is due at `now + analysis_wait_s` at the latest: if
    the analysis never says it is done, the webhook goes without it.
    """
    due = now + timedelta(seconds=analysis_wait_s) if await_analysis else now
    return {
        "op": "webhook",
        "call_sid": call_sid.replace("\x00", "")[:SID_LENGTH],  # as the writer stores it
        "delivery_id": new_delivery_id(),
        "url": url,
        "await_analysis": bool(await_analysis),
        "created_at": _iso(now),
        "due_at": _iso(due),
    }


def analysis_op(
    call_sid: str, analysis: Mapping[str, Any] | None, *, now: datetime
) -> dict[str, Any]:
    """The writer op that releases a call's waiting delivery (`analysis` None: it failed)."""
    return {
        "op": "webhook_analysis",
        "call_sid": call_sid.replace("\x00", "")[:SID_LENGTH],
        "analysis": dict(analysis) if analysis is not None else None,
        "at": _iso(now),
    }


class Outbox:
    """The queries over `webhook_outbox` (the worker's claims, the pages' reads)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def claim(
        self, now: datetime, lease_s: float, limit: int, owner: str
    ) -> list[WebhookDelivery]:
        """Take up to `limit` due deliveries for `lease_s` seconds; only they are returned."""
        token = f"{_prefix(owner)}{uuid.uuid4().hex[:16]}"
        free = or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now)
        async with self.sessions.begin() as session:
            candidates = (
                select(WebhookDelivery.id)
                .where(
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                    free,
                )
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(limit)
            )
            if session.get_bind().dialect.name == "postgresql":
                candidates = candidates.with_for_update(skip_locked=True)
            ids = list((await session.scalars(candidates)).all())
            if not ids:
                return []
            # the lease condition again: a row another instance claimed meanwhile is skipped
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(ids), WebhookDelivery.status == "pending", free)
                .values(lease_owner=token, lease_until=now + timedelta(seconds=lease_s))
            )
            rows = await session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.lease_owner == token)
            )
            return list(rows.all())

    async def save_payload(
        self, delivery_id: str, owner: str, payload: str, give_up_at: datetime
    ) -> None:
        """The body built for a delivery's first attempt: every retry sends these bytes."""
        async with self.sessions.begin() as session:
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_owner == owner)
                .values(payload=payload, give_up_at=give_up_at)
            )

    async def record_attempt(
        self,
        row: WebhookDelivery,
        *,
        at: datetime,
        status_code: int | None,
        error: str | None,
        ms: float,
        delivered: bool,
        next_at: datetime | None,
    ) -> None:
        """One attempt's outcome; releases the lease. `next_at` None and not delivered: failed."""
        entry = {"at": _iso(at), "status_code": status_code, "error": error, "ms": round(ms, 1)}
        history = [*(row.history or []), entry][-HISTORY_LIMIT:]
        values: dict[str, Any] = {
            "attempts": WebhookDelivery.attempts + 1,
            "last_status_code": status_code,
            "last_error": error,
            "last_attempt_at": at,
            "history": history,
            "lease_owner": None,
            "lease_until": None,
        }
        if delivered:
            values.update(status="delivered", delivered_at=at)
        elif next_at is None:
            values.update(status="failed")
        else:
            values.update(next_attempt_at=next_at)
        async with self.sessions.begin() as session:
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == row.id, WebhookDelivery.lease_owner == row.lease_owner)
                .values(**values)
            )

    async def release(self, row: WebhookDelivery) -> None:
        """Give a claimed row back untouched (the worker is stopping, or the call is gone)."""
        async with self.sessions.begin() as session:
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == row.id, WebhookDelivery.lease_owner == row.lease_owner)
                .values(lease_owner=None, lease_until=None)
            )

    async def release_owned(self, owner: str) -> int:
        """Give back every row `owner`'s claims still hold, untouched (it is stopping): a
        claim cut off after its commit, or a send whose own release did not get through."""
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.lease_owner.startswith(_prefix(owner), autoescape=True))
                .values(lease_owner=None, lease_until=None)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    async def for_call(self, call_sid: str) -> list[WebhookDelivery]:
        async with self.sessions() as session:
            rows = await session.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.call_sid == call_sid)
                .order_by(WebhookDelivery.created_at)
            )
            return list(rows.all())

    async def retry_now(self, call_sid: str, now: datetime, give_up_s: float) -> int:
        """Make every delivery of a call due now (same ids, fresh give-up deadline).

        A delivery being sent right now keeps its lease: it is not sent twice at once.
        """
        async with self.sessions.begin() as session:
            result = await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.call_sid == call_sid)
                .values(
                    status="pending",
                    await_analysis=False,
                    next_attempt_at=now,
                    give_up_at=now + timedelta(seconds=give_up_s),
                )
            )
            return int(getattr(result, "rowcount", 0) or 0)

    async def counts(self) -> dict[str, int]:
        """Deliveries by status (for the metrics gauge)."""
        async with self.sessions() as session:
            rows = await session.execute(
                select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
            )
            return {str(status): int(n) for status, n in rows}
