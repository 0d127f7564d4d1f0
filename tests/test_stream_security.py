"""Only Twilio gets in (issue 11): the attacks on Twilio's doors, each on the real server over
real sockets, with the fake Gemini counting the sessions they would have opened (and billed).

- a replayed upgrade signature (the same for every call) with a made-up CallSid;
- a `start` for a live call's CallSid without that call's token (it used to replace the call);
- CallSids Twilio never sends, another account's streams;
- no TWILIO_AUTH_TOKEN: `serve` refuses, the app keeps its doors shut (forged AMD verdicts too);
- X-Forwarded-Host from a peer that is not a trusted proxy;
- Twilio Webhook Rules (SharedKey, HMAC-SHA256).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from structlog.testing import capture_logs
from typer.testing import CliRunner

from livecall.cli import app as cli_app
from livecall.cli import insecure_problem
from livecall.settings import Settings
from livecall.sim.gemini import Scenario
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from livecall.sim.twilio import HangUp, Pause
from livecall.telephony.twilio import TwilioSignature
from support import eventually

ACCOUNT = "AC" + "5" * 32
OTHER_ACCOUNT = "AC" + "6" * 32
MADE_UP_CALL = "CA" + "0123456789abcdef" * 2


def model(seed: int) -> Scenario:
    return Scenario(seed=seed, greeting=None, pause_prob=0.0)


def stream_url(stack: LocalStack) -> str:
    return stack.base_url.replace("http://", "ws://") + "/ws/twilio"


def replayed_signature(stack: LocalStack) -> dict[str, str]:
    """The upgrade's `X-Twilio-Signature`, as seen once in any proxy log: valid forever."""
    return {"X-Twilio-Signature": TwilioSignature(TEST_AUTH_TOKEN).sign(stream_url(stack))}


def start_frame(call_sid: str, params: dict[str, str], account: str = ACCOUNT) -> str:
    sid = "MZ" + "7" * 32
    return orjson.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": sid,
            "start": {
                "accountSid": account,
                "streamSid": sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "customParameters": params,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    ).decode()


async def attacker_stream(stack: LocalStack, start: str) -> int | None:
    """Opens a stream with the replayed signature, sends `start`; the server's close code,
    or None when the server kept the stream (it became a call)."""
    async with websockets.connect(
        stream_url(stack), additional_headers=replayed_signature(stack), proxy=None
    ) as ws:
        await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        await ws.send(start)
        try:
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        except websockets.ConnectionClosed:
            return ws.close_code
        except TimeoutError:
            return None


# --------------------------------------------------------------------------- per-call tokens


@pytest.mark.timeout(40)
async def test_a_replayed_upgrade_signature_with_a_made_up_call_sid_opens_no_gemini_session(
    make_stack,
) -> None:
    stack = await make_stack(model(101), twilio_account_sid=ACCOUNT)
    forged_token = "v1.9999999999.-." + "A" * 43
    other_calls_token = stack.stream_token("CA" + "9" * 32, ACCOUNT)
    for params in ({}, {"lc_token": forged_token}, {"lc_token": other_calls_token}):
        with capture_logs() as logs:
            code = await attacker_stream(stack, start_frame(MADE_UP_CALL, params))
        assert code == 1008
        assert [e for e in logs if e["event"] == "twilio.stream_refused"], logs
    assert stack.gemini.sessions == []  # nothing opened, nothing billed
    assert stack.registry.active == {} and stack.registry.load == 0


