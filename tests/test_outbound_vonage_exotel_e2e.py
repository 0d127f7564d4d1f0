"""Outbound calls on Vonage and Exotel end to end (issue #13): `POST /api/calls/outbound` and
`livecall call --carrier` dial through the carrier's fake REST API (`LocalStack(carrier_apis=
…)`). Vonage (`POST /v1/calls`, application JWT checked strictly) "answers" by requesting the
answer URL (livecall's `/vonage/answer`, a signed-webhook JWT) and running the NCCO with a
simulated callee; Exotel (Connect Voice AI) streams the answered call straight to the
`StreamUrl` (`/ws/exotel` carrying the outbound token). The agent greets, the callee hears it,
the call is recorded outbound with its profile; the guards are Twilio's, AMD is refused as
Twilio-only, and an outbound token opens only the call that claimed it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
import typer
from structlog.testing import capture_logs
from typer.testing import CliRunner

from livecall.outbound_cli import call_command
from livecall.sim.exotel import SimulatedExotelCaller
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from livecall.sim.twilio import CallResult, WaitForAgentAudio
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

CALLS_TOKEN = "outbound-vonage-exotel-calls-token-7e1"
AUTH = {"Authorization": f"Bearer {CALLS_TOKEN}"}
LISTEN = [WaitForAgentAudio(min_heard_ms=300, timeout=10)]


@pytest.fixture(params=["vonage", "exotel"])
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


def listen(stack: LocalStack, carrier: str, script: list[Any]) -> None:
    """What the callee of the next placed call does once it is answered."""
    fake = stack.fakes[carrier]
    if carrier == "vonage":
        fake.callee = {"script": script, "timeout": 30}
    else:
        fake.script = script
        fake.caller_options = {"timeout": 30.0}


def dials(stack: LocalStack, carrier: str) -> list[dict[str, Any]]:
    """The authorized create-call requests the carrier's fake received (their bodies)."""
    fake = stack.fakes[carrier]
    if carrier == "vonage":
        return [
            r.body
            for r in fake.requests
            if r.authorized and r.method == "POST" and r.path == "/v1/calls"
        ]
    return [{k: v[0] for k, v in form.items()} for form in fake.requests]


def dialled_url(stack: LocalStack, carrier: str) -> str:
    """The URL the dial handed the carrier: Vonage's answer URL, Exotel's stream URL."""
    body = dials(stack, carrier)[-1]
    return str(body["answer_url"][0] if carrier == "vonage" else body["StreamUrl"])


async def answered(stack: LocalStack, carrier: str, call_id: str) -> CallResult:
    """How the callee of the placed call heard it (the call id is the one the dial returned)."""
    fake = stack.fakes[carrier]
    async with asyncio.timeout(30):
        if carrier == "vonage":
            result: CallResult = await fake.answered[call_id]
        else:
            task = fake.calls[call_id].task
            assert task is not None
            result = await task
    return result


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
    listen(stack, carrier, LISTEN)

    with capture_logs() as logged:
        response = await post(stack, AUTH, to=CALLEE, profile="outreach", carrier=carrier)
        assert response.status_code == 201, response.text
        call_id = response.json()["call_sid"]
        result = await answered(stack, carrier, call_id)

    # the callee's number appears in no log line, masked everywhere it is named
    events = {e["event"]: e for e in logged}
    answered_event = "vonage.webhook" if carrier == "vonage" else "exotel.outbound_stream"
    assert events["outbound.placed"]["to"] == events[answered_event]["to"] == "+*******4321"
    assert not [e for e in logged if CALLEE[2:] in repr(e)]
    out = response.json()
    assert (out["carrier"], out["profile"], out["from"], out["to"]) == (
        carrier,
        "outreach",
        OUR_NUMBER,
        CALLEE,
    )
    url = urlsplit(dialled_url(stack, carrier))
    query = parse_qs(url.query)
    assert query["profile"] == ["outreach"]
    sent = dials(stack, carrier)[-1]
    if carrier == "vonage":
        # the answer URL is livecall's own webhook, fetched with GET; numbers as digits
        assert f"{url.scheme}://{url.netloc}{url.path}" == stack.base_url + "/vonage/answer"
        assert query["outbound"][0].startswith("v1.")
        assert sent["answer_method"] == "GET"
        assert (sent["to"], sent["from"]) == (
            [{"type": "phone", "number": CALLEE[1:]}],
            {"type": "phone", "number": OUR_NUMBER[1:]},
        )
        assert result.webhook_status == 200
    else:
        # Exotel streams straight to /ws/exotel: the URL carries the outbound token
        ws = stack.base_url.replace("http://", "ws://") + "/ws/exotel"
        assert f"{url.scheme}://{url.netloc}{url.path}" == ws
        assert query["lc_token"][0].startswith("v1.")
        assert query["direction"] == ["outbound-api"]
        assert query["sample-rate"] == ["16000"]  # EXOTEL_SAMPLE_RATE's default
        assert getattr(result, "sample_rate", None) == 16000
        assert (sent["From"], sent["CallerId"], sent["StreamType"]) == (
            CALLEE,
            OUR_NUMBER,
            "bidirectional",
        )

    assert not result.protocol_errors and not result.script_errors, result
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


