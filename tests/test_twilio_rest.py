"""The real `twilio` client against the REST fake: outbound calls, transfers, hang-ups, AMD."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from urllib.parse import parse_qsl

import httpx
import pytest
from fastapi import FastAPI, Request
from twilio.request_validator import RequestValidator

from livecall.sim.twilio_rest import FakeCall, build_fake_twilio_rest, serve_fake_twilio_rest
from livecall.telephony.twilio_rest import TwilioCallControl, TwilioCallError

ACCOUNT = "AC" + "1" * 32
TOKEN = "fake-auth-token-5f2c9e"
STREAM = "wss://agent.example.com/ws/twilio"


@pytest.fixture
async def fake():
    async with serve_fake_twilio_rest(ACCOUNT, TOKEN) as (state, url):
        yield state, TwilioCallControl(ACCOUNT, TOKEN, base_url=url)


async def test_create_outbound_streams_to_livecall_with_parameters(fake) -> None:
    state, control = fake
    created: asyncio.Queue[FakeCall] = asyncio.Queue()
    state.on_create = created.put

    sid = await control.create_outbound(
        "+15551230001", "+15550000000", STREAM, {"profile": "sales", "lead": "42"}
    )

    call = await asyncio.wait_for(created.get(), 5)
    assert call.sid == sid and sid.startswith("CA") and len(sid) == 34
    assert (call.to, call.from_) == ("+15551230001", "+15550000000")
    stream = ET.fromstring(call.twiml or "").find("Connect/Stream")
    assert stream is not None and stream.get("url") == STREAM
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"profile": "sales", "lead": "42"}
    create = state.requests[0]
    assert create.path == f"/2010-04-01/Accounts/{ACCOUNT}/Calls.json" and create.status == 201
    assert "MachineDetection" not in create.form
    assert call.status_history == ["queued", "ringing", "in-progress"]
    assert await control.status(sid) == "in-progress"


async def test_transfer_redirects_with_dial_twiml(fake) -> None:
    state, control = fake
    updated: asyncio.Queue[tuple[FakeCall, str | None]] = asyncio.Queue()
    state.on_update = lambda call, twiml: updated.put_nowait((call, twiml))
    sid = await control.create_outbound("+15551230001", "+15550000000", STREAM, {})

    assert await control.transfer(sid, "+15551239999", say="Connecting you now.") is True
    call, twiml = await asyncio.wait_for(updated.get(), 5)
    root = ET.fromstring(twiml or "")
    assert root.findtext("Say") == "Connecting you now."
    assert root.findtext("Dial/Number") == "+15551239999"
    assert call.status == "in-progress"

    assert await control.transfer(sid, "sip:support@pbx.example.com") is True
    _, twiml = await asyncio.wait_for(updated.get(), 5)
    assert ET.fromstring(twiml or "").findtext("Dial/Sip") == "sip:support@pbx.example.com"
    assert len(state.call(sid).twiml_history) == 3  # the original stream TwiML + 2 redirects


async def test_hangup_then_hangup_again_is_treated_as_done(fake) -> None:
    state, control = fake
    sid = await control.create_outbound("+15551230001", "+15550000000", STREAM, {})

    assert await control.hangup(sid) is True
    call = state.call(sid)
    await asyncio.wait_for(call.ended.wait(), 5)
    assert call.status == "completed"

    assert await control.hangup(sid) is False  # 404 / 20404: already over, not an error
    assert await control.transfer(sid, "+15551239999") is False
    assert state.requests[-1].status == 404
    assert await control.status(sid) == "completed"


async def test_callee_hangup_makes_later_hangup_a_no_op(fake) -> None:
    state, control = fake
    sid = await control.create_outbound("+15551230001", "+15550000000", STREAM, {})
    state.end_call(sid)
    assert await control.hangup(sid) is False


async def test_status_of_unknown_call_is_none(fake) -> None:
    _, control = fake
    assert await control.status("CA" + "0" * 32) is None


async def test_wrong_auth_is_an_error_without_the_token(fake) -> None:
    state, control = fake
    bad = TwilioCallControl(ACCOUNT, "wrong-token-77aa", base_url=control.base_url)
    with pytest.raises(TwilioCallError) as info:
        await bad.create_outbound("+15551230001", "+15550000000", STREAM, {})
    assert info.value.status == 401 and info.value.code == 20003
    assert "wrong-token-77aa" not in str(info.value) and "wrong-token-77aa" not in repr(bad)
    assert state.calls == {}
    assert state.requests[-1].authorized is False


async def test_fake_answers_in_twilio_shapes() -> None:
    app, state = build_fake_twilio_rest(ACCOUNT, TOKEN)
    transport = httpx.ASGITransport(app=app)
    base = f"http://twilio.test/2010-04-01/Accounts/{ACCOUNT}"
    async with httpx.AsyncClient(transport=transport, auth=(ACCOUNT, TOKEN)) as http:
        missing = await http.post(f"{base}/Calls.json", data={"To": "+15551230001"})
        assert missing.status_code == 400 and missing.json()["code"] == 21213

        made = await http.post(
            f"{base}/Calls.json",
            data={"To": "+15551230001", "From": "+15550000000", "Url": "https://x.test/t"},
        )
        assert made.status_code == 201
        body = made.json()
        assert body["status"] == "queued" and body["direction"] == "outbound-api"
        assert body["uri"] == f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{body['sid']}.json"
        assert body["date_created"].endswith("+0000") and body["from"] == "+15550000000"

        gone = await http.post(f"{base}/Calls/CA{'9' * 32}.json", data={"Status": "completed"})
        assert gone.status_code == 404
        error = gone.json()
        assert error["code"] == 20404 and error["status"] == 404
        assert error["more_info"] == "https://www.twilio.com/docs/errors/20404"
        assert error["message"].startswith("The requested resource /2010-04-01/Accounts/")

        hung = await http.post(f"{base}/Calls/{body['sid']}.json", data={"Status": "completed"})
        assert hung.json()["status"] == "completed" and hung.json()["duration"] == "0"
        again = await http.post(f"{base}/Calls/{body['sid']}.json", data={"Status": "completed"})
        assert again.status_code == 404 and again.json()["code"] == 20404

        unauth = await http.get(f"{base}/Calls/{body['sid']}.json", auth=(ACCOUNT, "nope"))
        assert unauth.status_code == 401 and unauth.json()["code"] == 20003
    await state.aclose()


def _receiver() -> tuple[FastAPI, asyncio.Queue[tuple[str, dict[str, str], bool]]]:
    """A stand-in for livecall's webhook endpoints: records what Twilio posts and checks it."""
    app = FastAPI()
    got: asyncio.Queue[tuple[str, dict[str, str], bool]] = asyncio.Queue()
    validator = RequestValidator(TOKEN)

    @app.post("/twilio/{kind}")
    async def hook(kind: str, request: Request) -> dict[str, bool]:
        form = dict(parse_qsl((await request.body()).decode()))
        signed = validator.validate(
            str(request.url), form, request.headers.get("x-twilio-signature", "")
        )
        got.put_nowait((kind, form, signed))
        return {"ok": True}

    return app, got


