"""Outbound calls end to end: `POST /api/calls/outbound` and `livecall call` create the call
through the real `twilio` client against the fake Twilio REST API; the fake "answers" by
streaming the call's TwiML to livecall like Twilio does; answering-machine detection leaves
the profile's voicemail (then hangs up) or lets the agent greet the person who answered."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import yaml
from typer.testing import CliRunner

from livecall.outbound_cli import call_command
from livecall.sim.clips import clip_duration
from livecall.sim.gemini import FakeGeminiServer, Scenario, SessionRecord
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from livecall.sim.twilio import (
    CallResult,
    ScriptAction,
    SimulatedCaller,
    WaitForAgentAudio,
)
from livecall.sim.twilio_rest import FakeCall, FakeTwilioState, serve_fake_twilio_rest
from livecall.store.models import Call

ACCOUNT_SID = "AC" + "1" * 32
API_TOKEN = "outbound-api-token-7c1e"
CALLS_TOKEN = "outbound-calls-token-93ad"  # only this one places calls
AUTH = {"Authorization": f"Bearer {CALLS_TOKEN}"}
# the 555 numbers below are fictional (libphonenumber calls them invalid): allowed by prefix
TEST_DESTINATIONS = "+1555"
OUR_NUMBER = "+15550009999"
CALLEE = "+15557654321"
VOICEMAIL = "Hi, this is Bella Vista about your booking tonight. Please call us back."
OUTREACH: dict[str, Any] = {
    "name": "outreach",
    "numbers": [OUR_NUMBER],
    "system_prompt": "You call guests to confirm their bookings at Bella Vista.",
    "greeting": "Hello, this is Bella Vista calling about your booking.",
    "voicemail_message": VOICEMAIL,
    "max_call_duration_s": 600,
}
FRONT_DESK: dict[str, Any] = {
    "name": "front-desk",
    "default": True,
    "system_prompt": "You are the front desk of Bella Vista.",
}


class Callee:
    """The far end of the calls the fake Twilio creates: it answers each one and streams the
    call's TwiML to livecall, as Twilio does once the callee picks up."""

    def __init__(self, fake: FakeTwilioState) -> None:
        self.script: list[ScriptAction] = []
        self.on_script_end = "hangup"
        self.calls: dict[str, asyncio.Task[CallResult]] = {}
        fake.on_create = self._answer

    def _answer(self, call: FakeCall) -> None:
        twiml = call.twiml or ""

        def serve_twiml(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, text=twiml, headers={"content-type": "text/xml"})

        client = httpx.AsyncClient(transport=httpx.MockTransport(serve_twiml))
        caller = SimulatedCaller(
            "http://twilio.invalid",
            auth_token=TEST_AUTH_TOKEN,
            call_sid=call.sid,
            account_sid=ACCOUNT_SID,
            from_=call.from_,
            to=call.to,
            script=self.script,
            on_script_end=self.on_script_end,  # type: ignore[arg-type]
            http_client=client,
            timeout=30,
        )
        self.calls[call.sid] = asyncio.create_task(self._run(caller, client))

    @staticmethod
    async def _run(caller: SimulatedCaller, client: httpx.AsyncClient) -> CallResult:
        try:
            return await caller.run()
        finally:
            await client.aclose()


@pytest.fixture
async def fake_rest() -> AsyncIterator[tuple[FakeTwilioState, str]]:
    async with serve_fake_twilio_rest(ACCOUNT_SID, TEST_AUTH_TOKEN) as served:
        yield served


@pytest.fixture
def profiles_file(tmp_path: Path) -> Path:
    file = tmp_path / "profiles.yaml"
    file.write_text(yaml.safe_dump({"profiles": [FRONT_DESK, OUTREACH]}, sort_keys=False))
    return file


