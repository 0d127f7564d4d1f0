"""The agent's hang-up and transfer over each carrier's REST API, end to end (issue #13).

Each test rings the real app (uvicorn on loopback, webhook signatures enforced) from a
carrier's simulated edge, the fake Gemini Live calls `end_call` or `transfer_call`, and the
app drives the carrier's fake REST API (`LocalStack(carrier_apis=…)`: Twilio's Calls resource
through the `twilio` SDK, Telnyx's TeXML call update through the `telnyx` SDK, Plivo's Call API
whose transfer fetches its `<Dial>` from a single-use URL livecall serves, Vonage's call modify
with an application JWT, sent to the call's `region_url`). A fake that hangs up or transfers
ends the simulated caller's stream, as the carrier would, and says so in
`CallResult.carrier_action` / `transferred_to`. Twilio runs as the reference. Exotel has no
REST control: its hang-up is the stream's close and a transfer is refused with a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from livecall.server.carrier_route import EXOTEL_TRANSFER_REFUSAL
from livecall.server.carrier_status import STATUS_EVENT
from livecall.sim.exotel import SimulatedExotelCaller
from livecall.sim.gemini import Scenario, ToolCallFault
from livecall.sim.stack import CARRIER_APIS, LocalStack
from livecall.sim.twilio import CallResult, HangUp, WaitForAgentSilence
from livecall.sim.vonage_rest import REGION_PATH, generate_application_keys
from support import eventually, say

MANAGER = "+15551239999"
FAST = {"vad_silence_duration_ms": 300, "recording_enabled": False}


@dataclass(frozen=True)
class Line:
    """One carrier: how a caller rings it, what its fake was asked, how a forger signs."""

    name: str
    make: Callable[..., Any]  # (stack, script, **kw) -> a simulated caller known to the fake
    forged: dict[str, Any]  # settings whose credentials the fake refuses
    dialled: str  # how the carrier's transfer names MANAGER
    ok: tuple[int, int] = (200, 200)  # the fake's answer to a hang-up, to a transfer

    def rest(self, stack: LocalStack, call_id: str) -> list[tuple[str, int]]:
        """What the fake was asked about the call: ("hangup" | "transfer", HTTP status)."""
        fake = stack.fakes[self.name]
        if self.name == "twilio":
            return [
                ("hangup" if r.form.get("Status") else "transfer", r.status)
                for r in fake.requests
                if r.path.endswith(f"/Calls/{call_id}.json")
            ]
        if self.name == "telnyx":
            return [
                ("hangup" if r.body.get("Status") else "transfer", r.status)
                for r in fake.requests
                if r.path.endswith(f"/Calls/{call_id}")
            ]
        if self.name == "vonage":
            return [
                (str(r.body.get("action")), r.status)
                for r in fake.requests
                if r.path.endswith(f"/v1/calls/{call_id}")
            ]
        return [
            ("hangup" if r.method == "DELETE" else "transfer", r.status)
            for r in fake.requests
            if f"/Call/{call_id}/" in r.path
        ]


LINES = [
    Line(
        "twilio",
        lambda stack, script, **kw: stack.caller(script, **kw),
        {"twilio_account_sid": "AC" + "6" * 32},  # not the fake's account: 401 20003
        MANAGER,
    ),
    Line(
        "telnyx",
        lambda stack, script, **kw: stack.telnyx_caller(script, **kw),
        {"telnyx_api_key": "KEY-not-the-accounts-key-000"},
        MANAGER,
    ),
    Line(
        "plivo",
        lambda stack, script, **kw: stack.plivo_caller(script, **kw),
        {"plivo_auth_id": "MAFORGED000000000001"},
        MANAGER.removeprefix("+"),  # Plivo dials digits
        (204, 202),
    ),
    Line(
        "vonage",
        lambda stack, script, **kw: stack.vonage_caller(script, **kw),
        {"vonage_private_key": generate_application_keys()[0]},  # not the application's key
        MANAGER.removeprefix("+"),  # Vonage's phone endpoints take digits
        (204, 204),
    ),
]


@pytest.fixture(params=LINES, ids=[line.name for line in LINES])
def line(request: pytest.FixtureRequest) -> Line:
    return request.param


@pytest.fixture
async def make_stack(tmp_path: Path) -> Any:
    """`await make_stack(line, scenario, tools, **settings)`: livecall with the line's fake
    carrier API served and one default profile that may use `tools`."""
    stacks: list[LocalStack] = []

    async def make(line: Line, scenario: Scenario, tools: list[str], **settings: Any) -> Any:
        home = tmp_path / f"stack{len(stacks)}"
        home.mkdir()
        profile = {
            "name": "agent",
            "default": True,
            "system_prompt": "You answer the phone for Bella Vista.",
            "tools": tools,
            "transfer_targets": {"manager": MANAGER},
        }
        (home / "profiles.yaml").write_text(yaml.safe_dump({"profiles": [profile]}))
        stack = LocalStack(
            scenario=scenario,
            carrier_apis=(line.name,) if line.name in CARRIER_APIS else (),  # Exotel: none
            settings_overrides={
                "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
                "recordings_dir": home / "recordings",
                "spool_dir": home / "spool",
                "profiles_file": home / "profiles.yaml",
                **FAST,
                **settings,
            },
        )
        stacks.append(stack)
        await stack.start()
        return stack

    try:
        yield make
    finally:
        for stack in reversed(stacks):
            await stack.stop()


def tool(name: str, **args: Any) -> Scenario:
    """The model answers the caller's first words with its line, then calls `name`."""
    line = "goodbye" if name == "end_call" else "one_moment"
    fault = ToolCallFault(after_caller_turn=1, name=name, args=args, say_first=line)
    return Scenario(seed=13, greeting=None, pause_prob=0.0, tool_calls=[fault])


