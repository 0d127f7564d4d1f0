"""The agent's tools end to end: the fake model calls each one during a simulated phone call,
and what it did is checked where it shows: what the caller heard, what Twilio's REST API was
asked (its fake), what the model got back, and the call's records."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from livecall.audio.dtmf import detect_dtmf
from livecall.sim.clips import clip_duration, load_clip
from livecall.sim.gemini import CloseFault, Scenario, SessionRecord, ToolCallFault
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack, free_socket
from livecall.sim.twilio import CallResult, Pause, Say, ScriptAction, WaitForAgentSilence
from livecall.sim.twilio_rest import FakeCall, FakeTwilioState, serve_fake_twilio_rest
from livecall.store.models import Call

ACCOUNT_SID = "AC" + "0" * 32
MANAGER = "+15551239999"
SLOW_TOOL_S = 3.0

StackFactory = Callable[..., Awaitable[LocalStack]]


def say(clip: str = "yes") -> Say:
    samples, rate = load_clip(clip)
    return Say(samples, rate, clip)


def profiles_yaml(**profile: Any) -> str:
    """A profiles file with one default profile (no greeting unless given)."""
    base: dict[str, Any] = {
        "name": "agent",
        "default": True,
        "system_prompt": "You answer the phone for Bella Vista.",
    }
    return yaml.safe_dump({"profiles": [{**base, **profile}]}, sort_keys=False)


@pytest.fixture
async def fake_rest() -> AsyncIterator[tuple[FakeTwilioState, str]]:
    async with serve_fake_twilio_rest(ACCOUNT_SID, TEST_AUTH_TOKEN) as served:
        yield served


@pytest.fixture
async def make_stack(
    tmp_path: Path, fake_rest: tuple[FakeTwilioState, str]
) -> AsyncIterator[StackFactory]:
    """`await make_stack(scenario, profiles_text)`: livecall with REST call control pointed at
    the fake Twilio API; database and profiles file in `tmp_path`."""
    stacks: list[LocalStack] = []

    async def make(scenario: Scenario, profiles: str, **overrides: Any) -> LocalStack:
        home = tmp_path / f"stack{len(stacks)}"
        home.mkdir()
        (home / "profiles.yaml").write_text(profiles)
        settings: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
            "recordings_dir": home / "recordings",
            "spool_dir": home / "spool",
            "recording_enabled": False,
            "profiles_file": home / "profiles.yaml",
            "twilio_account_sid": ACCOUNT_SID,
            "twilio_api_base_url": fake_rest[1],
            **overrides,
        }
        stack = LocalStack(scenario=scenario, settings_overrides=settings)
        await stack.start()
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in reversed(stacks):
            await stack.stop()


def live_call(fake: FakeTwilioState, call_sid: str) -> FakeCall:
    """Tell the fake REST API about an inbound call in progress (Twilio knows its calls)."""
    call = FakeCall(
        sid=call_sid,
        account_sid=ACCOUNT_SID,
        to="+15550002222",
        from_="+15550001111",
        create_params={},
        status_callback_events=set(),
        status="in-progress",
        status_history=["in-progress"],
    )
    fake.calls[call_sid] = call
    return call


async def run_call(
    stack: LocalStack, script: list[ScriptAction], **kwargs: Any
) -> tuple[CallResult, SessionRecord, Call]:
    """One simulated call; returns what the caller got, the model's session and the record."""
    result = await stack.caller(script, timeout=30, **kwargs).run()
    assert not result.protocol_errors, result.protocol_errors
    state = stack.app.state.livecall
    assert await state.registry.wait_idle(15)
    assert await state.store.flush()
    record = await state.store.repo.get_call(result.call_sid)
    assert record is not None
    assert stack.gemini is not None
    return result, stack.gemini.sessions[-1], record


def responses_by_name(session: SessionRecord) -> dict[str, Any]:
    return {r.name: r.response for r in session.tool_responses}


def last_stretch_ms(result: CallResult) -> float:
    start, end = result.agent_stretches[-1]
    return (end - start) * 1000


# --------------------------------------------------------------------------- call control