@pytest.fixture
async def stack(
    tmp_path: Path, fake_rest: tuple[FakeTwilioState, str], profiles_file: Path
) -> AsyncIterator[LocalStack]:
    served = LocalStack(
        scenario=Scenario(seed=9, text_replies={"voicemail": "goodbye"}),
        settings_overrides={
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}",
            "recordings_dir": tmp_path / "recordings",
            "spool_dir": tmp_path / "spool",
            "recording_enabled": False,
            "profiles_file": profiles_file,
            "twilio_account_sid": ACCOUNT_SID,
            "twilio_api_base_url": fake_rest[1],
            "api_token": API_TOKEN,
            "calls_token": CALLS_TOKEN,
            "outbound_allowed_destinations": TEST_DESTINATIONS,
        },
    )
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


@pytest.fixture
def callee(fake_rest: tuple[FakeTwilioState, str]) -> Callee:
    return Callee(fake_rest[0])


async def place(stack: LocalStack, **body: Any) -> str:
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.post("/api/calls/outbound", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    return str(response.json()["call_sid"])


async def finished(stack: LocalStack, callee: Callee, sid: str) -> tuple[CallResult, Call]:
    async with asyncio.timeout(30):
        result = await callee.calls[sid]
    assert not result.protocol_errors and not result.script_errors, result
    state = stack.app.state.livecall
    assert await state.registry.wait_idle(10)
    assert await state.store.flush()
    record = await state.store.repo.get_call(sid)
    assert record is not None
    return result, record


async def live_session(stack: LocalStack, sid: str) -> SessionRecord:
    """The call's Gemini session once it is set up and the app carries the call."""
    gemini: FakeGeminiServer | None = stack.gemini
    assert gemini is not None
    registry = stack.registry
    return await gemini.wait_for(
        lambda: (
            sid in registry.active
            and gemini.sessions
            and gemini.sessions[-1].setup_completed
            and gemini.sessions[-1]
        ),
        timeout=10,
    )


def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
    stream = ET.fromstring(twiml).find("Connect/Stream")
    assert stream is not None
    return stream.get("url", ""), {p.get("name", ""): p.get("value", "") for p in stream}


async def test_outbound_call_without_answering_machine_detection(
    stack: LocalStack, fake_rest: tuple[FakeTwilioState, str], callee: Callee
) -> None:
    fake = fake_rest[0]
    callee.script = [WaitForAgentAudio(min_heard_ms=300, timeout=10)]
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        refused = await http.post("/api/calls/outbound", json={"to": CALLEE})
        assert refused.status_code == 401
        unknown = await http.post(
            "/api/calls/outbound", json={"to": CALLEE, "profile": "nope"}, headers=AUTH
        )
        assert unknown.status_code == 400
        assert "unknown profile 'nope'" in unknown.json()["detail"]
    assert not fake.calls

    sid = await place(stack, to=CALLEE, profile="outreach")

    created = fake.call(sid)
    assert (created.to, created.from_) == (CALLEE, OUR_NUMBER)
    assert "MachineDetection" not in created.create_params
    assert created.create_params["TimeLimit"] == "600"
    url, parameters = stream_of(created.twiml or "")
    assert url == stack.base_url.replace("http://", "ws://") + "/ws/twilio"
    assert parameters.pop("lc_token").startswith("v1.")  # the stream's credential
    assert parameters == {
        "profile": "outreach",
        "direction": "outbound-api",
        "from": OUR_NUMBER,
        "to": CALLEE,
    }
    result, record = await finished(stack, callee, sid)
    assert stack.gemini is not None
    session = stack.gemini.sessions[-1]
    greeting = session.client_contents[0]["turns"][0]["parts"][0]["text"]
    assert greeting.endswith(OUTREACH["greeting"])
    assert session.setup is not None
    assert session.setup["systemInstruction"]["parts"][0]["text"] == OUTREACH["system_prompt"]
    assert result.agent_stretches
    assert (record.direction, record.profile, record.to_number) == ("outbound", "outreach", CALLEE)


async def test_answering_machine_gets_the_voicemail_then_the_call_ends(
    stack: LocalStack, fake_rest: tuple[FakeTwilioState, str], callee: Callee
) -> None:
    fake = fake_rest[0]
    callee.on_script_end = "wait"  # a machine records until the line is hung up

    sid = await place(stack, to=CALLEE, profile="outreach", machine_detection=True)

    params = fake.call(sid).create_params
    assert params["MachineDetection"] == "DetectMessageEnd"
    assert params["AsyncAmd"] == "true"
    assert params["AsyncAmdStatusCallback"] == stack.base_url + "/twilio/amd"
    assert stream_of(fake.call(sid).twiml or "")[1]["amd"] == "1"
    session = await live_session(stack, sid)

    verdict = await fake.mark_answered_by(sid, "machine_end_beep")
    assert verdict is not None and verdict.status_code == 204

    result, record = await finished(stack, callee, sid)
    # no greeting to the machine: the only turn sent was the voicemail, word for word
    assert len(session.client_contents) == 1
    assert session.client_contents[0]["turns"][0]["parts"][0]["text"].endswith(VOICEMAIL)
    # the message was played to the end before the line was cut
    assert result.ended_by == "server"
    assert [m.name for m in result.marks_echoed] == [m.name for m in result.marks_received]
    start, end = result.agent_stretches[-1]
    assert (end - start) >= 0.9 * clip_duration("goodbye")
    async with asyncio.timeout(5):
        await fake.call(sid).ended.wait()
    assert fake.call(sid).status == "completed"
    assert record.end_reason == "voicemail"
    events = {e.kind: e.data for e in record.events}
    assert events["answered_by"] == {"answered_by": "machine_end_beep"}
    assert events["voicemail"] == {"left": True}


async def test_a_person_answering_gets_the_greeting_after_the_verdict(
    stack: LocalStack, fake_rest: tuple[FakeTwilioState, str], callee: Callee
) -> None:
    fake = fake_rest[0]
    callee.script = [WaitForAgentAudio(min_heard_ms=300, timeout=10)]

    sid = await place(stack, to=CALLEE, profile="outreach", machine_detection=True)
    session = await live_session(stack, sid)
    assert not session.client_contents  # greeting held until Twilio says who answered
    await fake.mark_answered_by(sid, "human")

    result, record = await finished(stack, callee, sid)
    greeting = session.client_contents[0]["turns"][0]["parts"][0]["text"]
    assert greeting.endswith(OUTREACH["greeting"])
    assert result.agent_stretches and result.ended_by == "caller"
    assert record.end_reason in ("caller_stop", "caller_closed")
    assert {e.kind: e.data for e in record.events}["answered_by"] == {"answered_by": "human"}


async def test_livecall_call_places_the_call(
    fake_rest: tuple[FakeTwilioState, str],
    profiles_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, base_url = fake_rest
    for name, value in {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": TEST_AUTH_TOKEN,
        "TWILIO_API_BASE_URL": base_url,
        "PUBLIC_URL": "https://calls.example.com",
        "PROFILES_FILE": str(profiles_file),
        "OUTBOUND_ALLOWED_DESTINATIONS": TEST_DESTINATIONS,
    }.items():
        monkeypatch.setenv(name, value)
    app = typer.Typer()
    app.command("call")(call_command)
    app.command("noop")(lambda: None)  # two commands: `call` stays a subcommand
    runner = CliRunner()

    done = await asyncio.to_thread(
        runner.invoke, app, ["call", CALLEE, "--profile", "outreach", "--amd"]
    )
    assert done.exit_code == 0, done.output
    created = fake.last_call()
    assert done.stdout.strip().splitlines()[-1] == created.sid
    assert created.create_params["AsyncAmdStatusCallback"] == (
        "https://calls.example.com/twilio/amd"
    )
    url, parameters = stream_of(created.twiml or "")
    assert url == "wss://calls.example.com/ws/twilio"
    assert parameters["profile"] == "outreach" and parameters["amd"] == "1"

    bad = await asyncio.to_thread(runner.invoke, app, ["call", CALLEE, "--profile", "nope"])
    assert bad.exit_code == 1
    assert "unknown profile 'nope'" in bad.output
    premium = await asyncio.to_thread(runner.invoke, app, ["call", "+19005551234"])
    assert premium.exit_code == 1
    assert "premium-rate numbers are not called" in premium.output
    assert len(fake.calls) == 1
