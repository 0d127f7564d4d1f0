"""Observability: Prometheus metrics (names, per-frame meter, call observer, /metrics endpoint,
multiprocess aggregation) and optional OpenTelemetry traces built from a call's records."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from livecall import tracing
from livecall.metrics import (
    ACTIVE_CALLS,
    FrameMeter,
    Metrics,
    MetricsObserver,
    build_metrics_router,
    metrics_response,
)
from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from support import module_or_missing

OTEL_MISSING = "no opentelemetry-sdk (pip install 'livecall[tracing]', or the dev extra)"
EXPECTED = [
    "livecall_active_calls",
    "livecall_calls_total",
    "livecall_frames_in_total",
    "livecall_frames_out_total",
    "livecall_frame_processing_seconds",
    "livecall_first_audio_latency_seconds",
    "livecall_barge_in_stop_seconds",
    "livecall_gemini_reconnects_total",
    "livecall_errors_total",
    "livecall_admission_refusals_total",
    "livecall_gemini_sessions_active",
]
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


class Recorder:
    """An inner observer that keeps what it is handed."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def call_started(self, info: CallInfo) -> None:
        self.seen.append(("started", info))

    def turn(self, turn: TurnRecord) -> None:
        self.seen.append(("turn", turn))

    def event(self, event: CallEventRecord) -> None:
        self.seen.append(("event", event))

    def call_ended(self, summary: CallSummary) -> None:
        self.seen.append(("ended", summary))


def play_call(observer: Any, sid: str = "CA1", *, failed: bool = False) -> None:
    """A call's records, as the bridge hands them over."""
    observer.call_started(CallInfo(call_sid=sid, stream_sid="MZ1", started_at=T0, model="m"))
    observer.event(CallEventRecord(sid, 100, "session_started", {"session_id": "s1"}))
    observer.turn(TurnRecord(sid, 0, "caller", "what are your hours", 500, 1800))
    observer.turn(
        TurnRecord(sid, 1, "agent", "we open at nine", 1900, 3500, first_audio_latency_ms=420.0)
    )
    observer.event(CallEventRecord(sid, 3000, "interrupted", {"heard_ms": 900}))
    observer.turn(
        TurnRecord(
            sid,
            2,
            "agent",
            "and on sundays we",
            3600,
            4100,
            interrupted=True,
            heard_text="and on",
            barge_in_stop_ms=3.0,
        )
    )
    observer.event(CallEventRecord(sid, 5000, "reconnect", {"reason": "go_away"}))
    observer.event(CallEventRecord(sid, 5200, "error", {"where": "gemini", "error": "boom"}))
    observer.event(CallEventRecord(sid, 5300, "protocol_error", {}))
    observer.call_ended(
        CallSummary(
            call_sid=sid,
            ended_at=T0,
            duration_s=6.0,
            end_reason="caller_stop",
            status="failed" if failed else "completed",
            turns=3,
            interruptions=1,
        )
    )


def test_every_metric_is_exposed_on_its_own_registry() -> None:
    m = Metrics()
    body, content_type = metrics_response(m)
    text = body.decode()
    for name in EXPECTED:
        assert f"# HELP {name.removesuffix('_total')}" in text, name
    assert content_type.startswith("text/plain")
    assert ACTIVE_CALLS == "livecall_active_calls"
    # a second app in the same process gets its own, independent metrics
    other = Metrics()
    other.refused("full")
    assert value(other, "livecall_admission_refusals_total", reason="full") == 1
    assert value(m, "livecall_admission_refusals_total", reason="full") == 0


def test_frame_meter_counts_in_batches_and_times_one_frame_in_n() -> None:
    m = Metrics()
    meter = m.frame_meter("in", sample_every=50, flush_every=50)
    for _ in range(120):
        meter.end(meter.begin())
    assert value(m, "livecall_frames_in_total") == 100  # two full batches so far
    assert value(m, "livecall_frame_processing_seconds_count", direction="in") == 2
    meter.flush()
    assert value(m, "livecall_frames_in_total") == 120
    out = m.frame_meter("out")
    out.count(3)
    out.flush()
    assert value(m, "livecall_frames_out_total") == 3
    with pytest.raises(ValueError):
        FrameMeter(m, "sideways")


def test_frame_meter_costs_far_less_than_a_prometheus_call_per_frame() -> None:
    m = Metrics()
    meter = m.frame_meter("out")
    n = 50_000
    t = time.perf_counter()
    for _ in range(n):
        meter.end(meter.begin())
    per_frame_us = (time.perf_counter() - t) / n * 1e6
    # ~0.2 µs here; a 20 ms frame's whole budget at hundreds of calls per core is ~50 µs.
    assert per_frame_us < 5.0, per_frame_us
    meter.flush()
    assert value(m, "livecall_frames_out_total") == n


