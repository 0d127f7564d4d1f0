"""Prometheus metrics: what an operator watches to know the calls are healthy, and what scales pods.

Everything lives on a dedicated `CollectorRegistry` owned by a `Metrics` object, never on
prometheus-client's global registry, so two apps (or two tests) in one process don't collide.

The per-frame path must stay cheap (a 20 ms frame each way, hundreds of calls per core), so it
goes through a `FrameMeter`: counting a frame is an integer add, the shared Counter is bumped
once per `flush_every` frames, and only one frame in `sample_every` (default 50, one a second)
is timed into the histogram. Measured here: `Counter.inc` ~0.7 µs, `Histogram.observe` ~1.1 µs,
a `FrameMeter` frame ~0.1 µs.

Several worker processes (`uvicorn --workers N`, gunicorn): set `PROMETHEUS_MULTIPROC_DIR` to an
empty, writable folder *before* the workers start (prometheus-client reads it at import). Each
worker then writes its values to files there and any worker's `/metrics` serves the sum of all
of them (`livecall_active_calls` is a `livesum` gauge). When a worker dies, call
`mark_worker_dead(pid)` (gunicorn's `child_exit` hook) so its live gauges stop counting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import re
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from livecall.records import CallEventRecord, CallInfo, CallObserver, CallSummary, TurnRecord

__all__ = [
    "ACTIVE_CALLS",
    "FRAME_BUCKETS",
    "FrameMeter",
    "LoopLagMonitor",
    "Metrics",
    "MetricsObserver",
    "build_metrics_router",
    "default_metrics",
    "mark_worker_dead",
    "metrics_response",
    "multiprocess_dir",
]

#: The metric the HorizontalPodAutoscaler scales on (deploy/k8s/hpa.yaml names it too).
ACTIVE_CALLS = "livecall_active_calls"

#: 5 µs … 10 ms: one 20 ms frame's processing should sit well below a millisecond.
FRAME_BUCKETS = (
    5e-6,
    10e-6,
    20e-6,
    50e-6,
    100e-6,
    200e-6,
    500e-6,
    1e-3,
    2e-3,
    5e-3,
    10e-3,
)
#: End of the caller's speech -> first agent audio sent: hundreds of ms to seconds.
FIRST_AUDIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
#: How late the event loop runs a timer: every ms of it is a hole in some caller's audio.
LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
#: Stream `start` -> Gemini session ready (the SDK's connect, TLS, setup).
SETUP_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)
#: Gemini `interrupted` -> Twilio `clear` sent: should be a few ms.
BARGE_IN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

_LABEL_RE = re.compile(r"[^A-Za-z0-9_.:-]")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def _label(value: Any) -> str:
    """A bounded label value: label cardinality must not grow with what a peer sends us."""
    text = _LABEL_RE.sub("_", str(value))[:48] if value not in (None, "") else ""
    return text or "unknown"


def _kind(data: dict[str, Any], *keys: str) -> str:
    """A label from an event's data: identifier-like values (`stalled`, `gemini_connect`) are
    kept, free text (an exception's message) becomes `close_<code>` or `other`, so that a
    new error message never makes a new time series."""
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and _KIND_RE.match(value):
            return value
    code = data.get("code")
    if isinstance(code, int):
        return f"close_{code}"
    return "other"


def multiprocess_dir() -> str | None:
    """The folder multiprocess mode writes to, or None in single-process mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """All livecall metrics, on one registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active_calls = Gauge(
            ACTIVE_CALLS,
            "Calls this process is carrying now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.calls = Counter(
            "livecall_calls_total",
            "Calls ended, by why and how.",
            ["end_reason", "status"],
            registry=r,
        )
        self.frames_in = Counter(
            "livecall_frames_in_total", "Carrier media frames received from callers.", registry=r
        )
        self.frames_out = Counter(
            "livecall_frames_out_total", "Media messages sent to callers.", registry=r
        )
        self.frame_seconds = Histogram(
            "livecall_frame_processing_seconds",
            "Processing time of one sampled media frame (1 in FrameMeter.sample_every).",
            ["direction"],
            buckets=FRAME_BUCKETS,
            registry=r,
        )
        self.first_audio_latency = Histogram(
            "livecall_first_audio_latency_seconds",
            "End of the caller's speech to the first agent audio sent to the caller.",
            buckets=FIRST_AUDIO_BUCKETS,
            registry=r,
        )
        self.barge_in_stop = Histogram(
            "livecall_barge_in_stop_seconds",
            "Model 'interrupted' to 'clear' sent to the carrier.",
            buckets=BARGE_IN_BUCKETS,
            registry=r,
        )
        self.gemini_reconnects = Counter(
            "livecall_gemini_reconnects_total",
            "Gemini Live sessions re-opened mid-call.",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(
            "livecall_errors_total", "Errors, by where they happened.", ["kind"], registry=r
        )
        self.admission_refusals = Counter(
            "livecall_admission_refusals_total",
            "Calls refused at admission.",
            ["reason"],
            registry=r,
        )
        self.gemini_sessions_active = Gauge(
            "livecall_gemini_sessions_active",
            "Calls with an open Gemini Live session.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # end-of-call webhooks (livecall.outcomes.webhooks): the outbox, counted from the database
        self.webhook_deliveries = Gauge(
            "livecall_webhook_deliveries",
            "End-of-call webhook deliveries in the outbox, by status (pending, failed, delivered).",
            ["status"],
            registry=r,
            multiprocess_mode="max",
        )
        self.webhook_attempts = Counter(
            "livecall_webhook_attempts_total",
            "End-of-call webhook delivery attempts, by outcome (delivered, retry, failed).",
            ["outcome"],
            registry=r,
        )
        # call records (livecall.store): the database, and the spool that stands in for it
        self.records_database_up = Gauge(
            "livecall_records_database_up",
            "1 while the call records database takes writes, 0 while records are spooled.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.records_spool_bytes = Gauge(
            "livecall_records_spool_bytes",
            "Bytes of call records waiting in spool files for the database.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.records_spool_full = Gauge(
            "livecall_records_spool_full",
            "Alarm: 1 while the spool refuses records (SPOOL_MAX_BYTES reached or disk error).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.records_lost = Counter(
            "livecall_records_lost_total",
            "Call records dropped because neither the database nor the spool took them.",
            registry=r,
        )
        self.calls_unrecorded = Counter(
            "livecall_calls_unrecorded_total",
            "Calls taken while their records could not be kept (schema not ready, spool full).",
            ["reason"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "livecall_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 50 ms by LoopLagMonitor).",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "livecall_event_loop_lag_max_seconds",
            "The largest event-loop lag seen since the process started.",
            registry=r,
            multiprocess_mode="max",
        )
        self.loop_cpu_wait = Counter(
            "livecall_event_loop_cpu_wait_seconds",
            "Time the event-loop thread was runnable but waiting for a CPU (Linux schedstat): "
            "lag that other processes, not this one's code, caused.",
            registry=r,
        )
        self.call_setup = Histogram(
            "livecall_call_setup_seconds",
            "Stream start to the call's first Gemini session ready.",
            buckets=SETUP_BUCKETS,
            registry=r,
        )
        if multiprocess_dir() is None:
            # CPU and memory of this process; meaningless summed across workers.
            ProcessCollector(registry=r)

    # ---- one-line helpers for call sites outside the bridge
    def refused(self, reason: str) -> None:
        """An admission refusal: `full`, `draining`, `unknown_number`…"""
        self.admission_refusals.labels(reason=_label(reason)).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind=_label(kind)).inc()

    def reconnect(self, reason: str) -> None:
        self.gemini_reconnects.labels(reason=_label(reason)).inc()

    def frame_meter(self, direction: str, **kw: int) -> FrameMeter:
        """A per-call meter for one direction (`in` or `out`)."""
        return FrameMeter(self, direction, **kw)

    def observer(self, inner: CallObserver) -> MetricsObserver:
        return MetricsObserver(inner, self)


class FrameMeter:
    """Counts a call's frames and times one in `sample_every`, at almost no per-frame cost.

    Usage on the per-frame path::

        t0 = meter.begin()      # perf_counter() on a sampled frame, else 0.0
        ...process the frame...
        meter.end(t0)           # counts it; observes the time when sampled
        ...
        meter.flush()           # at call end, so the last partial batch is counted
    """

    __slots__ = ("_counter", "_every", "_flush_every", "_hist", "_n", "_pending")

    def __init__(
        self, metrics: Metrics, direction: str, *, sample_every: int = 50, flush_every: int = 50
    ) -> None:
        if direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")
        self._counter = metrics.frames_in if direction == "in" else metrics.frames_out
        self._hist = metrics.frame_seconds.labels(direction=direction)
        self._every = max(1, sample_every)
        self._flush_every = max(1, flush_every)
        self._n = 0
        self._pending = 0

    def begin(self) -> float:
        self._n += 1
        if self._n >= self._every:
            self._n = 0
            return time.perf_counter()
        return 0.0

    def end(self, t0: float = 0.0) -> None:
        if t0:
            self._hist.observe(time.perf_counter() - t0)
        self._pending += 1
        if self._pending >= self._flush_every:
            self._counter.inc(self._pending)
            self._pending = 0

    def count(self, n: int = 1) -> None:
        """Counts frames without timing them."""
        self._pending += n
        if self._pending >= self._flush_every:
            self._counter.inc(self._pending)
            self._pending = 0

    def flush(self) -> None:
        if self._pending:
            self._counter.inc(self._pending)
            self._pending = 0


class MetricsObserver:
    """A `CallObserver` that records call-level metrics, then passes every record on to `inner`.

    Nothing here runs per frame: calls started/ended, turns (first-audio latency, barge-in stop
    time) and events (`reconnect` -> reconnects by `kind` or `reason`, `error` -> errors by
    `kind` or `where`, `protocol_error` -> errors{kind="protocol"}). One per call, like the
    observer it wraps.
    """

    def __init__(self, inner: CallObserver, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self._started = False
        self._gemini_open = False
        self._setup_seen = False

    def call_started(self, info: CallInfo) -> None:
        if not self._started:
            self._started = True
            self.metrics.active_calls.inc()
        self.inner.call_started(info)

    def turn(self, turn: TurnRecord) -> None:
        if turn.first_audio_latency_ms is not None:
            self.metrics.first_audio_latency.observe(turn.first_audio_latency_ms / 1000.0)
        if turn.barge_in_stop_ms is not None:
            self.metrics.barge_in_stop.observe(turn.barge_in_stop_ms / 1000.0)
        self.inner.turn(turn)

    def event(self, event: CallEventRecord) -> None:
        kind = event.kind
        if kind == "session_started" and not self._gemini_open:
            self._gemini_open = True
            self.metrics.gemini_sessions_active.inc()
            if not self._setup_seen:
                self._setup_seen = True
                self.metrics.call_setup.observe(max(0, event.at_ms) / 1000.0)
        elif kind == "reconnect":
            self.metrics.reconnect(_kind(event.data, "kind", "reason"))
        elif kind == "error":
            self.metrics.error(_kind(event.data, "kind", "where"))
        elif kind == "protocol_error":
            self.metrics.error("protocol")
        self.inner.event(event)

    def call_ended(self, summary: CallSummary) -> None:
        m = self.metrics
        if self._started:
            self._started = False
            m.active_calls.dec()
        if self._gemini_open:
            self._gemini_open = False
            m.gemini_sessions_active.dec()
        m.calls.labels(end_reason=_label(summary.end_reason), status=_label(summary.status)).inc()
        self.inner.call_ended(summary)

    def partial(self, lines: list[TurnRecord]) -> None:
        """Words so far, for the live page: nothing to count, passed on."""
        partial = getattr(self.inner, "partial", None)
        if partial is not None:
            partial(lines)


class LoopLagMonitor:
    """Measures how late the event loop wakes a timer, every `interval_s`, into `Metrics`.

    A coroutine that holds the loop for 30 ms delays every call's next frame by as much: the
    lag is the stall a caller hears. Costs one timer wake-up per interval.
    """

    def __init__(self, metrics: Metrics, interval_s: float = 0.05) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.max_s = 0.0
        self.cpu_wait_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self._schedstat: str | None = None
        self._last_wait_ns: int | None = None

    def _runqueue_wait_ns(self) -> int | None:
        """This thread's time waiting on a run queue so far (None where Linux does not say)."""
        if self._schedstat is None:
            return None
        try:
            with open(self._schedstat, "rb") as f:
                return int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            self._schedstat = None
            return None

    def record_wait(self, total_ns: int | None) -> None:
        """Counts the run-queue wait since the last reading (pure: tests feed it)."""
        if total_ns is None:
            return
        last, self._last_wait_ns = self._last_wait_ns, total_ns
        if last is not None and total_ns > last:
            delta = (total_ns - last) / 1e9
            self.cpu_wait_s += delta
            self.metrics.loop_cpu_wait.inc(delta)

    def record(self, lag_s: float) -> None:
        """One sample (pure: tests feed it directly)."""
        lag_s = max(0.0, lag_s)
        self.metrics.loop_lag.observe(lag_s)
        if lag_s > self.max_s:
            self.max_s = lag_s
            self.metrics.loop_lag_max.set(lag_s)

    async def run(self) -> None:
        import threading

        loop = asyncio.get_running_loop()
        interval = self.interval_s
        path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        self._schedstat = path  # a failed read turns it off
        self.record_wait(self._runqueue_wait_ns())
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.record(loop.time() - due)
            self.record_wait(self._runqueue_wait_ns())

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="loop-lag")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide `Metrics` (created on first use); tests should make their own."""
    global _default
    if _default is None:
        _default = Metrics()
    return _default


def metrics_response(metrics: Metrics | None = None) -> tuple[bytes, str]:
    """The exposition body and its content type, for any web framework."""
    if multiprocess_dir() is not None:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    m = metrics if metrics is not None else default_metrics()
    return generate_latest(m.registry), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Multiprocess mode: a dead worker's live gauges must stop counting."""
    if multiprocess_dir() is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def build_metrics_router(
    metrics: Metrics | None = None, *, bearer_token: str | None = None, path: str = "/metrics"
) -> APIRouter:
    """`GET /metrics` for Prometheus; with `bearer_token`, scrapers must send it."""
    router = APIRouter(tags=["ops"])

    @router.get(path, include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        if bearer_token is not None:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {bearer_token}".encode()):
                return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})
        body, content_type = metrics_response(metrics)
        return Response(content=body, media_type=content_type)

    return router
