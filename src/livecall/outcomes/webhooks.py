"""End-of-call webhooks, delivered: the outbox worker, its call observer, manual retries, the
signed recording links (their routes: `livecall.server.webhook_routes`).

A call's end puts one outbox row per call through the call records' writer (`WebhookObserver`,
so a database outage spools it like any record). The `WebhookService` worker, started in the
app's lifespan, claims due rows with a lease (several instances never send one row at once),
builds the body once from the stored call (`webhook_payload.build_payload`), POSTs it signed
with `CALL_WEBHOOK_SECRET`, and records each attempt: a 2xx is delivered, anything else (or a
timeout) is retried with backoff until the give-up deadline, then failed. At-least-once: a
crash between the receiver's 2xx and our bookkeeping sends it again, with the same delivery id.

Post-call analysis plugs in with `WebhookService.analysis_settled(call_sid, analysis)`: a
profile that wants analysis (`profile_wants_analysis`) makes its call's delivery wait for it
(at most `WEBHOOK_ANALYSIS_WAIT`), and the analysis rides in the payload's ``analysis``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, Field

from livecall.log import get_logger, register_secret
from livecall.outcomes.outbox import Outbox, analysis_op, webhook_op
from livecall.outcomes.webhook_payload import (
    build_payload,
    derive_link_key,
    encode_payload,
    next_attempt,
    recording_link,
    request_headers,
)
from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.settings import Settings
from livecall.store.models import Call, WebhookDelivery
from livecall.store.writer import CallStore

__all__ = [
    "DeliveryOut",
    "RetryOutcome",
    "WebhookObserver",
    "WebhookService",
    "profile_wants_analysis",
    "webhook_for_stored_call",
]

log = get_logger("livecall.webhooks")

RELEASE_TIMEOUT_S = 2.0  # handing leases back at shutdown: past this, they run out instead


def profile_wants_analysis(profile: Any) -> bool:
    """Whether a profile's calls get post-call analysis (its ``analysis`` switch or section)."""
    analysis = getattr(profile, "analysis", None)
    if analysis is None or isinstance(analysis, bool):
        return bool(analysis)
    return bool(getattr(analysis, "enabled", True))


def link_key(settings: Settings) -> bytes | None:
    """The recording links' HMAC key: from RECORDING_LINK_SECRET, else LIVECALL_API_TOKEN."""
    for secret in (settings.recording_link_secret, settings.api_token):
        if secret is not None and secret.get_secret_value():
            return derive_link_key(secret.get_secret_value())
    return None