async def test_guards_refuse_on_vonage_and_exotel(
    make_stack: Callable[..., Any], carrier: str
) -> None:
    await assert_guards_refuse(make_stack, carrier, AUTH, dials)


async def test_carrier_not_set_up_is_refused(make_stack: Callable[..., Any], carrier: str) -> None:
    missing = "vonage_private_key" if carrier == "vonage" else "exotel_api_token"
    await assert_refused_when_not_set_up(make_stack, carrier, missing, AUTH, dials)


@pytest.mark.parametrize("carrier", ["vonage"])
async def test_vonage_outbound_token_opens_only_its_call(
    make_stack: Callable[..., Any], carrier: str
) -> None:
    stack = await make_stack()
    listen(stack, carrier, LISTEN)
    placed = await post(stack, AUTH, to=CALLEE, profile="outreach", carrier=carrier)
    assert placed.status_code == 201, placed.text
    call_id = placed.json()["call_sid"]
    result = await answered(stack, carrier, call_id)
    assert result.agent_stretches and not result.protocol_errors
    sessions = len(stack.gemini.sessions) if stack.gemini else 0

    # the answer URL requested for another call (signed by Vonage): refused
    url = urlsplit(dialled_url(stack, carrier))
    other = stack.vonage_caller(
        [WaitForAgentAudio(min_heard_ms=300, timeout=3)],
        answer_path=f"{url.path}?{url.query}",
        from_=OUR_NUMBER[1:],
        to=CALLEE[1:],
        timeout=10,
    )
    refused = await other.run()
    assert refused.webhook_status == 403
    assert refused.stream_url is None

    # the answered call's NCCO carrying the outbound token itself in place of its stream
    # token (bound to its uuid): the stream is closed before any Gemini session opens
    outbound_token = parse_qs(url.query)["outbound"][0]
    ncco = orjson.loads(result.twiml)
    connect = next(a for a in ncco if a["action"] == "connect")
    stream_token = connect["endpoint"][0]["headers"]["lc_token"]
    assert stream_token != outbound_token
    with capture_logs() as logged:
        replayed = await run_with_ncco(stack, result.twiml.replace(stream_token, outbound_token))
    assert replayed.stream_url is not None and "/ws/vonage" in replayed.stream_url
    assert replayed.close_code == 1008
    assert not replayed.agent_stretches
    assert [e["reason"] for e in logged if e["event"] == "vonage.stream_refused"] == [
        "outbound token"
    ]
    assert stack.gemini is not None and len(stack.gemini.sessions) == sessions


