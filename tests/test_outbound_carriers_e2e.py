"""Outbound calls on Telnyx and Plivo end to end (issue #13): `POST /api/calls/outbound` with
`carrier` and `livecall call --carrier` dial through the carrier's fake REST API
(`LocalStack(carrier_apis=…)`: Telnyx's TeXML Calls API through the `telnyx` SDK, Plivo's Call
API); the fake "answers" as the carrier does, fetching the answer URL (livecall's own voice
webhook, signed by the carrier) and streaming the call to `/ws/<carrier>` with a simulated
callee. The agent greets, talks, and the call is recorded outbound with its profile. The
guards are the same as Twilio's (token, allowlist, caps), AMD is refused as Twilio-only, and
an outbound token opens only the call that claimed it.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import typer
from structlog.testing import capture_logs
from typer.testing import CliRunner

from livecall.outbound_cli import call_command
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from livecall.sim.twilio import CallResult, SimulatedCaller, WaitForAgentAudio
from livecall.store.models import Call
from outbound_support import (
    CALLEE,
    OUR_NUMBER,
    OUTREACH,
    assert_guards_refuse,
    assert_refused_when_not_set_up,
    outbound_stacks,
    post,
    write_profiles,
)

CALLS_TOKEN = "outbound-carriers-calls-token-51c2"
AUTH = {"Authorization": f"Bearer {CALLS_TOKEN}"}
CARRIERS = ["telnyx", "plivo"]


@pytest.fixture(params=CARRIERS)
def carrier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def profiles_file(tmp_path: Path) -> Path:
    return write_profiles(tmp_path)


@pytest.fixture
async def make_stack(
    tmp_path: Path, profiles_file: Path, carrier: str
) -> AsyncIterator[Callable[..., Any]]:
    """`await make_stack(**settings)`: the app with the carrier's fake REST API."""
    async with outbound_stacks(tmp_path, profiles_file, carrier, CALLS_TOKEN) as make:
        yield make


def dial_requests(stack: LocalStack, carrier: str) -> list[Any]:
    """The dial (create call) requests the carrier's fake received."""
    fake = stack.fakes[carrier]
    suffix = "/Calls" if carrier == "telnyx" else "/Call/"
    return [r for r in fake.requests if r.path.endswith(suffix) and r.method == "POST"]


def answer_url_of(stack: LocalStack, carrier: str) -> str:
    body = dial_requests(stack, carrier)[-1].body
    return str(body["Url"] if carrier == "telnyx" else body["answer_url"])


async def answered(stack: LocalStack, carrier: str, placed_id: str) -> tuple[str, CallResult]:
    """The call id the carrier answered the placed call as, and how the callee heard it."""
    fake = stack.fakes[carrier]
    async with asyncio.timeout(30):
        result: CallResult = await fake.answered[placed_id]
    call_id = placed_id if carrier == "telnyx" else fake.dialed[placed_id].uuid
    return call_id, result


async def record_of(stack: LocalStack, call_id: str) -> Call:
    assert stack.app is not None
    state = stack.app.state.livecall
    assert await state.registry.wait_idle(10)
    assert await state.store.flush()
    record = await state.store.repo.get_call(call_id)
    assert record is not None
    return record