@pytest.mark.timeout(60)
async def test_a_stranger_cannot_replace_a_live_call_but_twilio_can_reconnect_it(
    make_stack,
) -> None:
    stack = await make_stack(model(102), twilio_account_sid=ACCOUNT)
    caller = stack.caller([Pause(30_000)], account_sid=ACCOUNT, timeout=40)
    call = asyncio.create_task(caller.run())
    sid = caller.call_sid

    async def live() -> bool:
        entry = stack.registry.active.get(sid)
        return entry is not None and entry.bridge is not None

    await eventually(live)
    entry = stack.registry.active[sid]

    async def session_open() -> bool:
        return len(stack.gemini.sessions) == 1

    await eventually(session_open)
    # the live call's CallSid and the replayed signature, no token: the call is not replaced
    assert await attacker_stream(stack, start_frame(sid, {})) == 1008
    assert stack.registry.active.get(sid) is entry and entry.bridge.end_reason is None
    real_token = caller.result.parameters["lc_token"]
    attempts: list[tuple[dict[str, str], str]] = [
        ({"lc_token": "v1.9999999999.-." + "A" * 43}, ACCOUNT),  # a made-up token
        ({"lc_token": stack.stream_token("CA" + "9" * 32, ACCOUNT)}, ACCOUNT),  # another call's
        ({"lc_token": real_token}, OTHER_ACCOUNT),  # the right token, another account
    ]
    for params, account in attempts:
        assert await attacker_stream(stack, start_frame(sid, params, account)) == 1008
        assert stack.registry.active.get(sid) is entry  # still the same live call
        assert entry.bridge is not None and entry.bridge.end_reason is None
    assert len(stack.gemini.sessions) == 1
    assert not call.done()

    # Twilio reconnecting the stream presents the call's own token: that one may take over
    async with websockets.connect(
        stream_url(stack), additional_headers=replayed_signature(stack), proxy=None
    ) as ws:
        await ws.send(start_frame(sid, {"lc_token": real_token}))

        async def replaced() -> bool:
            now = stack.registry.active.get(sid)
            return now is not None and now is not entry

        await eventually(replaced)
        assert entry.bridge.end_reason == "replaced_by_new_stream"
    result = await call
    assert result.ended_by == "server"


@pytest.mark.timeout(40)
async def test_call_sids_twilio_never_sends_and_other_accounts_are_refused(make_stack) -> None:
    stack = await make_stack(model(103), twilio_account_sid=ACCOUNT)
    signer = TwilioSignature(TEST_AUTH_TOKEN)
    url = stack.base_url + "/twiml"
    async with httpx.AsyncClient(trust_env=False) as http:
        for call_sid, account in (
            ("CA123", ACCOUNT),
            ("CA" + "A" * 32, ACCOUNT),
            (MADE_UP_CALL, OTHER_ACCOUNT),
        ):
            form = {"CallSid": call_sid, "AccountSid": account, "From": "+1555", "To": "+1556"}
            resp = await http.post(
                url, data=form, headers={"X-Twilio-Signature": signer.sign(url, form)}
            )
            assert resp.status_code == 403 and "<Stream" not in resp.text, call_sid
    for call_sid, account in (("CA123", ACCOUNT), (MADE_UP_CALL, OTHER_ACCOUNT)):
        token = stack.stream_token(call_sid, account)  # even with a token minted for them
        assert (
            await attacker_stream(stack, start_frame(call_sid, {"lc_token": token}, account))
            == 1008
        )
    assert stack.gemini.sessions == [] and stack.registry.load == 0
    # control: the configured account's call goes through
    result = await stack.caller([Pause(300), HangUp()], account_sid=ACCOUNT, timeout=20).run()
    assert result.webhook_status == 200 and result.stream_sid is not None
    assert "lc_token" in result.parameters


# --------------------------------------------------------------------------- fail closed


