"""The webhook outbox's writer ops, applied in the call records writer's transaction.

`livecall.outcomes.outbox` builds the ops (`webhook_op`, `analysis_op`) and queries the rows;
the store applies them here beside the call records they follow, so the store never needs
the outcomes package (which is built on the store):

- ``webhook``: one delivery for a call and URL (unique on both: a replay or a second stream
  of the same call adds nothing).
- ``webhook_analysis``: the call's post-call analysis is stored (or has finally failed): the
  delivery, still waiting and never attempted, becomes due now with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from livecall.store.models import WebhookDelivery

__all__ = ["OUTBOX_OPS", "apply_outbox_ops"]

OUTBOX_OPS = ("webhook", "webhook_analysis")


def _ts(value: Any) -> datetime:
    stamp = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _insert_for(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


async def apply_outbox_ops(session: AsyncSession, ops: Sequence[Mapping[str, Any]]) -> None:
    """Apply outbox ops inside the writer's transaction (after the calls they belong to)."""
    insert = _insert_for(session)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    releases: list[Mapping[str, Any]] = []
    for op in ops:
        if op["op"] == "webhook":
            rows.setdefault(
                (op["call_sid"], op["url"]),
                {
                    "id": op["delivery_id"],
                    "call_sid": op["call_sid"],
                    "url": op["url"],
                    "status": "pending",
                    "await_analysis": bool(op.get("await_analysis")),
                    "created_at": _ts(op["created_at"]),
                    "next_attempt_at": _ts(op.get("due_at") or op["created_at"]),
                    "attempts": 0,
                    "history": [],
                },
            )
        elif op["op"] == "webhook_analysis":
            releases.append(op)
    if rows:
        stmt = insert(WebhookDelivery).on_conflict_do_nothing(
            index_elements=[WebhookDelivery.call_sid, WebhookDelivery.url]
        )
        await session.execute(stmt, list(rows.values()))
    for op in releases:
        await session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.call_sid == op["call_sid"],
                WebhookDelivery.await_analysis.is_(True),
                WebhookDelivery.payload.is_(None),
                WebhookDelivery.status == "pending",
            )
            .values(
                await_analysis=False, analysis=op.get("analysis"), next_attempt_at=_ts(op["at"])
            )
        )
