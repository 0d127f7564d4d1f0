"""End-of-call webhooks through the real server: a simulated call, a real HTTP receiver on
loopback, the outbox in the call records database.

Each test makes a call through the whole stack (simulated Twilio -> livecall -> fake Gemini),
lets it end, and watches what the receiver gets: signed bodies (checked with the snippet the
README documents), retries through 500s and timeouts with one delivery id, a restart and a
database outage in between, the expiring recording link, and manual retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from sqlalchemy import event

from livecall.outcomes.webhook_payload import recording_link
from livecall.outcomes.webhooks import link_key
from livecall.sim.clips import load_clip
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack, free_socket
from livecall.sim.twilio import HangUp, Pause, Say, WaitForAgentAudio, WaitForAgentSilence
from livecall.store import writer as writer_module
from livecall.store.models import WebhookDelivery
from support import eventually

pytestmark = pytest.mark.timeout(90)

SECRET = "whsec-e2e-5a6b7c8d"
TOKEN = "webhooks-e2e-api-token-9e8f"
README = Path(__file__).resolve().parents[1] / "README.md"


def documented_verifier() -> Any:
    """The README's verification snippet, run as documented (so the docs cannot drift)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Webhooks") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Webhooks section has a Python verification snippet"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    return namespace["verify_livecall_webhook"]


# --- a real HTTP receiver on loopback ---------------------------------------------------------


@dataclass
class Receiver:
    """A webhook endpoint whose answers follow `plan` ("500", "hang", then 200 for ever)."""

    plan: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = self.plan.pop(0) if self.plan else "200"
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append({"headers": headers, "body": body, "answer": answer})
        if answer == "hang":  # never answers: the sender's timeout must fire
            await self._release.wait()
            return
        status = int(answer)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok" if status < 300 else b"nope"})

    async def start(self) -> None:
        sock = free_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hooks/calls"
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", interface="asgi3"
        )
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        server = self._server

        async def started() -> bool:
            return server.started

        await eventually(started, 10)

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)

    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["answer"].startswith("2")]


@pytest.fixture
async def receiver() -> Any:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def fast(receiver: Receiver, home: Path, **overrides: Any) -> dict[str, Any]:
    """Settings for a stack whose webhooks retry in tens of milliseconds, not seconds."""
    settings: dict[str, Any] = {
        "call_webhook_url": receiver.url,
        "call_webhook_secret": SECRET,
        "webhook_backoff_base_s": 0.05,
        "webhook_backoff_max_s": 0.2,
        "webhook_poll_interval_s": 0.05,
        "webhook_timeout_s": 0.5,
        "api_token": TOKEN,
        "vad_silence_duration_ms": 300,
        "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
        "recordings_dir": home / "recordings",
        "spool_dir": home / "spool",
    }
    settings.update(overrides)
    return settings


async def start_stack(settings: dict[str, Any]) -> LocalStack:
    stack = LocalStack(
        scenario=Scenario(seed=7, greeting=None, pause_prob=0.0), settings_overrides=settings
    )
    await stack.start()
    return stack


async def make_call(stack: LocalStack, call_over: Any, *, flush: bool = True) -> str:
    pcm, rate = load_clip("yes")
    caller = stack.caller(
        [
            Pause(300),
            Say(pcm, rate=rate, label="yes"),
            WaitForAgentAudio(min_heard_ms=400, timeout=10),
            WaitForAgentSilence(silence_ms=400, timeout=15),
            HangUp(),
        ],
        from_="+15551230000",
        to="+15559870000",
    )
    result = await caller.run()
    assert result.protocol_errors == [] and result.script_errors == []
    if flush:
        await call_over(stack)
    return result.call_sid


async def deliveries(stack: LocalStack, sid: str) -> list[WebhookDelivery]:
    return await stack.app.state.livecall.webhooks.outbox.for_call(sid)


