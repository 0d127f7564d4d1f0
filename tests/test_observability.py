"""What an operator sees of calls: `/metrics`, traces, JSON logs, and health/readiness/drain.

Each test runs real simulated calls through a `LocalStack` (the real app under uvicorn, the
fake Gemini Live over TLS) and reads the results where an operator would: the Prometheus
text on `/metrics`, the spans an exporter received, the log lines, the probe answers.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from livecall.log import configure_logging
from livecall.sim.gemini import Scenario
from livecall.sim.twilio import HangUp, Pause, WaitForAgentAudio, WaitForAgentSilence
from livecall.tracing import configure_tracing, shutdown_tracing
from support import eventually, say

FAST = {"vad_silence_duration_ms": 300}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for this test only."""
    exporter = InMemorySpanExporter()
    assert configure_tracing(exporter=exporter)
    try:
        yield exporter
    finally:
        shutdown_tracing()


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """`LOG_FORMAT=json` as `livecall serve` sets it up, written to a buffer; the logging
    configuration of the test session is put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    buf = io.StringIO()
    configure_logging("info", "json")
    root.handlers[0].setStream(buf)  # type: ignore[attr-defined]
    try:
        yield buf
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)


@pytest.mark.timeout(45)
async def test_metrics_and_traces_of_a_call_with_a_barge_in_and_a_busy_answer(
    make_stack, call_over, spans: InMemorySpanExporter
) -> None:
    scenario = Scenario(
        seed=3,
        greeting=None,
        pause_prob=0.0,
        first_audio_delay=0.2,
        replies={"yes": "book_reply", "hours": "hours_reply"},
        rate=2.0,
    )
    stack = await make_stack(scenario, max_concurrent_calls=1, **FAST)
    caller = stack.caller(
        [
            Pause(200),
            say("yes"),
            WaitForAgentAudio(min_heard_ms=1000, timeout=10),
            say("hours"),  # talks over the long answer
            WaitForAgentSilence(silence_ms=500, timeout=15),
            HangUp(),
        ],
        seed=3,
    )
    result = await caller.run()
    await call_over(stack)
    assert result.clears, "the caller never barged in"

    # the one place is taken (a webhook answered, its stream not here yet): a busy answer
    assert stack.registry.reserve("CA" + "f" * 32)
    busy = await stack.caller([Pause(100)]).run()
    assert busy.said or busy.rejected

    async with httpx.AsyncClient(base_url=stack.base_url) as client:
        r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    record = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
    assert record is not None and record.end_reason
    assert m[("livecall_active_calls", ())] == 0
    assert m[("livecall_gemini_sessions_active", ())] == 0
    ended = (("end_reason", record.end_reason), ("status", record.status))
    assert m[("livecall_calls_total", ended)] == 1
    assert m[("livecall_first_audio_latency_seconds_count", ())] >= 1
    assert m[("livecall_barge_in_stop_seconds_count", ())] == 1
    assert m[("livecall_barge_in_stop_seconds_sum", ())] < 1.0
    assert m[("livecall_admission_refusals_total", (("reason", "full"),))] == 1

    # one trace for the call, a span per turn inside it; no phone number anywhere
    finished = spans.get_finished_spans()
    [call_span] = [s for s in finished if s.name == "call"]
    assert call_span.attributes["livecall.call_sid"] == result.call_sid
    assert call_span.attributes["livecall.end_reason"] == record.end_reason
    turns = [s for s in finished if s.name.startswith("turn.")]
    assert {s.name for s in turns} == {"turn.caller", "turn.agent"}
    assert all(
        s.parent is not None and s.parent.span_id == call_span.context.span_id for s in turns
    )
    assert all(s.context.trace_id == call_span.context.trace_id for s in turns)
    [cut] = [s for s in turns if s.attributes.get("livecall.turn.interrupted")]
    assert cut.name == "turn.agent"
    assert cut.attributes["livecall.turn.barge_in_stop_ms"] >= 0
    assert "interrupted" in [e.name for e in call_span.events]  # the barge-in, as an event
    everything = json.dumps([dict(s.attributes or {}) for s in finished])
    assert "+1555000" not in everything


@pytest.mark.timeout(30)
async def test_json_logs_name_the_call_and_its_trace(
    make_stack, call_over, spans: InMemorySpanExporter, json_logs: io.StringIO
) -> None:
    stack = await make_stack(Scenario(seed=4, greeting=None, first_audio_delay=0.2), **FAST)
    result = await stack.caller(
        [say("hours"), WaitForAgentSilence(silence_ms=500, timeout=15), HangUp()], seed=4
    ).run()
    await call_over(stack)

    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.strip()]
    mine = [line for line in lines if line.get("call_sid") == result.call_sid]
    events = {line["event"] for line in mine}
    assert {"call.turn", "call.summary"} <= events, sorted(events)
    [call_span] = [s for s in spans.get_finished_spans() if s.name == "call"]
    trace_id = format(call_span.context.trace_id, "032x")
    in_call = [line for line in mine if line["event"] in ("call.turn", "call.summary")]
    assert in_call and all(line.get("trace_id") == trace_id for line in in_call)
    assert all("timestamp" in line and "level" in line for line in lines)


# --------------------------------------------------------------------------- health and drain


async def test_health_stays_200_while_draining_ready_goes_503_and_drain_wants_the_token(
    make_stack,
) -> None:
    stack = await make_stack(admin_token="observability-admin-token-0123456789")
    async with httpx.AsyncClient(base_url=stack.base_url) as client:
        health = (await client.get("/health")).json()
        assert health["status"] == "ok" and health["active_calls"] == 0
        assert health["cluster"]["redis"] == "off"
        assert (await client.get("/ready")).status_code == 200

        # loopback is not enough (a sidecar or a local proxy is on loopback too)
        assert (await client.post("/admin/drain")).status_code == 401
        assert (await client.get("/ready")).status_code == 200

        auth = {"Authorization": "Bearer observability-admin-token-0123456789"}
        first = await client.post("/admin/drain", headers=auth)
        again = await client.post("/admin/drain", headers=auth)  # idempotent
        assert first.status_code == again.status_code == 202
        assert first.json()["status"] == "draining"
        r = await client.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "draining"
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "draining"

        busy = await stack.caller([Pause(100)]).run()
        assert busy.said or busy.rejected
        m = samples((await client.get("/metrics")).text)
        assert m[("livecall_admission_refusals_total", (("reason", "draining"),))] == 1


async def test_live_calls_api_without_redis_lists_and_ends_this_instance_s_calls(
    make_stack,
) -> None:
    stack = await make_stack(
        Scenario(seed=8, greeting=None), api_token="observability-api-token-0123456789"
    )
    auth = {"Authorization": "Bearer observability-api-token-0123456789"}
    caller = stack.caller([Pause(30000)], timeout=40)
    call = asyncio.create_task(caller.run())
    async with httpx.AsyncClient(base_url=stack.base_url, headers=auth) as client:
        assert (await client.get("/api/live", headers={"Authorization": ""})).status_code == 401

        async def listed() -> list[dict[str, Any]]:
            r = await client.get("/api/live")
            assert r.status_code == 200
            return r.json()["calls"]

        [row] = await eventually(listed)
        assert row["call_sid"] == caller.call_sid and row["instance"]
        r = await client.post(f"/api/live/{caller.call_sid}/end")
        assert r.status_code == 202
        result = await asyncio.wait_for(call, 15)
        assert result.ended_by == "server"
        assert await stack.registry.wait_idle(10)
        assert await listed() == []
        assert (await client.post(f"/api/live/{caller.call_sid}/end")).status_code == 404


async def test_a_registry_that_does_not_answer_never_delays_a_call(make_stack, call_over) -> None:
    stack = await make_stack(Scenario(seed=9, greeting=None, first_audio_delay=0.2), **FAST)
    cluster = stack.app.state.livecall.cluster
    original = cluster.announce
    asked: list[str] = []

    async def silent_announce(call_sid: str, info: dict[str, Any]) -> None:
        asked.append(call_sid)
        await asyncio.sleep(30)  # a Redis that accepted the connection and went quiet
        await original(call_sid, info)

    cluster.announce = silent_announce
    result = await stack.caller(
        [say("hours"), WaitForAgentSilence(silence_ms=500, timeout=15), HangUp()], seed=9
    ).run()
    await call_over(stack)

    assert asked == [result.call_sid]
    [session] = stack.gemini.sessions
    assert result.stream_started is not None
    assert session.opened_at - result.stream_started < 1.0  # the model was not kept waiting
    assert result.response_latencies_ms and result.response_latencies_ms[0] < 3000
    assert await cluster.list_calls() == []  # the announce was called off with the call
    assert not [t for t in asyncio.all_tasks() if t.get_name() == f"announce:{result.call_sid}"]