def test_observer_records_call_metrics_and_passes_everything_on() -> None:
    m = Metrics()
    inner = Recorder()
    obs = MetricsObserver(inner, m)
    obs.call_started(CallInfo(call_sid="CA9", stream_sid="MZ9", started_at=T0))
    assert value(m, "livecall_active_calls") == 1
    # finish that call with the same observer, then a full one with a new observer
    obs.call_ended(CallSummary(call_sid="CA9", ended_at=T0, duration_s=1, end_reason="x"))
    play_call(m.observer(inner), failed=True)
    assert value(m, "livecall_active_calls") == 0
    assert value(m, "livecall_gemini_sessions_active") == 0
    assert value(m, "livecall_calls_total", end_reason="caller_stop", status="failed") == 1
    assert value(m, "livecall_first_audio_latency_seconds_count") == 1
    assert value(m, "livecall_first_audio_latency_seconds_sum") == pytest.approx(0.42)
    assert value(m, "livecall_barge_in_stop_seconds_sum") == pytest.approx(0.003)
    assert value(m, "livecall_gemini_reconnects_total", reason="go_away") == 1
    assert value(m, "livecall_errors_total", kind="gemini") == 1
    assert value(m, "livecall_errors_total", kind="protocol") == 1
    kinds = [k for k, _ in inner.seen]
    assert kinds.count("turn") == 3 and kinds.count("event") == 5 and kinds[-1] == "ended"


def test_gemini_sessions_gauge_counts_calls_with_an_open_session() -> None:
    m = Metrics()
    obs = m.observer(Recorder())
    obs.call_started(CallInfo(call_sid="CA2", stream_sid="MZ2", started_at=T0))
    obs.event(CallEventRecord("CA2", 10, "session_started", {}))
    obs.event(CallEventRecord("CA2", 900, "session_started", {}))  # resumed: still one
    assert value(m, "livecall_gemini_sessions_active") == 1
    assert value(m, "livecall_active_calls") == 1


def test_free_text_in_events_does_not_create_time_series() -> None:
    m = Metrics()
    obs = m.observer(Recorder())
    obs.event(CallEventRecord("CA3", 1, "reconnect", {"reason": "stalled"}))
    obs.event(CallEventRecord("CA3", 2, "reconnect", {"reason": "keepalive ping timeout; x"}))
    obs.event(CallEventRecord("CA3", 3, "reconnect", {"reason": "sent 1011", "code": 1011}))
    obs.event(CallEventRecord("CA3", 4, "error", {"where": "Gemini said: quota!"}))
    assert value(m, "livecall_gemini_reconnects_total", reason="stalled") == 1
    assert value(m, "livecall_gemini_reconnects_total", reason="other") == 1
    assert value(m, "livecall_gemini_reconnects_total", reason="close_1011") == 1
    assert value(m, "livecall_errors_total", kind="other") == 1


def test_label_values_stay_bounded() -> None:
    m = Metrics()
    m.error("x" * 500 + "\n{weird}")
    m.reconnect("")
    samples = [
        s.labels["kind"]
        for metric in m.registry.collect()
        if metric.name == "livecall_errors"
        for s in metric.samples
        if s.name.endswith("_total")
    ]
    assert len(samples) == 1 and len(samples[0]) <= 48 and "\n" not in samples[0]
    assert value(m, "livecall_gemini_reconnects_total", reason="unknown") == 1


def test_metrics_endpoint_serves_prometheus_text_and_can_require_a_token() -> None:
    m = Metrics()
    m.refused("draining")
    app = FastAPI()
    app.include_router(build_metrics_router(m))
    locked = FastAPI()
    locked.include_router(build_metrics_router(m, bearer_token="scrape-secret"))
    with TestClient(app) as client:
        r = client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert 'livecall_admission_refusals_total{reason="draining"} 1.0' in r.text
    with TestClient(locked) as client:
        assert client.get("/metrics").status_code == 401
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert ok.status_code == 200 and "livecall_active_calls" in ok.text


WORKER = textwrap.dedent(
    """
    import sys
    from livecall.metrics import Metrics
    m = Metrics()
    m.active_calls.inc()
    m.calls.labels(end_reason="caller_stop", status="completed").inc()
    frames = m.frame_meter("in")
    frames.count(int(sys.argv[1]))
    frames.flush()
    """
)
SCRAPE = textwrap.dedent(
    """
    from livecall.metrics import metrics_response
    body, _ = metrics_response()
    print(body.decode())
    """
)