def test_serve_refuses_to_start_without_an_auth_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    for name in ("TWILIO_AUTH_TOKEN", "LIVECALL_INSECURE_DEV", "LIVECALL_HOST", "HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "a-key")
    runner = CliRunner()
    refused = runner.invoke(cli_app, ["serve", "--port", "1"])
    assert refused.exit_code == 2
    assert "TWILIO_AUTH_TOKEN" in refused.output and "--insecure-dev" in refused.output
    public = runner.invoke(cli_app, ["serve", "--insecure-dev", "--host", "0.0.0.0", "--port", "1"])
    assert public.exit_code == 2 and "loopback" in public.output
    # the rule itself: a token, or the dev switch on loopback only
    assert insecure_problem(Settings(insecure_dev=True), "127.0.0.1") is None
    assert insecure_problem(Settings(insecure_dev=True), "::1") is None
    assert insecure_problem(Settings(insecure_dev=True), "192.168.1.5") is not None
    assert insecure_problem(Settings(twilio_auth_token="t"), "0.0.0.0") is None


@pytest.mark.timeout(40)
async def test_without_an_auth_token_twilios_doors_stay_shut(make_stack) -> None:
    """The app made without TWILIO_AUTH_TOKEN (uvicorn --factory, a forgotten setting) answers
    nothing unsigned: no TwiML, no stream, no forged answering-machine verdict."""
    stack = await make_stack(model(104), twilio_auth_token=None)
    form = {"CallSid": MADE_UP_CALL, "AccountSid": ACCOUNT, "AnsweredBy": "machine_end_beep"}
    async with httpx.AsyncClient(trust_env=False) as http:
        amd = await http.post(stack.base_url + "/twilio/amd", data=form)
        assert amd.status_code == 403
        twiml = await http.post(stack.base_url + "/twiml", data=form)
        assert twiml.status_code == 403 and "<Stream" not in twiml.text
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(stream_url(stack), proxy=None)
    assert refused.value.response.status_code == 403
    assert stack.app.state.livecall.answered_by == {}
    assert stack.gemini.sessions == [] and stack.registry.load == 0


@pytest.mark.timeout(40)
async def test_the_development_switch_lets_unsigned_calls_in_with_a_warning_each(
    make_stack,
) -> None:
    stack = await make_stack(model(105), twilio_auth_token=None, insecure_dev=True)
    with capture_logs() as logs:
        result = await stack.caller([Pause(300), HangUp()], sign=False, timeout=20).run()
    assert result.webhook_status == 200 and result.stream_sid is not None
    warned = [e for e in logs if e["event"] == "twilio.unsigned_accepted"]
    assert {e["door"] for e in warned} == {"twilio.webhook_rejected", "twilio.stream_unsigned"}
    # the stream token is still required: the dev switch only drops the signatures
    code = await attacker_stream(stack, start_frame(MADE_UP_CALL, {}))
    assert code == 1008


# --------------------------------------------------------------------------- signed URLs


@pytest.mark.timeout(30)
async def test_x_forwarded_host_is_believed_from_trusted_proxies_only(make_stack) -> None:
    signer = TwilioSignature(TEST_AUTH_TOKEN)
    form = {"CallSid": MADE_UP_CALL, "AccountSid": ACCOUNT, "From": "+1555", "To": "+1556"}
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    evil = {"X-Twilio-Signature": signer.sign("https://evil.example/twiml", form), **forwarded}

    untrusted = await make_stack(model(106), public_url=None)
    async with httpx.AsyncClient(trust_env=False) as http:
        with capture_logs() as logs:
            resp = await http.post(untrusted.base_url + "/twiml", data=form, headers=evil)
        assert resp.status_code == 403  # signed for the host the client named: not ours
        [rejected] = [e for e in logs if e["event"] == "twilio.webhook_rejected"]
        assert rejected["urls_tried"] == [untrusted.base_url + "/twiml"]
        assert evil["X-Twilio-Signature"] not in str(logs)  # the hint never shows a signature
        own = {"X-Twilio-Signature": signer.sign(untrusted.base_url + "/twiml", form)}
        resp = await http.post(
            untrusted.base_url + "/twiml", data=form, headers={**own, **forwarded}
        )
        assert resp.status_code == 200
        assert "evil.example" not in resp.text  # the stream URL is ours, not the header's
        assert untrusted.base_url.replace("http://", "ws://") + "/ws/twilio" in resp.text

    behind_proxy = await make_stack(
        model(107),
        public_url="https://calls.example.com",
        trusted_proxies=["127.0.0.1/32"],
        allowed_hosts=["alt.example.com"],  # a forwarded Host must be allowed like any other
    )
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "alt.example.com"}
    async with httpx.AsyncClient(trust_env=False) as http:
        for public in ("https://calls.example.com", "https://alt.example.com"):
            headers = {"X-Twilio-Signature": signer.sign(public + "/twiml", form), **proxied}
            resp = await http.post(behind_proxy.base_url + "/twiml", data=form, headers=headers)
            assert resp.status_code == 200, public
        elsewhere = {"X-Twilio-Signature": evil["X-Twilio-Signature"], **proxied}
        with capture_logs() as logs:
            resp = await http.post(behind_proxy.base_url + "/twiml", data=form, headers=elsewhere)
        assert resp.status_code == 403  # signed for a URL neither configured nor forwarded
        [rejected] = [e for e in logs if e["event"] == "twilio.webhook_rejected"]
        assert rejected["urls_tried"] == [
            "https://calls.example.com/twiml",
            "https://alt.example.com/twiml",
        ]