async def record_of(stack: LocalStack, result: CallResult, call_over: Any) -> Any:
    await call_over(stack)
    record = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
    assert record is not None
    return record


def event(record: Any, kind: str) -> dict[str, Any]:
    [found] = [e.data for e in record.events if e.kind == kind]
    return found


@pytest.mark.timeout(60)
async def test_end_call_hangs_up_over_rest_after_the_goodbye(
    line: Line, make_stack: Any, call_over: Any, audio: Any
) -> None:
    stack = await make_stack(line, tool("end_call", reason="done"), ["end_call"])
    caller = line.make(stack, [say("hours")], seed=1, on_script_end="wait", timeout=30)
    result = await caller.run()
    record = await record_of(stack, result, call_over)

    assert result.protocol_errors == [] and result.ended_by == "server", result.timeline
    assert audio.heard_share(result.heard_pcm(), "goodbye") >= 0.9  # heard, then hung up
    assert result.marks_echoed[-1].t <= result.ended
    assert record.end_reason == "agent_hangup"
    assert event(record, "hangup")["goodbye_heard"] is True
    # the carrier was told (after the stream closed: the REST call outlives the bridge)
    await eventually(lambda: _true(result.carrier_action == "hangup"))
    assert line.rest(stack, result.call_sid) == [("hangup", line.ok[0])]


@pytest.mark.timeout(60)
async def test_transfer_call_moves_the_caller_over_rest(
    line: Line, make_stack: Any, call_over: Any, audio: Any
) -> None:
    stack = await make_stack(line, tool("transfer_call", target="manager"), ["transfer_call"])
    caller = line.make(stack, [say("hours")], seed=2, on_script_end="wait", timeout=30)
    result = await caller.run()
    record = await record_of(stack, result, call_over)

    assert result.protocol_errors == [] and result.ended_by == "server", result.timeline
    assert audio.heard_share(result.heard_pcm(), "one_moment") >= 0.9
    assert record.end_reason == "transferred"
    transfer = event(record, "transfer")
    assert (transfer["number"], transfer["ok"], transfer["line_heard"]) == (MANAGER, True, True)
    await eventually(lambda: _true(result.transferred_to is not None))
    assert (result.carrier_action, result.transferred_to) == ("transfer", line.dialled)
    assert line.rest(stack, result.call_sid) == [("transfer", line.ok[1])]