async def test_end_call_plays_goodbye_then_hangs_up(
    make_stack: StackFactory, fake_rest: tuple[FakeTwilioState, str]
) -> None:
    fake = fake_rest[0]
    scenario = Scenario(
        seed=1,
        tool_calls=[
            ToolCallFault(
                after_caller_turn=1,
                name="end_call",
                args={"reason": "caller is done"},
                say_first="goodbye",
            )
        ],
    )
    stack = await make_stack(scenario, profiles_yaml(tools=["end_call"]))
    sid = "CA" + secrets.token_hex(16)
    rest_call = live_call(fake, sid)

    result, session, record = await run_call(stack, [say()], call_sid=sid, on_script_end="wait")

    # The server ended the call, and only after every mark it sent had come back played.
    assert result.ended_by == "server"
    assert result.marks_received
    assert [m.name for m in result.marks_echoed] == [m.name for m in result.marks_received]
    assert result.marks_echoed[-1].t <= result.ended
    assert last_stretch_ms(result) >= 0.9 * clip_duration("goodbye") * 1000
    # ... and hung the call up through the REST API.
    async with asyncio.timeout(5):
        await rest_call.ended.wait()
    assert rest_call.status == "completed"
    hangups = [r for r in fake.requests if r.path.endswith(f"/Calls/{sid}.json")]
    assert [r.form.get("Status") for r in hangups] == ["completed"]
    assert session.tool_calls[0]["name"] == "end_call"
    assert record.end_reason == "agent_hangup"
    kinds = [e.kind for e in record.events]
    assert "tool_call" in kinds and "hangup" in kinds
    hangup = next(e for e in record.events if e.kind == "hangup")
    assert hangup.data["reason"] == "caller is done" and hangup.data["goodbye_heard"] is True


async def test_transfer_dials_the_profile_number_after_the_line(
    make_stack: StackFactory, fake_rest: tuple[FakeTwilioState, str]
) -> None:
    fake = fake_rest[0]
    loop = asyncio.get_running_loop()
    updated_at: list[float] = []
    fake.on_update = lambda call, twiml: updated_at.append(loop.time())
    scenario = Scenario(
        seed=2,
        tool_calls=[
            ToolCallFault(
                after_caller_turn=1,
                name="transfer_call",
                args={"target": "manager"},
                say_first="one_moment",
            )
        ],
    )
    profile = profiles_yaml(
        tools=["end_call", "transfer_call"],
        transfer_targets={"manager": MANAGER, "support": "sip:help@pbx.example.com"},
    )
    stack = await make_stack(scenario, profile)
    sid = "CA" + secrets.token_hex(16)
    rest_call = live_call(fake, sid)

    result, session, record = await run_call(stack, [say()], call_sid=sid, on_script_end="wait")

    # Twilio was told to <Dial> the manager's number ...
    assert len(rest_call.twiml_history) == 1
    dial = ET.fromstring(rest_call.twiml_history[0]).find("Dial")
    assert dial is not None and dial.findtext("Number") == MANAGER
    # ... once the caller had heard "one moment, please" to the end.
    assert last_stretch_ms(result) >= 0.9 * clip_duration("one_moment") * 1000
    assert [m.name for m in result.marks_echoed] == [m.name for m in result.marks_received]
    assert updated_at and result.marks_echoed[-1].t <= updated_at[0]
    assert result.ended_by == "server"
    assert record.end_reason == "transferred"
    transfer = next(e for e in record.events if e.kind == "transfer")
    assert transfer.data == {
        "target": "manager",
        "number": MANAGER,
        "ok": True,
        "line_heard": True,
    }
    assert session.tool_calls[0]["args"] == {"target": "manager"}


async def test_send_dtmf_tones_reach_the_other_end(make_stack: StackFactory) -> None:
    scenario = Scenario(
        seed=3,
        replies={},  # the agent says nothing: only the tones are heard
        tool_calls=[ToolCallFault(after_caller_turn=1, name="send_dtmf", args={"digits": "12#"})],
    )
    stack = await make_stack(scenario, profiles_yaml(tools=["send_dtmf"]))

    result, session, record = await run_call(
        stack, [say(), WaitForAgentSilence(silence_ms=500, timeout=10)]
    )

    assert not result.script_errors
    assert detect_dtmf(result.heard_pcm()) == "12#"
    assert responses_by_name(session)["send_dtmf"] == {"result": "ok", "pressed": "12#"}
    sent = next(e for e in record.events if e.kind == "dtmf_sent")
    assert sent.data == {"digits": "12#", "heard": True}


# --------------------------------------------------------------------------- knowledge


async def test_lookup_answers_from_the_documents_folder(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "hours.md").write_text(
        "# Opening hours\n\n## Sundays\n\nOn Sundays we open at noon; the kitchen closes at ten.\n"
        "\n## Parking\n\nFree parking behind the restaurant after six in the evening.\n"
    )
    (docs / "menu.txt").write_text("Our pizza oven is wood-fired. Gluten-free bases on request.\n")
    scenario = Scenario(
        seed=4,
        tool_calls=[
            ToolCallFault(
                after_caller_turn=1,
                name="lookup",
                args={"query": "When do you open on Sundays?"},
                reply="one_moment",
            )
        ],
    )
    stack = await make_stack(scenario, profiles_yaml(tools=["lookup"], knowledge_dir=str(docs)))

    result, session, record = await run_call(
        stack, [say(), WaitForAgentSilence(silence_ms=500, timeout=10)]
    )

    answer = responses_by_name(session)["lookup"]
    best = answer["passages"][0]
    assert "noon" in best["text"]
    assert best["source"] == "hours.md › Sundays"
    result_event = next(e for e in record.events if e.kind == "tool_result")
    assert result_event.data["name"] == "lookup"
    assert result_event.data["result"]["passages"][0]["source"] == "hours.md › Sundays"
    assert not result.script_errors


