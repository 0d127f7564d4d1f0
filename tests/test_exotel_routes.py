"""Exotel's doors on the real server: the Voicebot applet's URL endpoint and `/ws/exotel`.

Exotel signs nothing, so the applet URL's secret (Basic credentials or `?key=`) is all that
lets a request in, and the stream URL's per-call token all that lets a stream in. Each
attack goes through uvicorn over real sockets with the simulated Exotel edge, and the fake
Gemini counts the sessions it would have opened (and billed).
"""

from __future__ import annotations

import base64
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
from pydantic import ValidationError

from livecall.carriers.exotel.answer import voicebot_stream_url
from livecall.server.carrier_route import stream_tokens_for
from livecall.settings import Settings
from livecall.sim.exotel import SimulatedExotelCaller
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import HangUp, Pause
from livecall.telephony.stream_token import TOKEN_PARAMETER

SECRET = "exotel-test-url-secret-0123456789"
SETTINGS = {"exotel_url_secret": SECRET}
CALL = "b6cf" + "1" * 28
OTHER_CALL = "b6cf" + "2" * 28


def model(seed: int) -> Scenario:
    return Scenario(seed=seed, greeting=None, pause_prob=0.0)


def voicebot_url(stack: LocalStack) -> str:
    return stack.base_url + "/exotel/voicebot"


def query(call_sid: str = CALL, **extra: str) -> dict[str, str]:
    return {
        "CallSid": call_sid,
        "CallFrom": "+919876543210",
        "CallTo": "+918047491899",
        "Direction": "incoming",
        **extra,
    }


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def stream_url_for(stack: LocalStack, call_sid: str = CALL) -> str:
    """What the applet endpoint answers a genuine request for `call_sid` with."""
    async with httpx.AsyncClient(trust_env=False) as client:
        resp = await client.get(
            voicebot_url(stack), params=query(call_sid), headers=basic("exotel", SECRET)
        )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    url = orjson.loads(resp.content)["url"]
    assert isinstance(url, str)
    return url


def nothing_started(stack: LocalStack) -> None:
    assert stack.gemini.sessions == []
    assert stack.registry.active == {}


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({}, {}),  # no secret at all
        (basic("exotel", "not-the-exotel-url-secret"), {}),
        (basic("someone", SECRET), {}),  # the right secret for another user
        ({"Authorization": f"Bearer {SECRET}"}, {}),
        ({}, {"key": "not-the-exotel-url-secret"}),
        ({}, {"key": SECRET[:-1]}),
        (basic("exotel", "wrong-secret-0123456789"), {"key": SECRET}),  # a bad header stays bad
    ],
    ids=["none", "wrong", "other-user", "bearer", "wrong-key", "short-key", "bad-basic-good-key"],
)
@pytest.mark.timeout(30)
async def test_the_applet_endpoint_refuses_without_its_secret(
    make_stack, headers: dict[str, str], params: dict[str, str]
) -> None:
    stack = await make_stack(model(1), **SETTINGS)
    async with httpx.AsyncClient(trust_env=False) as client:
        resp = await client.get(voicebot_url(stack), params=query(**params), headers=headers)
        head = await client.head(voicebot_url(stack), params=query(**params), headers=headers)
    assert (resp.status_code, head.status_code) == (403, 403)
    assert "url" not in resp.text
    assert stack.registry.load == 0  # nothing reserved
    nothing_started(stack)


@pytest.mark.timeout(30)
async def test_the_applet_endpoint_answers_a_stream_url_for_the_call(make_stack) -> None:
    stack = await make_stack(model(1), **SETTINGS)
    async with httpx.AsyncClient(trust_env=False) as client:
        head = await client.head(
            voicebot_url(stack), params=query(), headers=basic("exotel", SECRET)
        )
        assert head.status_code == 200 and stack.registry.load == 0  # a probe admits nothing
        by_key = await client.get(voicebot_url(stack), params=query(key=SECRET))
        no_call = await client.get(voicebot_url(stack), params={"key": SECRET})
    assert no_call.status_code == 400
    assert by_key.status_code == 200
    url = orjson.loads(by_key.content)["url"]
    parts = urlsplit(url)
    assert (parts.scheme, parts.path) == ("ws", "/ws/exotel")
    params = parse_qs(parts.query)
    # at most 3 custom parameters: the numbers come back in Exotel's own start
    assert sorted(params) == sorted(["sample-rate", "profile", TOKEN_PARAMETER])
    assert params["sample-rate"] == ["16000"] and params["profile"] == ["default"]
    assert SECRET not in url
    assert stack.registry.load == 1  # the call's place is held for its stream