@pytest.mark.timeout(60)
async def test_a_transfer_answered_after_the_stream_ended_is_in_the_record(
    make_stack: Any, call_over: Any
) -> None:
    """Twilio ends the stream as soon as it takes the new TwiML; its REST answer can come
    later. The call's record (and so its webhook and analysis) still holds the transfer."""
    twilio = LINES[0]
    stack = await make_stack(twilio, tool("transfer_call", target="manager"), ["transfer_call"])
    stack.fakes["twilio"].update_answer_delay_s = 1.0
    caller = twilio.make(stack, [say("hours")], seed=2, on_script_end="wait", timeout=30)
    result = await caller.run()
    record = await record_of(stack, result, call_over)
    assert record.end_reason == "transferred"
    assert event(record, "transfer")["ok"] is True


@pytest.mark.timeout(90)
async def test_a_rest_failure_is_told_to_the_model_and_the_call_goes_on(
    line: Line, make_stack: Any, call_over: Any
) -> None:
    stack = await make_stack(line, tool("transfer_call", target="manager"), ["transfer_call"])
    stack.fakes[line.name].fail_status = 500
    script = [
        say("hours"),
        WaitForAgentSilence(silence_ms=1500, timeout=20),  # the line, the failure, the reply
        say("yes"),
        WaitForAgentSilence(silence_ms=500, timeout=15),
        HangUp(),
    ]
    result = await line.make(stack, script, seed=3, timeout=60).run()
    record = await record_of(stack, result, call_over)

    assert result.ended_by == "caller" and result.carrier_action is None, result.timeline
    assert result.script_errors == [], result.script_errors
    [session] = stack.gemini.sessions
    [response] = [r.response for r in session.tool_responses if r.name == "transfer_call"]
    assert "failed" in response["error"], response
    assert len(session.input_transcripts) == 2  # the caller went on talking to the agent
    assert record.end_reason in ("caller_stop", "caller_closed")
    assert event(record, "transfer")["ok"] is False
    assert {status for _, status in line.rest(stack, result.call_sid)} == {500}


@pytest.mark.timeout(60)
async def test_credentials_the_carrier_refuses_change_nothing(
    line: Line, make_stack: Any, call_over: Any
) -> None:
    """The fakes check credentials strictly: with a forged key or account, every request is
    refused, so the accepted ones in the other tests prove livecall signs in properly."""
    stack = await make_stack(line, tool("end_call", reason="done"), ["end_call"], **line.forged)
    caller = line.make(stack, [say("hours")], seed=4, on_script_end="wait", timeout=30)
    result = await caller.run()
    record = await record_of(stack, result, call_over)

    assert record.end_reason == "agent_hangup"  # the stream still closed: the caller is gone
    requests = await eventually(lambda: _value(line.rest(stack, result.call_sid)))
    assert requests == [("hangup", 401)]
    assert result.carrier_action is None


async def test_plivo_transfer_document_is_signed_and_single_use(
    make_stack: Any, call_over: Any
) -> None:
    plivo = next(line for line in LINES if line.name == "plivo")
    stack = await make_stack(plivo, tool("transfer_call", target="manager"), ["transfer_call"])
    caller = plivo.make(stack, [say("hours")], seed=5, on_script_end="wait", timeout=30)
    result = await caller.run()
    await call_over(stack)
    fake = stack.fakes["plivo"]
    await fake.drain()

    [fetch] = fake.fetches
    assert fetch.status_code == 200 and fetch.url.startswith(stack.base_url + "/plivo/transfer/")
    assert f"<Number>{plivo.dialled}</Number>" in (fetch.xml or "")
    assert result.transferred_to == plivo.dialled
    call = fake.calls[result.call_sid]
    again = await fake.fetch_document(call, fetch.url)
    assert again.status_code == 404  # used once: gone
    unknown = await fake.fetch_document(call, f"{stack.base_url}/plivo/transfer/{'A' * 43}")
    unsigned = await fake.fetch_document(call, fetch.url, signed=False)
    assert (unknown.status_code, unsigned.status_code) == (404, 403)  # signed, or nothing