async def delivered(stack: LocalStack, sid: str, within: float = 20.0) -> WebhookDelivery:
    async def check() -> WebhookDelivery | None:
        rows = await deliveries(stack, sid)
        return rows[0] if rows and rows[0].status == "delivered" else None

    return await eventually(check, within)


# --- tests -----------------------------------------------------------------------------------


async def test_webhook_is_signed_and_carries_the_call(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    stack = await start_stack(fast(receiver, tmp_path))
    try:
        sid = await make_call(stack, call_over)
        row = await delivered(stack, sid)
        (request,) = receiver.requests
        headers, body = request["headers"], request["body"]
        assert documented_verifier()(SECRET, body, headers["x-livecall-signature"])
        assert not documented_verifier()("wrong-secret", body, headers["x-livecall-signature"])
        assert headers["x-livecall-delivery"] == row.id
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"].startswith("livecall-webhooks/")
        assert TOKEN not in body.decode() and SECRET not in body.decode()
        payload = orjson.loads(body)
        assert payload["delivery_id"] == row.id and payload["call_sid"] == sid
        assert payload["carrier"] == "twilio" and payload["direction"] == "inbound"
        assert (payload["from"], payload["to"]) == ("+15551230000", "+15559870000")
        assert payload["status"] == "completed" and payload["end_reason"]
        assert payload["duration_s"] > 0 and payload["ended_at"].endswith("Z")
        speakers = [t["speaker"] for t in payload["turns"]]
        assert "caller" in speakers and "agent" in speakers
        assert payload["latency"]["turns"] and payload["usage"]["gemini_sessions"] >= 1
        assert payload["analysis"] is None
        assert row.attempts == 1 and row.last_status_code == 200
        call = await stack.app.state.livecall.store.repo.get_call(sid)
        assert len(payload["turns"]) == len(call.turns)
        assert len(payload["events"]) == len(call.events)
    finally:
        await stack.stop()


async def test_retries_through_500_and_timeout_with_one_delivery_id(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    receiver.plan = ["500", "hang", "503"]
    stack = await start_stack(fast(receiver, tmp_path))
    try:
        sid = await make_call(stack, call_over)
        row = await delivered(stack, sid)
        assert [r["answer"] for r in receiver.requests] == ["500", "hang", "503", "200"]
        assert len(receiver.ok()) == 1
        ids = {r["headers"]["x-livecall-delivery"] for r in receiver.requests}
        assert ids == {row.id}
        bodies = {r["body"] for r in receiver.requests}
        assert len(bodies) == 1  # every attempt sends the same bytes
        assert row.attempts == 4
        assert [h["status_code"] for h in row.history] == [500, None, 503, 200]
        assert row.history[1]["error"] == "timeout"
        # the API shows the same story
        async with httpx.AsyncClient(base_url=stack.base_url) as client:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            listed = (await client.get(f"/api/calls/{sid}/webhooks", headers=auth)).json()
            metrics = (await client.get("/metrics")).text
        assert listed[0]["delivery_id"] == row.id and listed[0]["status"] == "delivered"
        assert listed[0]["url"] == receiver.url.split("/hooks")[0] + "/…"  # no path, no token
        assert 'livecall_webhook_attempts_total{outcome="retry"} 3.0' in metrics
        assert 'livecall_webhook_attempts_total{outcome="delivered"} 1.0' in metrics
    finally:
        await stack.stop()


async def test_outbox_survives_a_restart(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    receiver.plan = ["500"] * 1000  # down until we say so
    settings = fast(receiver, tmp_path)
    first = await start_stack(settings)
    try:
        sid = await make_call(first, call_over)

        async def failed_once() -> WebhookDelivery | None:
            rows = await deliveries(first, sid)
            return rows[0] if rows and rows[0].attempts >= 1 else None

        before = await eventually(failed_once)
    finally:
        await first.stop()
    receiver.plan = []
    second = await start_stack(settings)  # same database: the outbox is still there
    try:
        row = await delivered(second, sid)
        assert row.id == before.id
        assert len(receiver.ok()) == 1
        assert {r["headers"]["x-livecall-delivery"] for r in receiver.requests} == {row.id}
    finally:
        await second.stop()


async def test_a_delivery_cut_off_by_a_restart_is_sent_at_once(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    """Stopping the server mid-send hands the delivery's lease back: the next instance sends
    it right away (not after WEBHOOK_LEASE), with the same delivery id and bytes, and the
    cut-off send is not counted as an attempt. The receiver never answered that first
    request, so the one resend is all at-least-once allows."""
    receiver.plan = ["hang"]  # the first request is never answered
    settings = fast(receiver, tmp_path, webhook_timeout_s=60.0, webhook_poll_interval_s=30.0)
    first = await start_stack(settings)
    try:
        sid = await make_call(first, call_over)
        await eventually(lambda: _async(len(receiver.requests) == 1), 20)
    finally:
        await first.stop()  # mid-send: the lease would hold the row for 125 s
    receiver.plan = []
    second = await start_stack(settings)  # same database; polls only every 30 s
    try:
        row = await delivered(second, sid, within=30)  # the lease: 60 s or more
        assert row.attempts == 1 and [h["status_code"] for h in row.history] == [200]
        assert [r["answer"] for r in receiver.requests] == ["hang", "200"]
        assert {r["headers"]["x-livecall-delivery"] for r in receiver.requests} == {row.id}
        assert len({r["body"] for r in receiver.requests}) == 1
    finally:
        await second.stop()


async def test_a_claim_cut_off_by_a_restart_is_handed_back(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    """A stop that lands after a claim's commit but before its answer reached the worker (a
    slow database round trip) leaves no lease behind: the stopping worker hands back every
    lease its claims hold, and the next instance sends at once, once."""
    settings = fast(receiver, tmp_path, webhook_poll_interval_s=30.0)
    first = await start_stack(settings)
    outbox = first.app.state.livecall.webhooks.outbox
    claim, claimed = outbox.claim, asyncio.Event()

    async def claim_then_stall(*args: Any, **kwargs: Any) -> list[WebhookDelivery]:
        rows = await claim(*args, **kwargs)
        if rows:  # committed: the answer never arrives
            claimed.set()
            await asyncio.Event().wait()
        return rows

    outbox.claim = claim_then_stall
    try:
        sid = await make_call(first, call_over)
        await asyncio.wait_for(claimed.wait(), 20)
        (row,) = await deliveries(first, sid)
        assert row.lease_owner is not None and receiver.requests == []
    finally:
        await first.stop()
    second = await start_stack(settings)  # polls only every 30 s: its first look must do
    try:
        row = await delivered(second, sid, within=30)  # the lease: 60 s or more
        assert row.attempts == 1 and len(receiver.requests) == 1
        assert receiver.requests[0]["headers"]["x-livecall-delivery"] == row.id
    finally:
        await second.stop()


async def test_a_delivery_answered_as_the_server_stops_is_not_sent_again(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    """The receiver answers 2xx, and the stop cuts the delivery off while its attempt is being
    recorded: the bookkeeping is seen through, so the next instance does not send it again."""
    settings = fast(receiver, tmp_path)
    first = await start_stack(settings)
    outbox = first.app.state.livecall.webhooks.outbox
    record, booking = outbox.record_attempt, asyncio.Event()

    async def record_after_the_stop(row: WebhookDelivery, **kwargs: Any) -> None:
        booking.set()  # recorded only once the stop has cut the delivery off
        sender = next(t for t in asyncio.all_tasks() if t.get_name() == f"webhook:{row.call_sid}")
        await eventually(lambda: _async(sender.cancelling() > 0), 60)
        await record(row, **kwargs)

    outbox.record_attempt = record_after_the_stop
    try:
        sid = await make_call(first, call_over)
        await asyncio.wait_for(booking.wait(), 20)
    finally:
        await first.stop()
    second = await start_stack(settings)
    try:
        row = await delivered(second, sid, within=30)
        assert row.attempts == 1 and len(receiver.requests) == 1
        await second.app.state.livecall.webhooks.pump()  # nothing left to claim
        assert len(receiver.requests) == 1
    finally:
        await second.stop()


async def test_database_down_at_call_end_still_delivers_after_recovery(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    stack = await start_stack(fast(receiver, tmp_path))
    state = stack.app.state.livecall
    down = {"on": False}

    def outage(*_args: Any) -> None:
        if down["on"]:
            raise ConnectionResetError("database down (simulated)")

    event.listen(state.store.engine.sync_engine, "before_cursor_execute", outage)
    try:
        down["on"] = True
        sid = await make_call(stack, call_over, flush=False)
        assert await state.registry.wait_idle(15)
        assert not await state.store.flush()  # the records (and the outbox op) wait
        assert receiver.requests == []
        down["on"] = False
        assert await state.store.flush()
        row = await delivered(stack, sid)
        assert (
            len(receiver.ok()) == 1
            and receiver.requests[0]["headers"]["x-livecall-delivery"] == row.id
        )
    finally:
        down["on"] = False
        await stack.stop()


async def call_while_the_database_is_down(settings: dict[str, Any], call_over: Any) -> str:
    """One call on a server whose database refuses every statement, then that server stopped:
    the call's records and its webhook op are left in the spool file. Its call id."""
    first = await start_stack(settings)
    state = first.app.state.livecall

    def outage(*_args: Any) -> None:
        raise ConnectionResetError("database down (simulated)")

    event.listen(state.store.engine.sync_engine, "before_cursor_execute", outage)
    try:
        sid = await make_call(first, call_over, flush=False)
        assert await state.registry.wait_idle(15)
    finally:
        await first.stop()
    return sid


async def test_spooled_while_down_and_delivered_by_the_next_process(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    settings = fast(receiver, tmp_path)
    sid = await call_while_the_database_is_down(settings, call_over)
    assert list((tmp_path / "spool").glob("spool-*.jsonl"))
    assert receiver.requests == []
    second = await start_stack(settings)  # the database answers again; the spool is replayed
    try:
        row = await delivered(second, sid)
        assert len(receiver.ok()) == 1
        assert receiver.ok()[0]["headers"]["x-livecall-delivery"] == row.id
        assert orjson.loads(receiver.ok()[0]["body"])["call_sid"] == sid
    finally:
        await second.stop()


async def test_a_spool_left_by_a_stopped_pod_is_replayed_by_its_replacement_at_once(
    tmp_path: Path, receiver: Receiver, call_over: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod stopped during an outage leaves its spool on the shared volume; its replacement
    has another hostname, so the file is another host's. Closed on the way out, it is marked
    released and replayed at once, not after FOREIGN_SPOOL_AGE_S of no refresh."""
    settings = fast(receiver, tmp_path)
    sid = await call_while_the_database_is_down(settings, call_over)
    (left,) = (tmp_path / "spool").glob("spool-*.jsonl")
    assert left.name.startswith(writer_module.RELEASED_PREFIX)
    monkeypatch.setattr(writer_module, "_HOST", "replacementpod")
    second = await start_stack(settings)
    try:
        row = await delivered(second, sid, within=30)  # else: FOREIGN_SPOOL_AGE_S (60 s)
        assert len(receiver.ok()) == 1
        assert receiver.ok()[0]["headers"]["x-livecall-delivery"] == row.id
        assert not list((tmp_path / "spool").glob("spool-*.jsonl"))
    finally:
        await second.stop()


async def test_a_shutdown_step_that_fails_still_lets_the_webhooks_and_store_close(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    """A shutdown step that raises (here closing the HTTP tools' client) is logged and the
    rest still run: the webhook worker stops and the store closes, its spool released, so
    the next process replays it and the delivery goes out."""
    settings = fast(receiver, tmp_path)
    first = await start_stack(settings)
    state = first.app.state.livecall

    def outage(*_args: Any) -> None:
        raise ConnectionResetError("database down (simulated)")

    async def broken_close() -> None:
        raise RuntimeError("client close failed (simulated)")

    event.listen(state.store.engine.sync_engine, "before_cursor_execute", outage)
    state.http_tools.aclose = broken_close
    try:
        sid = await make_call(first, call_over, flush=False)
        assert await state.registry.wait_idle(15)
    finally:
        await first.stop()
    assert state.webhooks.client is None  # stopped
    (left,) = (tmp_path / "spool").glob("spool-*.jsonl")
    assert left.name.startswith(writer_module.RELEASED_PREFIX)  # closed
    second = await start_stack(settings)
    try:
        row = await delivered(second, sid, within=30)
        assert len(receiver.ok()) == 1 and row.attempts == 1
    finally:
        await second.stop()


async def test_recording_link_works_until_it_expires(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    stack = await start_stack(fast(receiver, tmp_path))
    try:
        sid = await make_call(stack, call_over)
        await delivered(stack, sid)
        payload = orjson.loads(receiver.requests[0]["body"])
        link = payload["recording"]["url"]
        assert link.startswith(f"{stack.base_url}/recordings/{sid}?exp=")
        assert TOKEN not in link
        async with httpx.AsyncClient() as client:
            ok = await client.get(link)
            assert ok.status_code == 200 and ok.content[:4] == b"RIFF"
            assert (await client.get(link[:-4] + "0000")).status_code == 403
            assert (await client.get(link.replace(sid, sid[:-1] + "X"))).status_code == 403
            assert (await client.get(f"{stack.base_url}/recordings/{sid}")).status_code == 403
            key = link_key(stack.settings)
            assert key is not None
            old = recording_link(
                key, stack.base_url, sid, datetime.now(UTC) - timedelta(days=8), 7 * 86400
            )
            assert (await client.get(old["url"])).status_code == 410
    finally:
        await stack.stop()


async def test_manual_retry_from_the_api_after_giving_up(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    receiver.plan = ["500"] * 1000
    stack = await start_stack(fast(receiver, tmp_path, webhook_give_up_s=0.3))
    try:
        sid = await make_call(stack, call_over)

        async def failed() -> WebhookDelivery | None:
            rows = await deliveries(stack, sid)
            return rows[0] if rows and rows[0].status == "failed" else None

        gave_up = await eventually(failed)
        async with httpx.AsyncClient(base_url=stack.base_url) as client:
            metrics = (await client.get("/metrics")).text
            assert 'livecall_webhook_deliveries{status="failed"} 1.0' in metrics
            receiver.plan = []
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert (await client.post(f"/api/calls/{sid}/webhook/retry")).status_code == 401
            response = await client.post(f"/api/calls/{sid}/webhook/retry", headers=auth)
            assert response.status_code == 202, response.text
            assert response.json()["queued"] == 1
            missing = await client.post("/api/calls/CA404/webhook/retry", headers=auth)
            assert missing.status_code == 404
        row = await delivered(stack, sid)
        assert row.id == gave_up.id and len(receiver.ok()) == 1
        assert receiver.ok()[0]["headers"]["x-livecall-delivery"] == gave_up.id
    finally:
        await stack.stop()


async def test_call_page_shows_deliveries_and_retries_by_hand(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    receiver.plan = ["500"] * 1000
    stack = await start_stack(fast(receiver, tmp_path, webhook_give_up_s=0.3))
    try:
        sid = await make_call(stack, call_over)

        async def failed() -> WebhookDelivery | None:
            rows = await deliveries(stack, sid)
            return rows[0] if rows and rows[0].status == "failed" else None

        row = await eventually(failed)
        async with httpx.AsyncClient(base_url=stack.base_url) as client:
            login = await client.post("/login", data={"token": TOKEN, "next": "/"})
            assert login.status_code == 303, login.text
            page = await client.get(f"/calls/{sid}")
            assert page.status_code == 200
            assert row.id in page.text and "HTTP 500" in page.text and "failed" in page.text
            csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
            assert csrf
            receiver.plan = []
            refused = await client.post(f"/calls/{sid}/webhook/retry", data={"csrf": "nope"})
            assert refused.status_code == 403
            response = await client.post(
                f"/calls/{sid}/webhook/retry", data={"csrf": csrf.group(1)}
            )
            assert response.status_code == 303
        done = await delivered(stack, sid)
        assert done.id == row.id and len(receiver.ok()) == 1
    finally:
        await stack.stop()


async def test_profile_webhook_url_wins_and_no_secret_means_no_webhook(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(
        "profiles:\n"
        "  - name: desk\n"
        "    default: true\n"
        f"    webhook_url: {receiver.url}?profile=desk\n",
        encoding="utf-8",
    )
    stack = await start_stack(
        fast(
            receiver, tmp_path, call_webhook_url="http://127.0.0.1:9/never", profiles_file=profiles
        )
    )
    try:
        sid = await make_call(stack, call_over)
        row = await delivered(stack, sid)
        assert row.url.endswith("?profile=desk") and len(receiver.ok()) == 1
    finally:
        await stack.stop()
    quiet = await start_stack(fast(receiver, tmp_path / "quiet", call_webhook_secret=None))
    try:
        sid = await make_call(quiet, call_over)
        assert await deliveries(quiet, sid) == []
        assert len(receiver.requests) == 1  # only the first stack's delivery
    finally:
        await quiet.stop()


async def test_analysis_rides_in_the_webhook_once_settled(
    tmp_path: Path, receiver: Receiver, call_over: Any
) -> None:
    stack = await start_stack(fast(receiver, tmp_path))
    service = stack.app.state.livecall.webhooks
    service.wants_analysis = lambda _profile: True  # as a profile with analysis on
    try:
        sid = await make_call(stack, call_over)
        (row,) = await deliveries(stack, sid)
        assert row.await_analysis and row.attempts == 0 and receiver.requests == []
        service.analysis_settled(sid, {"summary": "Booked a table", "success": True})
        await delivered(stack, sid)
        payload = orjson.loads(receiver.ok()[0]["body"])
        assert payload["analysis"] == {"summary": "Booked a table", "success": True}
        failed = await make_call(stack, call_over)
        service.analysis_settled(failed, None)  # the analysis finally failed
        await delivered(stack, failed)
        assert orjson.loads(receiver.ok()[1]["body"])["analysis"] is None
    finally:
        await stack.stop()


async def test_cli_sends_a_signed_sample(receiver: Receiver) -> None:
    from typer.testing import CliRunner

    from livecall.cli import app

    receiver.plan = ["200", "500"]
    runner = CliRunner()
    env = {"CALL_WEBHOOK_SECRET": SECRET}
    ok = await asyncio.to_thread(runner.invoke, app, ["webhooks", "test", receiver.url], env=env)
    assert ok.exit_code == 0, ok.output
    assert "HTTP 200" in ok.output and "dlv_" in ok.output
    request = receiver.requests[0]
    assert documented_verifier()(
        SECRET, request["body"], request["headers"]["x-livecall-signature"]
    )
    assert orjson.loads(request["body"])["event"] == "call.ended"
    bad = await asyncio.to_thread(runner.invoke, app, ["webhooks", "test", receiver.url], env=env)
    assert bad.exit_code == 1 and "HTTP 500" in bad.output and "retried" in bad.output
    no_secret = await asyncio.to_thread(
        runner.invoke, app, ["webhooks", "test", receiver.url], env={"CALL_WEBHOOK_SECRET": ""}
    )
    assert no_secret.exit_code == 2 and len(receiver.requests) == 2


async def _async(value: Any) -> Any:
    return value