@pytest.mark.timeout(40)
async def test_webhook_rules_shared_key_signatures(make_stack) -> None:
    """Twilio Webhook Rules sign with a SharedKey and HMAC-SHA256 and say so in
    X-Twilio-Webhooks-Signature-Settings: accepted with that key, refused with any other."""
    stack = await make_stack(model(108), twilio_webhook_shared_key="rule-shared-key-0123")
    ok = await stack.caller([Pause(300), HangUp()], shared_key="rule-shared-key-0123").run()
    assert ok.webhook_status == 200 and ok.stream_sid is not None  # webhook and upgrade
    wrong = await stack.caller([HangUp()], shared_key="not-the-shared-key").run()
    assert wrong.webhook_status == 403 and wrong.stream_sid is None
    # the header with an auth-token signature: never checked against the auth token
    signer = TwilioSignature(TEST_AUTH_TOKEN)
    url = stack.base_url + "/twiml"
    form: dict[str, Any] = {"CallSid": MADE_UP_CALL, "AccountSid": ACCOUNT}
    headers = {
        "X-Twilio-Signature": signer.sign(url, form, algorithm="HMAC_SHA256"),
        "X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_x,algorithm=HMAC_SHA256",
    }
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.post(url, data=form, headers=headers)).status_code == 403
    no_key = await make_stack(model(109))
    with capture_logs() as logs:
        refused = await no_key.caller([HangUp()], shared_key="rule-shared-key-0123").run()
    assert refused.webhook_status == 403
    assert any("TWILIO_WEBHOOK_SHARED_KEY" in str(e.get("reason")) for e in logs), logs


# --------------------------------------------------------------------------- the softphone


@pytest.mark.timeout(40)
async def test_the_softphone_calls_with_its_session_token_and_not_without(make_stack) -> None:
    """What softphone.js does, over real sockets: sign in, get a call token for the session,
    open /ws/softphone and `start` with it (a Gemini session opens); without it, nothing."""
    import re

    stack = await make_stack(model(110), api_token="softphone-test-api-token")
    base = stack.base_url
    ws_url = base.replace("http://", "ws://") + "/ws/softphone"
    async with httpx.AsyncClient(base_url=base, trust_env=False) as http:
        signed_in = await http.post("/login", data={"token": "softphone-test-api-token"})
        assert signed_in.status_code == 303
        page = await http.get("/softphone")
        assert "softphone-test-api-token" not in page.text  # never the API token in the page
        csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
        assert csrf
        answer = await http.post("/softphone/token", headers={"X-CSRF-Token": csrf.group(1)})
        assert answer.status_code == 200
        call_sid, token = answer.json()["callSid"], answer.json()["token"]
        cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
    headers = {"Origin": base, "Cookie": cookie}

    def start(params: dict[str, str]) -> str:
        return start_frame(call_sid, {"profile": "", **params}, account="")

    async with websockets.connect(ws_url, additional_headers=headers, proxy=None) as ws:
        await ws.send(start({}))
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(10):
                await ws.recv()
    assert ws.close_code == 1008 and stack.gemini.sessions == []
    # a Twilio stream token does not open the softphone, nor a softphone token /ws/twilio
    twilio_token = stack.stream_token(call_sid, "")
    async with websockets.connect(ws_url, additional_headers=headers, proxy=None) as ws:
        await ws.send(start({"lc_token": twilio_token}))
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(10):
                await ws.recv()
    assert ws.close_code == 1008
    assert await attacker_stream(stack, start_frame(call_sid, {"lc_token": token}, "")) == 1008
    assert stack.gemini.sessions == []

    async with websockets.connect(ws_url, additional_headers=headers, proxy=None) as ws:
        await ws.send(start({"lc_token": token}))

        async def session_open() -> bool:
            return len(stack.gemini.sessions) == 1

        await eventually(session_open)
        assert call_sid in stack.registry.active


@pytest.mark.timeout(60)
async def test_serve_insecure_dev_binds_loopback_and_answers_unsigned_calls_there(
    tmp_path: Path,
) -> None:
    """`livecall serve --insecure-dev` without TWILIO_AUTH_TOKEN: up on 127.0.0.1 only."""
    import os
    import signal
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TWILIO_", "LIVECALL_", "GEMINI_", "GOOGLE_")) and k != "HOST"
    }
    env.update(
        GEMINI_API_KEY="placeholder-key",
        PORT=str(port),
        LOG_FORMAT="json",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}",
        RECORDINGS_DIR=str(tmp_path / "rec"),
        SPOOL_DIR=str(tmp_path / "spool"),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "livecall.cli",
        "serve",
        "--insecure-dev",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(trust_env=False) as http:

            async def healthy() -> bool:
                assert proc.returncode is None, "serve exited"
                try:
                    return (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(healthy, within=30)
            form = {"CallSid": MADE_UP_CALL, "AccountSid": ACCOUNT}
            resp = await http.post(f"http://127.0.0.1:{port}/twiml", data=form)
            assert resp.status_code == 200 and "lc_token" in resp.text  # unsigned: dev only
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    log = err.decode()
    assert f"127.0.0.1:{port}" in log and "0.0.0.0" not in log
    assert "twilio.unsigned_accepted" in log