async def _true(value: bool) -> bool:
    return value


async def _value(value: Any) -> Any:
    return value


# ------------------------------------------------------------------------------ Vonage


def vonage_line() -> Line:
    return next(line for line in LINES if line.name == "vonage")


async def test_vonage_control_goes_to_the_calls_region_and_says_the_line_first(
    make_stack: Any, call_over: Any
) -> None:
    """The answer webhook's `region_url` (the fake's region path) receives the call's control,
    and the transfer's NCCO says the profile's line before it connects."""
    vonage = vonage_line()
    stack = await make_stack(vonage, tool("transfer_call", target="manager"), ["transfer_call"])
    caller = vonage.make(stack, [say("hours")], seed=6, on_script_end="wait", timeout=30)
    result = await caller.run()
    await call_over(stack)
    fake = stack.fakes["vonage"]

    [request] = [r for r in fake.requests if r.path.endswith(f"/v1/calls/{result.call_sid}")]
    assert (request.base, request.status) == (REGION_PATH, 204)
    ncco = request.body["destination"]["ncco"]
    assert ncco[-1] == {
        "action": "connect",
        "endpoint": [{"type": "phone", "number": vonage.dialled}],
        "from": caller.to,  # the number the caller rang: one of the account's
    }
    assert fake.calls[result.call_sid].transferred_to == vonage.dialled
    assert result.events_posted[-1] == "completed"  # no `disconnected`: the call moved on


async def test_vonage_control_finds_the_region_when_the_stream_reaches_another_server(
    make_stack: Any, call_over: Any, tmp_path: Path
) -> None:
    """The answer webhook at one server (or worker), the stream at another on the same
    database: what the webhook learned (region, line) reaches the stream's server, so the
    call's control still goes to its region and dials from the line the caller rang."""
    vonage = vonage_line()
    shared = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    scenario = tool("transfer_call", target="manager")
    streams = await make_stack(vonage, scenario, ["transfer_call"], database_url=shared)
    # its answers point the calls' media at the other server
    webhooks = await make_stack(
        vonage, scenario, ["transfer_call"], database_url=shared, public_url=streams.base_url
    )
    caller = streams.vonage_caller(
        [say("hours")], seed=6, on_script_end="wait", timeout=30, base_url=webhooks.base_url
    )
    result = await caller.run()
    await call_over(streams)
    assert streams.registry.active == {} and webhooks.registry.active == {}
    [request] = [
        r
        for r in streams.fakes["vonage"].requests
        if r.path.endswith(f"/v1/calls/{result.call_sid}")
    ]
    assert (request.base, request.status) == (REGION_PATH, 204)
    assert request.body["destination"]["ncco"][-1]["from"] == caller.to


async def test_vonage_keys_go_over_rest_not_as_tones(make_stack: Any, call_over: Any) -> None:
    """Vonage's stream carries no DTMF: the agent's keys go to `PUT …/dtmf`, in the region."""
    vonage = vonage_line()
    stack = await make_stack(vonage, tool("send_dtmf", digits="12#"), ["send_dtmf"])
    script = [say("hours"), WaitForAgentSilence(silence_ms=1500, timeout=20), HangUp()]
    result = await vonage.make(stack, script, seed=11, timeout=40).run()
    record = await record_of(stack, result, call_over)

    fake = stack.fakes["vonage"]
    assert fake.calls[result.call_sid].dtmf == ["12#"]
    [request] = [r for r in fake.requests if r.path.endswith("/dtmf")]
    assert (request.base, request.status) == (REGION_PATH, 200)
    assert event(record, "dtmf_sent") == {"digits": "12#", "over_rest": True}
    [session] = stack.gemini.sessions
    [response] = [r.response for r in session.tool_responses if r.name == "send_dtmf"]
    assert response == {"result": "ok", "pressed": "12#"}