@pytest.mark.timeout(30)
async def test_a_call_id_the_store_cannot_keep_is_refused_at_the_webhook(make_stack) -> None:
    stack = await make_stack(model(1), **SETTINGS)
    async with httpx.AsyncClient(trust_env=False) as client:
        for bad in ("b6cf" + "1" * 61, "b6cf 1", "b6cf/../1"):
            resp = await client.get(
                voicebot_url(stack), params=query(bad), headers=basic("exotel", SECRET)
            )
            assert resp.status_code == 400, bad
    nothing_started(stack)
    assert stack.registry.load == 0


@pytest.mark.timeout(30)
async def test_a_stream_token_opens_no_other_call(make_stack) -> None:
    stack = await make_stack(model(2), **SETTINGS)
    url = await stream_url_for(stack, CALL)
    caller = SimulatedExotelCaller(
        "http://unused.invalid",
        auth=None,
        stream_url=url,
        call_sid=OTHER_CALL,  # the token was minted for CALL
        script=[Pause(2000), HangUp()],
        timeout=15,
    )
    result = await caller.run()
    assert result.ended_by == "server" and result.close_code == 1008, result.timeline
    nothing_started(stack)


@pytest.mark.timeout(30)
async def test_an_expired_or_missing_stream_token_is_refused(make_stack) -> None:
    stack = await make_stack(model(3), **SETTINGS)
    tokens = stream_tokens_for(stack.app.state.livecall.stream_secret, "exotel")
    stale = tokens.for_call(CALL, "", time.time() - tokens.ttl_s - 5)
    ws = stack.base_url.replace("http://", "ws://") + "/ws/exotel"
    expired = voicebot_stream_url(ws, {TOKEN_PARAMETER: stale, "profile": "default"})
    script: list[Any] = [Pause(2000), HangUp()]
    common: dict[str, Any] = {"auth": None, "call_sid": CALL, "script": script, "timeout": 15}
    result = await SimulatedExotelCaller(
        "http://unused.invalid", stream_url=expired, **common
    ).run()
    assert result.ended_by == "server" and result.close_code == 1008, result.timeline

    bare = voicebot_stream_url(ws, {"profile": "default"})  # no token in the URL nor start
    result = await SimulatedExotelCaller("http://unused.invalid", stream_url=bare, **common).run()
    assert result.ended_by == "server" and result.close_code == 1008, result.timeline
    nothing_started(stack)


@pytest.mark.parametrize("why", ["full", "draining"])
@pytest.mark.timeout(30)
async def test_a_call_turned_away_gets_a_stream_closed_at_start(make_stack, why: str) -> None:
    stack = await make_stack(model(4), **SETTINGS, max_concurrent_calls=1)
    if why == "full":
        assert stack.registry.reserve("somebody-else")
    else:
        stack.registry.draining = True
    caller = SimulatedExotelCaller(
        stack.base_url, url_secret=SECRET, call_sid=CALL, script=[Pause(3000), HangUp()]
    )
    result = await caller.run()
    assert result.webhook_status == 200 and result.protocol_errors == []
    assert TOKEN_PARAMETER not in result.parameters  # no token: the stream can carry no call
    assert result.ended_by == "server" and result.close_code == 1000
    assert "next_applet" in [e.kind for e in result.timeline]  # the flow decides what follows
    assert stack.gemini.sessions == [] and CALL not in stack.registry.active


@pytest.mark.timeout(30)
async def test_a_busy_mark_on_a_good_stream_url_only_turns_it_away(make_stack) -> None:
    stack = await make_stack(model(5), **SETTINGS)
    url = await stream_url_for(stack, CALL) + "&busy=1"
    caller = SimulatedExotelCaller(
        "http://unused.invalid", auth=None, stream_url=url, call_sid=CALL, script=[Pause(2000)]
    )
    result = await caller.run()
    assert result.ended_by == "server" and result.close_code == 1000
    nothing_started(stack)


def test_the_exotel_doors_are_shut_without_a_long_secret() -> None:
    assert Settings().exotel_url_secret is None
    with pytest.raises(ValidationError, match="16 characters"):
        Settings(exotel_url_secret="short")
