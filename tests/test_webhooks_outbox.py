"""The webhook outbox in the database, on SQLite and PostgreSQL: ops replayed without
duplicates, claims that never overlap between instances, leases that expire, deliveries that
wait for post-call analysis, and the bookkeeping of attempts."""

# ruff: noqa: F811 - the database fixtures of test_store are imported, then requested by name

from __future__ import annotations

import asyncio
from datetime import timedelta

from livecall.outcomes.outbox import Outbox, analysis_op, webhook_op
from livecall.store.writer import CallStore
from test_store import (  # noqa: F401 - fixtures
    T0,
    database,
    engine,
    play_call,
    settings,
    store,
)

URL = "https://crm.example.com/hooks/calls"


async def calls_with_webhooks(
    store: CallStore, n: int, *, await_analysis: bool = False
) -> list[str]:
    """`n` finished calls, each with its webhook op queued behind its records."""
    sids = [f"CA{i:04d}" for i in range(n)]
    for sid in sids:
        play_call(store, sid)
        store.enqueue(
            webhook_op(sid, URL, now=T0, await_analysis=await_analysis, analysis_wait_s=600)
        )
    assert await store.flush()
    return sids


async def test_replayed_ops_add_nothing(store: CallStore) -> None:
    (sid,) = await calls_with_webhooks(store, 1)
    outbox = Outbox(store.repo.sessions)
    (row,) = await outbox.for_call(sid)
    again = webhook_op(sid, URL, now=T0 + timedelta(minutes=5))  # a replay, a second stream
    await store.repo.apply([again, again])
    rows = await outbox.for_call(sid)
    assert [r.id for r in rows] == [row.id] and rows[0].created_at == T0
    assert rows[0].status == "pending" and rows[0].next_attempt_at == T0


async def test_two_instances_never_claim_the_same_delivery(store: CallStore) -> None:
    sids = await calls_with_webhooks(store, 24)
    outbox = Outbox(store.repo.sessions)
    now = T0 + timedelta(seconds=1)
    ids: list[str] = []
    for _ in range(30):  # rounds of instances claiming at once, until nothing is left
        claims = await asyncio.gather(
            *(outbox.claim(now, 60, 5, owner) for owner in ("a", "b", "c", "d"))
        )
        got = [row for claim in claims for row in claim]
        if not got:
            break
        ids += [row.id for row in got]
    assert len(ids) == len(set(ids)) == 24  # each claimed once, all of them
    rows = [r for sid in sids for r in await outbox.for_call(sid)]
    assert {r.id for r in rows} == set(ids)
    assert await outbox.claim(now, 60, 50, "c") == []  # leased: nothing left for anyone


async def test_a_lease_expires_and_another_instance_takes_over(store: CallStore) -> None:
    (sid,) = await calls_with_webhooks(store, 1)
    outbox = Outbox(store.repo.sessions)
    (mine,) = await outbox.claim(T0, 30, 10, "crashed")
    assert await outbox.claim(T0 + timedelta(seconds=29), 30, 10, "other") == []
    (taken,) = await outbox.claim(T0 + timedelta(seconds=31), 30, 10, "other")
    assert taken.id == mine.id and taken.lease_owner != mine.lease_owner
    # the first owner's late bookkeeping no longer applies to a row it lost
    await outbox.record_attempt(
        mine, at=T0, status_code=200, error=None, ms=5, delivered=True, next_at=None
    )
    (row,) = await outbox.for_call(sid)
    assert row.status == "pending" and row.attempts == 0


async def test_a_stopping_owner_hands_back_its_leases_only(store: CallStore) -> None:
    sids = await calls_with_webhooks(store, 3)
    outbox = Outbox(store.repo.sessions)
    mine = await outbox.claim(T0, 600, 2, "web-1_%")  # LIKE's wildcards in a name: literal
    (theirs,) = await outbox.claim(T0, 600, 2, "web-1_%x")
    assert await outbox.release_owned("web-1_%") == 2
    rows = {r.id: r for sid in sids for r in await outbox.for_call(sid)}
    assert all(rows[r.id].lease_owner is None for r in mine)
    assert rows[theirs.id].lease_owner == theirs.lease_owner  # another instance's: kept
    again = await outbox.claim(T0 + timedelta(seconds=1), 600, 5, "next")
    assert {r.id for r in again} == {r.id for r in mine}  # due at once, as they were
    assert all(r.attempts == 0 for r in again)


async def test_attempts_are_recorded_then_delivered_or_failed(store: CallStore) -> None:
    first, second = await calls_with_webhooks(store, 2)
    outbox = Outbox(store.repo.sessions)
    rows = {r.call_sid: r for r in await outbox.claim(T0, 30, 10, "me")}
    retry_at = T0 + timedelta(seconds=2)
    await outbox.record_attempt(
        rows[first],
        at=T0,
        status_code=500,
        error="HTTP 500",
        ms=12,
        delivered=False,
        next_at=retry_at,
    )
    await outbox.record_attempt(
        rows[second],
        at=T0,
        status_code=None,
        error="timeout",
        ms=10_000,
        delivered=False,
        next_at=None,
    )
    (a,) = await outbox.for_call(first)
    (b,) = await outbox.for_call(second)
    assert (a.status, a.attempts, a.next_attempt_at, a.lease_owner) == (
        "pending",
        1,
        retry_at,
        None,
    )
    assert a.history == [{"at": T0.isoformat(), "status_code": 500, "error": "HTTP 500", "ms": 12}]
    assert (b.status, b.last_error) == ("failed", "timeout")
    assert await outbox.claim(T0 + timedelta(seconds=1), 30, 10, "me") == []  # not yet due
    (again,) = await outbox.claim(retry_at, 30, 10, "me")
    await outbox.record_attempt(
        again, at=retry_at, status_code=204, error=None, ms=8, delivered=True, next_at=None
    )
    (a,) = await outbox.for_call(first)
    assert (a.status, a.attempts, a.delivered_at) == ("delivered", 2, retry_at)
    assert await outbox.counts() == {"delivered": 1, "failed": 1}
    # by hand: the failed one is due again, same id, a fresh deadline
    assert await outbox.retry_now(second, retry_at, 3600) == 1
    (b2,) = await outbox.claim(retry_at, 30, 10, "me")
    assert b2.id == b.id and b2.give_up_at == retry_at + timedelta(hours=1)


async def test_a_delivery_waits_for_its_analysis_or_its_deadline(store: CallStore) -> None:
    released, forgotten = await calls_with_webhooks(store, 2, await_analysis=True)
    outbox = Outbox(store.repo.sessions)
    soon = T0 + timedelta(seconds=5)
    assert await outbox.claim(soon, 30, 10, "me") == []  # both wait for their analysis
    store.enqueue(analysis_op(released, {"summary": "Table for four at 8"}, now=soon))
    assert await store.flush()
    (row,) = await outbox.claim(soon, 3600, 10, "me")
    assert row.call_sid == released and row.analysis == {"summary": "Table for four at 8"}
    assert not row.await_analysis
    # the other analysis never reports back: the webhook goes without it after the wait
    (late,) = await outbox.claim(T0 + timedelta(seconds=601), 30, 10, "me")
    assert late.call_sid == forgotten and late.analysis is None


async def test_erasing_a_call_erases_its_pending_webhook(store: CallStore) -> None:
    (sid,) = await calls_with_webhooks(store, 1)
    outbox = Outbox(store.repo.sessions)
    assert await store.repo.delete_call(sid)
    assert await outbox.for_call(sid) == []