async def run_with_ncco(stack: LocalStack, document: str) -> CallResult:
    """Another Vonage call, answered with `document` as if livecall had sent it."""

    def serve(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=document, headers={"content-type": "application/json"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(serve)) as http:
        caller = stack.vonage_caller(
            [WaitForAgentAudio(min_heard_ms=300, timeout=3)],
            http_client=http,
            answer_path="/forged",
            timeout=10,
        )
        return await caller.run()


@pytest.mark.parametrize("carrier", ["exotel"])
@pytest.mark.parametrize("rate", [8000, 24000])
async def test_exotel_outbound_streams_at_the_configured_rate(
    make_stack: Callable[..., Any], carrier: str, rate: int
) -> None:
    stack = await make_stack(exotel_sample_rate=rate)
    listen(stack, carrier, LISTEN)
    placed = await post(stack, AUTH, to=CALLEE, profile="outreach", carrier=carrier)
    assert placed.status_code == 201, placed.text
    result = await answered(stack, carrier, placed.json()["call_sid"])
    assert parse_qs(urlsplit(dialled_url(stack, carrier)).query)["sample-rate"] == [str(rate)]
    assert getattr(result, "sample_rate", None) == rate
    assert result.agent_stretches and not result.protocol_errors and not result.script_errors


@pytest.mark.parametrize("carrier", ["exotel"])
async def test_exotel_outbound_stream_url_opens_only_its_call(
    make_stack: Callable[..., Any], carrier: str
) -> None:
    stack = await make_stack()
    listen(stack, carrier, LISTEN)
    placed = await post(stack, AUTH, to=CALLEE, profile="outreach", carrier=carrier)
    assert placed.status_code == 201, placed.text
    result = await answered(stack, carrier, placed.json()["call_sid"])
    assert result.agent_stretches and not result.protocol_errors
    sessions = len(stack.gemini.sessions) if stack.gemini else 0

    # the same stream URL opened by another call, and with its token altered: closed unheard
    stream_url = dialled_url(stack, carrier)
    token = parse_qs(urlsplit(stream_url).query)["lc_token"][0]
    forged = stream_url.replace(token, token[:-2] + ("00" if token[-2:] != "00" else "11"))
    with capture_logs() as logged:
        for url in (stream_url, forged):
            replayed = await SimulatedExotelCaller(
                "http://unused.invalid",
                auth=None,
                stream_url=url,
                from_=OUR_NUMBER,
                to=CALLEE,
                script=[WaitForAgentAudio(min_heard_ms=300, timeout=3)],
                timeout=10,
            ).run()
            assert replayed.close_code == 1008
            assert not replayed.agent_stretches
    reasons = [e["reason"] for e in logged if e["event"] == "exotel.stream_refused"]
    assert reasons[0] == "outbound token already used by another call"
    assert len(reasons) == 2 and reasons[1] != reasons[0]
    assert stack.gemini is not None and len(stack.gemini.sessions) == sessions


async def test_livecall_call_places_a_vonage_or_exotel_call(
    make_stack: Callable[..., Any],
    carrier: str,
    profiles_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = await make_stack()
    assert stack.settings is not None
    listen(stack, carrier, LISTEN)
    env = {
        "PUBLIC_URL": stack.base_url,
        "PROFILES_FILE": str(profiles_file),
        "OUTBOUND_ALLOWED_DESTINATIONS": "+1555",
        "STREAM_TOKEN_SECRET": TEST_AUTH_TOKEN,  # the server's (LocalStack's auth token)
    }
    names = (
        (
            "vonage_signature_secret",
            "vonage_application_id",
            "vonage_private_key",
            "vonage_api_base",
        )
        if carrier == "vonage"
        else (
            "exotel_url_secret",
            "exotel_account_sid",
            "exotel_api_key",
            "exotel_api_token",
            "exotel_api_base",
        )
    )
    for name in names:
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
    call_id = done.stdout.strip().splitlines()[-1]
    result = await answered(stack, carrier, call_id)
    assert not result.protocol_errors and result.agent_stretches
    record = await record_of(stack, call_id)
    assert (record.direction, record.profile, record.to_number) == ("outbound", "outreach", CALLEE)