# --------------------------------------------------------------------------- HTTP tools


class ToolServer:
    """A small business API on loopback for the HTTP tools, recording what it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], str | None]] = []
        self.headers: list[dict[str, str]] = []  # of /orders/status: the call context
        self.app = FastAPI()
        self.base_url = ""

        @self.app.post("/orders/status")
        async def order_status(request: Request) -> dict[str, Any]:
            body = await request.json()
            self.requests.append(("status", body, request.headers.get("authorization")))
            self.headers.append({**request.headers, "_body": (await request.body()).decode()})
            return {"order_id": body["order_id"], "status": "shipped", "eta": "Tuesday"}

        @self.app.post("/broken")
        async def broken(request: Request) -> JSONResponse:
            self.requests.append(("broken", await request.json(), None))
            return JSONResponse({"detail": "database is down"}, status_code=500)

        @self.app.post("/slow")
        async def slow(request: Request) -> dict[str, Any]:
            self.requests.append(("slow", await request.json(), None))
            await asyncio.sleep(SLOW_TOOL_S)
            return {"quote": 129.5, "currency": "EUR"}

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[ToolServer]:
        sock = free_socket()
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        )
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            yield self
        finally:
            server.should_exit = True
            server.force_exit = True  # a /slow request may still be sleeping
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
            sock.close()


@pytest.fixture
async def tool_server() -> AsyncIterator[ToolServer]:
    async with ToolServer().serve() as served:
        yield served


def http_tools(base_url: str) -> list[dict[str, Any]]:
    order = {
        "type": "object",
        "properties": {"order_id": {"type": "string", "description": "The order number"}},
        "required": ["order_id"],
    }
    return [
        {
            "name": "check_order",
            "description": "Look up the status of an order.",
            "url": f"{base_url}/orders/status",
            "headers": {"Authorization": "Bearer ${SHOP_TOKEN}"},
            "parameters": order,
        },
        {"name": "broken", "description": "Always fails.", "url": f"{base_url}/broken"},
        {
            "name": "sluggish",
            "description": "Too slow for its timeout.",
            "url": f"{base_url}/slow",
            "timeout_s": 0.5,
        },
        {
            "name": "catering_quote",
            "description": "Price a catering order (slow but within its timeout).",
            "url": f"{base_url}/slow",
            "timeout_s": 8,
        },
    ]


async def test_http_tools_result_http_error_and_timeout(
    make_stack: StackFactory, tool_server: ToolServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_TOKEN", "shop-secret-42")
    scenario = Scenario(
        seed=5,
        tool_calls=[
            ToolCallFault(1, "check_order", {"order_id": "A-1001"}, reply="one_moment"),
            ToolCallFault(2, "broken", {}, reply="one_moment"),
            ToolCallFault(3, "sluggish", {}, reply="one_moment"),
        ],
    )
    stack = await make_stack(
        scenario,
        profiles_yaml(http_tools=http_tools(tool_server.base_url)),
        http_tools_secret="tools-hmac-key-1",
    )
    wait = WaitForAgentSilence(silence_ms=400, timeout=10)

    result, session, record = await run_call(
        stack, [say(), wait, say(), wait, say(), wait], from_="+15550001111"
    )

    assert not result.script_errors
    # the backend learns which call and caller it serves, signed with HTTP_TOOLS_SECRET
    context = tool_server.headers[0]
    assert context["x-livecall-call-sid"] == result.call_sid
    assert context["x-livecall-caller"] == "+15550001111"
    assert context["x-livecall-profile"] == "agent"
    fields = ["v1", context["x-livecall-timestamp"], "POST", "/orders/status", result.call_sid]
    fields += ["+15550001111", "agent"]
    signed = "".join(f"{field}\n" for field in fields).encode() + context["_body"].encode()
    digest = hmac.new(b"tools-hmac-key-1", signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(context["x-livecall-signature"], f"sha256={digest}")
    got = responses_by_name(session)
    assert got["check_order"] == {
        "result": {"order_id": "A-1001", "status": "shipped", "eta": "Tuesday"}
    }
    assert tool_server.requests[0] == ("status", {"order_id": "A-1001"}, "Bearer shop-secret-42")
    assert got["broken"]["error"] == "HTTP 500 from broken"
    assert "database is down" in got["broken"]["body"]
    assert got["sluggish"] == {"error": "timeout after 0.5 s calling sluggish"}
    # the secret header value never reaches the model or the records
    assert "shop-secret-42" not in repr(session.tool_responses)
    assert "shop-secret-42" not in repr([e.data for e in record.events])
    durations = {
        e.data["name"]: e.data["duration_ms"] for e in record.events if e.kind == "tool_result"
    }
    assert durations["sluggish"] < 2000


async def test_slow_http_tool_does_not_stall_the_audio(
    make_stack: StackFactory, tool_server: ToolServer
) -> None:
    scenario = Scenario(
        seed=6,
        tool_calls=[
            ToolCallFault(
                1,
                "catering_quote",
                {"guests": 40},
                say_first="one_moment",
                reply="hours_reply",
            )
        ],
    )
    stack = await make_stack(scenario, profiles_yaml(http_tools=http_tools(tool_server.base_url)))
    gemini = stack.gemini
    assert gemini is not None
    sid = "CA" + secrets.token_hex(16)
    caller = asyncio.create_task(
        stack.caller([say()], call_sid=sid, on_script_end="wait", timeout=30).run()
    )

    session = await gemini.wait_for(
        lambda: gemini.sessions and gemini.sessions[-1].tool_calls and gemini.sessions[-1],
        timeout=15,
    )
    chunks_at_call = session.audio_chunks_received
    response = (await gemini.wait_for(lambda: session.tool_responses, timeout=15))[0]
    chunks_during = session.audio_chunks_received - chunks_at_call

    assert response.response == {"result": {"quote": 129.5, "currency": "EUR"}}
    assert response.latency is not None and response.latency >= SLOW_TOOL_S
    # 20 ms caller frames kept reaching the model the whole time the tool ran
    assert chunks_during >= 0.8 * response.latency * 50, (chunks_during, response.latency)
    stack.registry.active[sid].bridge.end("operator")
    result = await caller
    assert not result.protocol_errors and not result.script_errors
    # the agent's "one moment, please" (said before the call) reached the caller in full
    start, end = result.agent_stretches[0]
    assert (end - start) * 1000 >= 0.9 * clip_duration("one_moment") * 1000


async def test_a_withdrawn_tool_call_is_cancelled_and_never_answered(
    make_stack: StackFactory, tool_server: ToolServer
) -> None:
    # The caller speaks again while the slow tool runs: the model withdraws the call
    # (toolCallCancellation) and the bridge drops it instead of answering late.
    scenario = Scenario(seed=8, tool_calls=[ToolCallFault(1, "catering_quote", {"guests": 12})])
    stack = await make_stack(scenario, profiles_yaml(http_tools=http_tools(tool_server.base_url)))

    result, session, record = await run_call(
        stack, [say(), Pause(ms=1000), say(), WaitForAgentSilence(silence_ms=400, timeout=10)]
    )

    assert not result.script_errors
    [call] = session.tool_calls
    assert session.tool_cancellations == [call["id"]]
    assert tool_server.requests and tool_server.requests[0][0] == "slow"  # it had started
    assert session.tool_responses == []
    kinds = [(e.kind, e.data.get("id")) for e in record.events if e.kind.startswith("tool")]
    assert kinds == [("tool_call", call["id"]), ("tool_cancelled", call["id"])]


async def test_when_gemini_fails_a_profile_can_hand_the_caller_to_a_person(
    make_stack: StackFactory, fake_rest: tuple[FakeTwilioState, str]
) -> None:
    """on_failure: manager — every session dies, so instead of the apology Twilio dials."""
    fake = fake_rest[0]
    scenario = Scenario(seed=9, closes=[CloseFault(code=1011, at=0.3, max_fires=None)])
    profile = profiles_yaml(
        tools=["transfer_call"], transfer_targets={"manager": MANAGER}, on_failure="manager"
    )
    stack = await make_stack(scenario, profile)
    sid = "CA" + secrets.token_hex(16)
    rest_call = live_call(fake, sid)

    result, _session, record = await run_call(
        stack, [say(), Pause(15000)], call_sid=sid, on_script_end="wait"
    )

    assert result.ended_by == "server"
    assert len(rest_call.twiml_history) == 1
    twiml = ET.fromstring(rest_call.twiml_history[0])
    assert twiml.find("Dial") is not None and twiml.find("Dial").findtext("Number") == MANAGER
    assert "colleague" in (twiml.findtext("Say") or "")
    assert (record.status, record.end_reason) == ("failed", "gemini_failed_transferred")