async def test_outbound_call_is_placed_answered_and_recorded(
    make_stack: Callable[..., Any], carrier: str
) -> None:
    stack = await make_stack()
    fake = stack.fakes[carrier]
    fake.callee = {"script": [WaitForAgentAudio(min_heard_ms=300, timeout=10)], "timeout": 30}

    with capture_logs() as logged:
        response = await post(stack, AUTH, to=CALLEE, profile="outreach", carrier=carrier)
        assert response.status_code == 201, response.text
        call_id, result = await answered(stack, carrier, response.json()["call_sid"])

    # the callee's number appears in no log line, masked everywhere it is named
    events = {e["event"]: e for e in logged}
    assert events["outbound.placed"]["to"] == events[f"{carrier}.webhook"]["to"] == "+*******4321"
    assert not [e for e in logged if CALLEE[2:] in repr(e)]
    out = response.json()
    assert (out["carrier"], out["profile"], out["from"], out["to"]) == (
        carrier,
        "outreach",
        OUR_NUMBER,
        CALLEE,
    )
    assert out["machine_detection"] is False
    # the carrier fetches the answered call's document from livecall's own webhook
    url = urlsplit(answer_url_of(stack, carrier))
    webhook = "/telnyx/texml" if carrier == "telnyx" else "/plivo/answer"
    assert f"{url.scheme}://{url.netloc}{url.path}" == stack.base_url + webhook
    query = parse_qs(url.query)
    assert query["profile"] == ["outreach"]
    assert query["outbound"][0].startswith("v1.")
    sent = dial_requests(stack, carrier)[-1].body
    if carrier == "telnyx":
        assert (sent["To"], sent["From"]) == (CALLEE, OUR_NUMBER)
        assert sent["ApplicationSid"] == stack.settings.telnyx_application_sid
    else:  # Plivo writes numbers as digits
        assert (sent["to"], sent["from"]) == (CALLEE[1:], OUR_NUMBER[1:])

    assert not result.protocol_errors and not result.script_errors, result
    assert result.webhook_status == 200
    assert result.parameters  # the stream carried the call's parameters and token
    assert result.agent_stretches  # the callee heard the agent
    assert stack.gemini is not None
    session = stack.gemini.sessions[-1]
    greeting = session.client_contents[0]["turns"][0]["parts"][0]["text"]
    assert greeting.endswith(OUTREACH["greeting"])
    assert session.setup is not None
    assert session.setup["systemInstruction"]["parts"][0]["text"] == OUTREACH["system_prompt"]
    record = await record_of(stack, call_id)
    assert (record.direction, record.profile, record.to_number, record.from_number) == (
        "outbound",
        "outreach",
        CALLEE,
        OUR_NUMBER,
    )


async def test_guards_refuse_on_every_carrier(make_stack: Callable[..., Any], carrier: str) -> None:
    await assert_guards_refuse(make_stack, carrier, AUTH, dial_requests)


async def test_carrier_not_set_up_is_refused(make_stack: Callable[..., Any], carrier: str) -> None:
    missing = "telnyx_application_sid" if carrier == "telnyx" else "plivo_auth_id"
    await assert_refused_when_not_set_up(make_stack, carrier, missing, AUTH, dial_requests)


async def test_another_calls_outbound_token_is_refused(
    make_stack: Callable[..., Any], carrier: str
) -> None:
    stack = await make_stack()
    fake = stack.fakes[carrier]
    fake.callee = {"script": [WaitForAgentAudio(min_heard_ms=300, timeout=10)], "timeout": 30}
    placed = await post(stack, AUTH, to=CALLEE, profile="outreach", carrier=carrier)
    assert placed.status_code == 201, placed.text
    call_id, result = await answered(stack, carrier, placed.json()["call_sid"])
    assert result.agent_stretches and not result.protocol_errors
    sessions = len(stack.gemini.sessions) if stack.gemini else 0

    # the answer URL fetched for another call: its webhook is refused
    url = urlsplit(answer_url_of(stack, carrier))
    other = make_caller(stack, carrier, webhook_path=f"{url.path}?{url.query}")
    refused = await other.run()
    assert refused.webhook_status == 403
    assert refused.stream_url is None

    # the answered call's document (its stream token, bound to its call id) replayed by
    # another call, and that document carrying the outbound token itself: each stream is
    # closed before any Gemini session opens
    outbound_token = parse_qs(url.query)["outbound"][0]
    stream_token = stream_token_of(result.twiml, carrier)
    encode = (lambda t: t.encode().hex()) if carrier == "plivo" else (lambda t: t)
    assert encode(stream_token) in result.twiml and stream_token != outbound_token
    with_outbound = result.twiml.replace(encode(stream_token), encode(outbound_token))
    with capture_logs() as logged:
        for document in (result.twiml, with_outbound):
            replayed = await run_with_document(stack, carrier, document)
            assert replayed.stream_url is not None and "/ws/" + carrier in replayed.stream_url
            assert replayed.close_code == 1008
            assert not replayed.agent_stretches
            assert call_id != replayed.call_sid
    assert [e["reason"] for e in logged if e["event"] == f"{carrier}.stream_refused"] == [
        "stream token does not match this call and account",
        "outbound token",
    ]
    assert stack.gemini is not None and len(stack.gemini.sessions) == sessions