async def test_answering_machine_detection_posts_answered_by(fake) -> None:
    state, control = fake
    receiver, got = _receiver()
    state.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver))
    sid = await control.create_outbound(
        "+15551230001",
        "+15550000000",
        STREAM,
        {"profile": "sales"},
        machine_detection=True,
        amd_callback="http://livecall.test/twilio/amd",
        status_callback="http://livecall.test/twilio/status",
    )
    form = state.requests[-1].form
    assert form["MachineDetection"] == "DetectMessageEnd" and form["AsyncAmd"] == "true"
    assert form["AsyncAmdStatusCallback"] == "http://livecall.test/twilio/amd"

    callback = await state.mark_answered_by(sid, "machine_end_beep")
    assert callback is not None and callback.status_code == 200
    kind, posted, signed = await asyncio.wait_for(got.get(), 5)
    assert kind == "amd" and signed
    assert posted["AnsweredBy"] == "machine_end_beep" and posted["CallSid"] == sid

    await control.hangup(sid)
    kind, posted, signed = await asyncio.wait_for(got.get(), 5)
    assert (kind, posted["CallStatus"], signed) == ("status", "completed", True)


async def test_machine_detection_needs_a_callback(fake) -> None:
    _, control = fake
    with pytest.raises(ValueError, match="amd_callback"):
        await control.create_outbound(
            "+15551230001", "+15550000000", STREAM, {}, machine_detection=True
        )


async def test_stream_url_with_query_is_refused(fake) -> None:
    _, control = fake
    with pytest.raises(ValueError, match="query"):
        await control.create_outbound("+15551230001", "+15550000000", STREAM + "?profile=x", {})