async def test_vonage_application_id_the_fake_does_not_know_is_refused(
    make_stack: Any, call_over: Any
) -> None:
    vonage = vonage_line()
    stack = await make_stack(
        vonage, tool("end_call", reason="done"), ["end_call"], vonage_application_id="0" * 36
    )
    caller = vonage.make(stack, [say("hours")], seed=7, on_script_end="wait", timeout=30)
    result = await caller.run()
    await call_over(stack)

    requests = await eventually(lambda: _value(vonage.rest(stack, result.call_sid)))
    assert requests == [("hangup", 401)]
    [refused] = stack.fakes["vonage"].requests
    assert refused.auth_error == "wrong application_id"


async def test_vonage_leg_statuses_are_kept_as_call_events(make_stack: Any, call_over: Any) -> None:
    """The websocket leg's `answered` and `completed` (POSTed to the connect action's
    eventUrl, named by the leg's own uuid) land on the call's record, without numbers."""
    vonage = vonage_line()
    stack = await make_stack(vonage, Scenario(seed=8, greeting=None, pause_prob=0.0), [])
    script = [say("hours"), WaitForAgentSilence(silence_ms=500, timeout=15), HangUp()]
    result = await vonage.make(stack, script, seed=8, timeout=30).run()
    await call_over(stack)
    assert result.events_posted == ["answered", "completed"], result.events_posted
    assert result.event_statuses == [200, 200]
    repo = stack.app.state.livecall.store.repo

    async def statuses() -> list[dict[str, Any]]:
        await stack.app.state.livecall.store.flush()
        record = await repo.get_call(result.call_sid)
        found = [e.data for e in record.events if e.kind == STATUS_EVENT] if record else []
        return found if len(found) == 2 else []

    found = await eventually(statuses)
    assert found == [
        {"carrier": "vonage", "status": "answered"},
        {"carrier": "vonage", "status": "completed"},
    ]


# ------------------------------------------------------------------------------ Exotel

EXOTEL_SECRET = "exotel-test-url-secret-0123456789"


def exotel_line() -> Line:
    def make(stack: LocalStack, script: list[Any], **kw: Any) -> Any:
        return SimulatedExotelCaller(stack.base_url, url_secret=EXOTEL_SECRET, script=script, **kw)

    return Line("exotel", make, {}, "")


async def test_exotel_transfer_is_refused_with_the_reason(make_stack: Any, call_over: Any) -> None:
    """No REST on Exotel's Voicebot line: the model hears why, the call goes on."""
    exotel = exotel_line()
    stack = await make_stack(
        exotel,
        tool("transfer_call", target="manager"),
        ["transfer_call"],
        exotel_url_secret=EXOTEL_SECRET,
    )
    script = [
        say("hours"),
        WaitForAgentSilence(silence_ms=1500, timeout=20),
        say("yes"),
        WaitForAgentSilence(silence_ms=500, timeout=15),
        HangUp(),
    ]
    result = await exotel.make(stack, script, seed=9, timeout=60).run()
    record = await record_of(stack, result, call_over)

    assert result.ended_by == "caller", result.timeline
    [session] = stack.gemini.sessions
    [response] = [r.response for r in session.tool_responses if r.name == "transfer_call"]
    assert response["error"].startswith(EXOTEL_TRANSFER_REFUSAL), response
    assert len(session.input_transcripts) == 2  # the caller went on talking to the agent
    assert record.end_reason in ("caller_stop", "caller_closed")
    assert not [e for e in record.events if e.kind == "transfer"]


async def test_exotel_end_call_closes_the_stream_after_the_goodbye(
    make_stack: Any, call_over: Any, audio: Any
) -> None:
    exotel = exotel_line()
    stack = await make_stack(
        exotel, tool("end_call", reason="done"), ["end_call"], exotel_url_secret=EXOTEL_SECRET
    )
    caller = exotel.make(stack, [say("hours")], seed=10, on_script_end="wait", timeout=30)
    result = await caller.run()
    record = await record_of(stack, result, call_over)

    assert result.protocol_errors == [] and result.ended_by == "server", result.timeline
    assert audio.heard_share(result.heard_pcm(), "goodbye") >= 0.9  # heard, then closed
    assert result.marks_echoed[-1].t <= result.ended
    assert record.end_reason == "agent_hangup"
    assert event(record, "hangup")["goodbye_heard"] is True