def stream_token_of(document: str, carrier: str) -> str:
    """The stream token an answer document carries (Plivo's hex-coded in extraHeaders)."""
    root = ET.fromstring(document)
    if carrier == "telnyx":
        for parameter in root.iter("Parameter"):
            if parameter.get("name") == "lc_token":
                return parameter.get("value", "")
        raise AssertionError("no lc_token parameter")
    stream = root.find("Stream")
    assert stream is not None
    headers = dict(h.split("=", 1) for h in stream.get("extraHeaders", "").split(","))
    return bytes.fromhex(headers["lctoken"]).decode()


async def run_with_document(stack: LocalStack, carrier: str, document: str) -> CallResult:
    """Another call of the carrier, answered with `document` as if livecall had sent it."""

    def serve(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=document, headers={"content-type": "application/xml"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(serve)) as http:
        return await make_caller(stack, carrier, http_client=http, webhook_path="/forged").run()


def make_caller(stack: LocalStack, carrier: str, **kwargs: Any) -> SimulatedCaller:
    """A simulated call of the carrier that is not the one placed (its own call id)."""
    kwargs |= {"timeout": 10}
    kwargs["extra_params"] = {"Direction": "outbound-api" if carrier == "telnyx" else "outbound"}
    script = [WaitForAgentAudio(min_heard_ms=300, timeout=3)]
    if carrier == "telnyx":
        return stack.telnyx_caller(script, from_=OUR_NUMBER, to=CALLEE, **kwargs)
    return stack.plivo_caller(script, from_=OUR_NUMBER[1:], to=CALLEE[1:], **kwargs)


async def test_livecall_call_places_a_carrier_call(
    make_stack: Callable[..., Any],
    carrier: str,
    profiles_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = await make_stack()
    assert stack.settings is not None
    fake = stack.fakes[carrier]
    fake.callee = {"script": [WaitForAgentAudio(min_heard_ms=300, timeout=10)], "timeout": 30}
    env = {
        "PUBLIC_URL": stack.base_url,
        "PROFILES_FILE": str(profiles_file),
        "OUTBOUND_ALLOWED_DESTINATIONS": "+1555",
        "STREAM_TOKEN_SECRET": TEST_AUTH_TOKEN,  # the server's (LocalStack's auth token)
    }
    names = (
        ("telnyx_api_key", "telnyx_account_sid", "telnyx_application_sid", "telnyx_api_base")
        if carrier == "telnyx"
        else ("plivo_auth_id", "plivo_auth_token", "plivo_api_base")
    )
    for name in (*names, "telnyx_public_key") if carrier == "telnyx" else names:
        value = getattr(stack.settings, name)
        env[name.upper()] = (
            value.get_secret_value() if hasattr(value, "get_secret_value") else value
        )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = typer.Typer()
    app.command("call")(call_command)
    app.command("noop")(lambda: None)  # two commands: `call` stays a subcommand
    runner = CliRunner()

    amd = await asyncio.to_thread(
        runner.invoke, app, ["call", CALLEE, "--carrier", carrier, "--amd"]
    )
    assert amd.exit_code == 2 and "Twilio-only" in amd.output
    done = await asyncio.to_thread(
        runner.invoke, app, ["call", CALLEE, "--profile", "outreach", "--carrier", carrier]
    )

    assert done.exit_code == 0, done.output
    placed_id = done.stdout.strip().splitlines()[-1]
    call_id, result = await answered(stack, carrier, placed_id)
    assert not result.protocol_errors and result.agent_stretches
    record = await record_of(stack, call_id)
    assert (record.direction, record.profile, record.to_number) == ("outbound", "outreach", CALLEE)