def _new_owner() -> str:
    return f"{socket.gethostname()[:20]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def webhook_for_stored_call(
    call: Call,
    settings: Settings,
    *,
    delivery_id: str,
    analysis: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The payload livecall sends (or would send) for a stored call (turns and events loaded)."""
    now = now or _utcnow()
    key = link_key(settings)
    recording = None
    if key is not None and settings.public_url and call.recording_key is not None:
        recording = recording_link(
            key, settings.public_url, call.call_sid, now, settings.recording_link_ttl_s
        )
    return build_payload(call, delivery_id=delivery_id, recording=recording, analysis=analysis)


class WebhookObserver:
    """The `CallObserver` that puts a call's webhook in the outbox when the call ends.

    It must come after the records writer in the fan-out, so the outbox op is queued behind
    the call's `end` op.
    """

    __slots__ = ("_profile", "_service", "call_sid")

    def __init__(self, service: WebhookService, call_sid: str) -> None:
        self._service = service
        self.call_sid = call_sid
        self._profile: str | None = None

    def call_started(self, info: CallInfo) -> None:
        self._profile = info.profile

    def turn(self, turn: TurnRecord) -> None:
        pass  # the payload is built from the stored record

    def event(self, event: CallEventRecord) -> None:
        pass

    def call_ended(self, summary: CallSummary) -> None:
        self._service.enqueue(summary.call_sid or self.call_sid, self._profile)


@dataclass(slots=True)
class RetryOutcome:
    """What a manual retry did: `queued` deliveries, or why nothing could be."""

    queued: int = 0
    created: bool = False
    problem: str | None = None
    status_code: int = 202


@dataclass
class WebhookService:
    """Owns the delivery worker, and enqueues and retries deliveries for the app."""

    settings: Settings
    store: CallStore
    profile_lookup: Callable[[str | None], Any] = lambda _name: None
    metrics: Any = None
    client: httpx.AsyncClient | None = None
    clock: Callable[[], datetime] = _utcnow
    wants_analysis: Callable[[Any], bool] = profile_wants_analysis
    # unique to this worker (containers share pids and often hostname prefixes): what its
    # claims hold is told apart from any other instance's, and handed back when it stops
    owner: str = field(default_factory=_new_owner)
    outbox: Outbox = field(init=False)
    _secret: str | None = field(init=False, default=None)
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _inflight: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _waiters: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _owns_client: bool = field(init=False, default=False)
    _warned: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.store.repo.sessions)
        secret = self.settings.call_webhook_secret
        self._secret = secret.get_secret_value() if secret is not None else None
        if self._secret:
            register_secret(self._secret)
        else:
            self._secret = None

    # --- enqueueing -------------------------------------------------------------------------

    def observer(self, call_sid: str) -> WebhookObserver:
        return WebhookObserver(self, call_sid)

    def url_for(self, profile_name: str | None) -> str | None:
        """The profile's webhook_url, else CALL_WEBHOOK_URL, else None."""
        profile = self.profile_lookup(profile_name)
        return getattr(profile, "webhook_url", None) or self.settings.call_webhook_url

    def enqueue(self, call_sid: str, profile_name: str | None) -> bool:
        """Put a call's delivery in the outbox (through the records writer). Never raises."""
        try:
            url = self.url_for(profile_name)
            if not url:
                return False
            if self._secret is None:
                if not self._warned:
                    self._warned = True
                    log.error("webhook.not_sent", reason="CALL_WEBHOOK_SECRET is not set")
                return False
            profile = self.profile_lookup(profile_name)
            wait = profile is not None and self.wants_analysis(profile)
            op = webhook_op(
                call_sid,
                url,
                now=self.clock(),
                await_analysis=wait,
                analysis_wait_s=self.settings.webhook_analysis_wait_s,
            )
            self.store.enqueue(op)
            self._wake_when_written()
            log.info("webhook.queued", call_sid=call_sid, delivery_id=op["delivery_id"])
            return True
        except Exception:
            log.exception("webhook.enqueue_failed", call_sid=call_sid)
            return False

    def analysis_settled(self, call_sid: str, analysis: Mapping[str, Any] | None) -> None:
        """Post-call analysis is stored (`analysis`) or has finally failed (None): the call's
        waiting delivery becomes due now, with it. Durable like a record; never raises."""
        try:
            self.store.enqueue(analysis_op(call_sid, analysis, now=self.clock()))
            self._wake_when_written()
        except Exception:
            log.exception("webhook.analysis_release_failed", call_sid=call_sid)

    def _wake_when_written(self) -> None:
        """Wake the worker once the writer has stored what was just queued."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the loop (a thread): the next poll finds it

        async def wait() -> None:
            with contextlib.suppress(Exception):
                await self.store.drained()
            self.wake()

        task = loop.create_task(wait(), name="webhook-wake")
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)

    def wake(self) -> None:
        self._wake.set()

    # --- manual retry -----------------------------------------------------------------------

    async def retry(self, call_sid: str) -> RetryOutcome:
        """Send a call's webhook again now (same delivery id), or queue one if it has none.

        Raises SQLAlchemyError/OSError when the database is down.
        """
        now = self.clock()
        queued = await self.outbox.retry_now(call_sid, now, self.settings.webhook_give_up_s)
        if queued:
            self.wake()
            log.info("webhook.retry_requested", call_sid=call_sid, deliveries=queued)
            return RetryOutcome(queued=queued)
        call = await self.store.repo.get_call(call_sid)
        if call is None:
            return RetryOutcome(problem="no such call", status_code=404)
        if call.ended_at is None:
            return RetryOutcome(problem="the call is still in progress", status_code=409)
        if not self.url_for(call.profile):
            return RetryOutcome(problem="no webhook URL is configured", status_code=409)
        if self._secret is None:
            return RetryOutcome(problem="CALL_WEBHOOK_SECRET is not set", status_code=409)
        self.enqueue(call_sid, call.profile)
        async with asyncio.timeout(self.store.write_timeout_s):
            written = await self.store.flush()
        if not written:
            raise OSError("call records database unavailable")
        return RetryOutcome(queued=1, created=True)

    # --- the worker -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        if self._secret is None:
            if self.settings.call_webhook_url:
                log.error(
                    "webhook.disabled",
                    reason="CALL_WEBHOOK_URL is set but CALL_WEBHOOK_SECRET is not: "
                    "no webhook is sent",
                )
            return
        if self.client is None:
            self.client = httpx.AsyncClient(follow_redirects=False)
            self._owns_client = True
        self._task = asyncio.create_task(self._run(), name="livecall-webhooks")

    async def stop(self) -> None:
        """Stop claiming; sends under way get a moment, then are cut off. Every lease this
        worker still holds is then handed back (due as it was, the cut-off send not counted),
        so a restart or another instance sends at once, not after WEBHOOK_LEASE."""
        for waiter in list(self._waiters):
            waiter.cancel()
        running = self._task is not None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if running:  # a claim cut off after its commit, a release that did not get through
            await self._release_owned()
        if self._owns_client and self.client is not None:
            await self.client.aclose()
            self.client = None

    async def _release_owned(self) -> None:
        """Hands back what this worker's claims still hold; bounded, never raises."""
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                released = await self.outbox.release_owned(self.owner)
        except Exception as exc:  # the database is gone: those leases run out instead
            log.warning("webhook.release_failed", error=repr(exc))
        else:
            if released:
                log.info("webhook.released", deliveries=released)

    async def _run(self) -> None:
        down = False
        while True:
            self._wake.clear()
            try:
                await self.pump()
                await self._refresh_gauge()
                if down:
                    log.info("webhook.outbox_back")
                down = False
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the database is down: try again at the next poll
                if not down:
                    log.warning("webhook.outbox_unavailable", error=repr(error))
                down = True
            waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._wake.wait())}
            waits |= self._inflight
            await asyncio.wait(
                waits,
                timeout=self.settings.webhook_poll_interval_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in waits - set(self._inflight):
                if not waiter.done():
                    waiter.cancel()

    async def pump(self) -> int:
        """Claim as many due deliveries as there are free slots and start sending them."""
        free = self.settings.webhook_concurrency - len(self._inflight)
        if free <= 0:
            return 0
        # a lease outlives an attempt, or another instance could send the same row meanwhile
        lease = max(self.settings.webhook_lease_s, 2 * self.settings.webhook_timeout_s + 5)
        rows = await self.outbox.claim(self.clock(), lease, free, self.owner)
        for row in rows:
            task = asyncio.create_task(self._deliver(row), name=f"webhook:{row.call_sid}")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return len(rows)

    async def _refresh_gauge(self) -> None:
        if self.metrics is None:
            return
        counts = await self.outbox.counts()
        for status in ("pending", "failed", "delivered"):
            self.metrics.webhook_deliveries.labels(status=status).set(counts.get(status, 0))

    async def _body(self, row: WebhookDelivery, now: datetime) -> bytes | None:
        """The delivery's bytes: stored, or built now from the stored call (first attempt)."""
        if row.payload is not None:
            return row.payload.encode()
        call = await self.store.repo.get_call(row.call_sid)
        if call is None:  # erased meanwhile (its outbox rows go with it)
            return None
        payload = webhook_for_stored_call(
            call, self.settings, delivery_id=row.id, analysis=row.analysis, now=now
        )
        text = encode_payload(payload).decode()
        row.give_up_at = now + timedelta(seconds=self.settings.webhook_give_up_s)
        await self.outbox.save_payload(row.id, row.lease_owner or "", text, row.give_up_at)
        return text.encode()

    async def _deliver(self, row: WebhookDelivery) -> None:
        try:
            await self._attempt(row)
        except asyncio.CancelledError:  # stopping mid-send: let the next owner have it now
            with contextlib.suppress(Exception):  # bounded, and over before stop() returns
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    await self.outbox.release(row)
            raise

    async def _booked(self, booking: Coroutine[Any, Any, None]) -> None:
        """An attempt's bookkeeping, seen through (bounded) even when stopped meanwhile: a 2xx
        the receiver gave is recorded, not sent again by the next instance."""
        task = asyncio.ensure_future(booking)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    await task
            raise

    async def _attempt(self, row: WebhookDelivery) -> None:
        assert self._secret is not None and self.client is not None
        try:
            body = await self._body(row, self.clock())
        except Exception as exc:  # the database went away, or a record it cannot encode
            log.warning("webhook.build_failed", call_sid=row.call_sid, error=repr(exc))
            await self._booked(self._finish(row, None, "payload not built", 0.0))
            return
        if body is None:
            with contextlib.suppress(Exception):
                await self.outbox.release(row)
            return
        headers = request_headers(self._secret, body, row.id)
        timeout = self.settings.webhook_timeout_s
        status: int | None = None
        error: str | None = None
        started = time.perf_counter()
        try:
            async with (
                asyncio.timeout(timeout),
                self.client.stream(
                    "POST", row.url, content=body, headers=headers, timeout=timeout
                ) as response,
            ):
                status = response.status_code  # the body is not read: only the status counts
        except (TimeoutError, httpx.TimeoutException):
            error = "timeout"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        ms = (time.perf_counter() - started) * 1000
        if status is not None and not 200 <= status < 300:
            error = f"HTTP {status}"
        await self._booked(self._finish(row, status, error, ms))

    async def _finish(
        self, row: WebhookDelivery, status: int | None, error: str | None, ms: float
    ) -> None:
        """Book an attempt: delivered on a 2xx, else the next try or, past the deadline, failed."""
        delivered = status is not None and 200 <= status < 300
        now = self.clock()
        give_up_at = row.give_up_at or now + timedelta(seconds=self.settings.webhook_give_up_s)
        next_at = None
        if not delivered:
            next_at = next_attempt(
                row.attempts + 1,
                now,
                give_up_at,
                self.settings.webhook_backoff_base_s,
                self.settings.webhook_backoff_max_s,
            )
        outcome = "delivered" if delivered else ("retry" if next_at else "failed")
        if self.metrics is not None:
            self.metrics.webhook_attempts.labels(outcome=outcome).inc()
        log.info(
            "webhook.attempt",
            call_sid=row.call_sid,
            delivery_id=row.id,
            attempt=row.attempts + 1,
            status=status,
            error=error,
            outcome=outcome,
            ms=round(ms, 1),
        )
        try:
            await self.outbox.record_attempt(
                row,
                at=now,
                status_code=status,
                error=error,
                ms=ms,
                delivered=delivered,
                next_at=next_at,
            )
        except Exception as exc:  # sent again once the lease expires: at-least-once
            log.warning("webhook.attempt_not_recorded", delivery_id=row.id, error=repr(exc))


# --- routes ---------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """A webhook URL fit to show: its origin only (paths and queries often carry tokens)."""
    parts = urlsplit(url)
    tail = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{tail}"


class AttemptOut(BaseModel):
    at: str
    status_code: int | None
    error: str | None
    ms: float | None


class DeliveryOut(BaseModel):
    """One delivery of a call's webhook, as the API and the call page show it."""

    delivery_id: str
    url: str = Field(description="the receiver's origin (the rest is not shown)")
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    waiting_for_analysis: bool
    history: list[AttemptOut]

    @classmethod
    def of(cls, row: WebhookDelivery) -> DeliveryOut:
        return cls(
            delivery_id=row.id,
            url=redact_url(row.url),
            status=row.status,
            attempts=row.attempts,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            last_attempt_at=row.last_attempt_at,
            next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
            delivered_at=row.delivered_at,
            waiting_for_analysis=row.await_analysis,
            history=[AttemptOut.model_validate(h) for h in row.history or []],
        )