def test_multiprocess_mode_sums_the_workers(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for frames in ("10", "32"):  # two "workers", two pids
        subprocess.run([sys.executable, "-c", WORKER, frames], env=env, check=True, timeout=60)
    out = subprocess.run(
        [sys.executable, "-c", SCRAPE],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    ).stdout
    lines = set(out.splitlines())
    assert "livecall_active_calls 2.0" in lines
    assert "livecall_frames_in_total 42.0" in lines
    assert 'livecall_calls_total{end_reason="caller_stop",status="completed"} 2.0' in lines


# ---------------------------------------------------------------- tracing


def test_tracing_is_off_and_free_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LIVECALL_TRACING", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    tracing.shutdown_tracing()
    assert not tracing.configure_tracing()
    assert not tracing.tracing_enabled()
    first, second = tracing.call_span("CA1"), tracing.turn_span("CA1", 0, "agent")
    assert first is second  # one shared no-op object: nothing allocated per call
    with first as span:
        assert span is None
    inner = Recorder()
    assert tracing.traced(inner) is inner
    assert tracing.add_trace_context(None, "info", {"event": "x"}) == {"event": "x"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"LIVECALL_TRACING": "1"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "LIVECALL_TRACING": "0"}, False),
        ({"LIVECALL_TRACING": "true", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_requested_by_the_environment(env: dict[str, str], expected: bool) -> None:
    assert tracing.tracing_requested(env) is expected


@pytest.fixture
def spans() -> Any:
    module_or_missing("opentelemetry.sdk", OTEL_MISSING)
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(exporter=exporter, instance_id="test-1")
    yield exporter
    tracing.shutdown_tracing()


def test_a_call_becomes_a_trace_with_a_span_per_turn(spans: Any) -> None:
    inner = Recorder()
    obs = tracing.traced(inner)
    assert isinstance(obs, tracing.TracingObserver)
    play_call(obs, "CA7", failed=True)
    finished = spans.get_finished_spans()
    call = next(s for s in finished if s.name == "call")
    turns = [s for s in finished if s.name.startswith("turn.")]
    assert [t.name for t in turns] == ["turn.caller", "turn.agent", "turn.agent"]
    assert all(t.parent.span_id == call.context.span_id for t in turns)
    assert all(t.context.trace_id == call.context.trace_id for t in turns)
    t0 = int(T0.timestamp() * 1e9)
    assert call.start_time == t0
    assert turns[1].start_time == t0 + 1_900_000_000
    assert turns[1].end_time == t0 + 3_500_000_000
    assert turns[1].attributes["livecall.turn.first_audio_latency_ms"] == 420.0
    assert turns[2].attributes["livecall.turn.interrupted"] is True
    assert call.attributes["livecall.call_sid"] == "CA7"
    assert call.attributes["livecall.end_reason"] == "caller_stop"
    assert not call.status.is_ok
    assert [e.name for e in call.events] == [
        "session_started",
        "interrupted",
        "reconnect",
        "error",
        "protocol_error",
    ]
    # transcripts are personal data: only their length goes into traces
    everything = str([dict(s.attributes or {}) for s in finished])
    assert "hours" not in everything and "sundays" not in everything
    assert len(inner.seen) == 10


async def test_tasks_started_during_a_call_run_inside_its_span(spans: Any) -> None:
    import asyncio

    from opentelemetry import trace

    obs = tracing.TracingObserver(Recorder())
    seen: dict[str, Any] = {}

    async def pump() -> None:
        seen["ctx"] = trace.get_current_span().get_span_context()
        seen["log"] = tracing.add_trace_context(None, "info", {"event": "x"})

    async def bridge_run() -> None:  # what CallBridge.run does, in order
        obs.call_started(CallInfo(call_sid="CA8", stream_sid="MZ8", started_at=T0))
        await asyncio.create_task(pump())
        obs.call_ended(CallSummary(call_sid="CA8", ended_at=T0, duration_s=1, end_reason="x"))
        seen["after"] = trace.get_current_span().get_span_context()

    await asyncio.create_task(bridge_run())
    call = next(s for s in spans.get_finished_spans() if s.name == "call")
    assert seen["ctx"].span_id == call.context.span_id
    assert seen["log"]["trace_id"] == format(call.context.trace_id, "032x")
    assert not seen["after"].is_valid  # context restored when the call ended
    with (
        tracing.call_span("CA9", profile="sales") as span,
        tracing.turn_span("CA9", 0, "agent") as turn,
    ):
        assert turn.parent.span_id == span.get_span_context().span_id


def test_tracing_asked_for_without_an_exporter_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    module_or_missing("opentelemetry.sdk", OTEL_MISSING)
    # whether or not an OTLP exporter is installed here, the import finds none
    for proto in ("http", "grpc"):
        for name in (f"otlp.proto.{proto}", f"otlp.proto.{proto}.trace_exporter"):
            monkeypatch.setitem(sys.modules, f"opentelemetry.exporter.{name}", None)
    assert not tracing.configure_tracing(environ={"LIVECALL_TRACING": "1"})
    assert not tracing.tracing_enabled()
