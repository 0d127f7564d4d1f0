"""Vonage's routes in the real app: the answer webhook (GET or POST, signed JWT) and its NCCO,
the event webhook, and `/ws/vonage`'s per-call token; forged, tampered, stale, replayed and
call-less requests are refused. Whole calls run in tests/test_carriers_e2e.py.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
import pytest
import structlog
import websockets
from websockets.asyncio.client import connect

from livecall.carriers.vonage import VonageSignature
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import HangUp, Pause
from livecall.sim.vonage import SimulatedVonageCaller
from livecall.telephony.stream_token import TOKEN_PARAMETER

SECRET = "vonage-route-test-secret-0123456789"
SIGNER = VonageSignature(SECRET, api_key="abcd1234")
FORGER = VonageSignature("not-the-signature-secret-0123456789")


def call_fields(uuid: str = "63f61863-4a51-4f6b-86e1-46edebcf9356", **more: str) -> dict[str, str]:
    fields = {
        "to": "447700900001",
        "from": "447700900000",
        "endpoint_type": "phone",
        "conversation_uuid": "CON-f972836a-550f-45fa-956c-12a2ab5b7d22",
        "uuid": uuid,
        "region_url": "https://api-eu-1.vonage.com",
    }
    fields.update(more)
    return {k: v for k, v in fields.items() if v}


async def vonage_stack(make_stack: Any, **settings: Any) -> LocalStack:
    stack: LocalStack = await make_stack(
        Scenario(seed=1), vonage_signature_secret=SECRET, **settings
    )
    return stack


async def get_answer(
    stack: LocalStack, fields: dict[str, str], signer: VonageSignature | None = SIGNER, **sign: Any
) -> httpx.Response:
    url = f"{stack.base_url}/vonage/answer?{urlencode(fields)}"
    headers = (
        {} if signer is None else {"Authorization": signer.sign(method="GET", url=url, **sign)}
    )
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.get(url, headers=headers)


async def post_json(
    stack: LocalStack, path: str, body: bytes, authorization: str | None
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.post(stack.base_url + path, content=body, headers=headers)


def signed(path: str, stack: LocalStack, body: bytes, signer: VonageSignature = SIGNER) -> str:
    return signer.sign(method="POST", url=stack.base_url + path, body=body)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rate", [16000, 8000])
async def test_a_signed_answer_webhook_gets_the_connect_ncco(make_stack: Any, rate: int) -> None:
    stack = await vonage_stack(make_stack, vonage_sample_rate=rate)
    fields = call_fields()
    resp = await get_answer(stack, fields)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    [connect_action] = orjson.loads(resp.content)
    [endpoint] = connect_action.pop("endpoint")
    assert connect_action == {"action": "connect", "eventUrl": [stack.base_url + "/vonage/event"]}
    headers = endpoint.pop("headers")
    ws_url = stack.base_url.replace("http://", "ws://") + "/ws/vonage"
    assert endpoint == {
        "type": "websocket",
        "uri": ws_url,
        "content-type": f"audio/l16;rate={rate}",
        "authorization": {"type": "vonage"},  # the upgrade comes signed by Vonage
    }
    assert headers.pop(TOKEN_PARAMETER)  # the per-call token, bound to the uuid
    assert headers == {
        "direction": "inbound",
        "profile": "default",
        "call_uuid": fields["uuid"],
        "conversation_uuid": fields["conversation_uuid"],
        "from": fields["from"],
        "to": fields["to"],
    }

    body = orjson.dumps(call_fields(uuid="8c3b7f0e-0000-4000-8000-000000000002"))
    posted = await post_json(stack, "/vonage/answer", body, signed("/vonage/answer", stack, body))
    assert posted.status_code == 200, posted.text
    assert orjson.loads(posted.content)[0]["endpoint"][0]["headers"]["call_uuid"].startswith("8c3b")


@pytest.mark.timeout(30)
async def test_forged_tampered_stale_replayed_or_callless_answers_are_refused(
    make_stack: Any,
) -> None:
    stack = await vonage_stack(make_stack)
    fields = call_fields()
    assert (await get_answer(stack, fields, signer=None)).status_code == 403  # unsigned
    assert (await get_answer(stack, fields, signer=FORGER)).status_code == 403  # forged JWT
    stale = time.time() - 3600
    assert (await get_answer(stack, fields, iat=stale)).status_code == 403  # expired iat
    # a genuine JWT over another request's query: the payload hash does not match
    url = f"{stack.base_url}/vonage/answer?{urlencode(call_fields(uuid='someone-else'))}"
    other = SIGNER.sign(method="GET", url=url)
    async with httpx.AsyncClient(trust_env=False) as client:
        moved = await client.get(
            f"{stack.base_url}/vonage/answer?{urlencode(fields)}",
            headers={"Authorization": other},
        )
    assert moved.status_code == 403
    body = orjson.dumps(fields)
    tampered = orjson.dumps(call_fields(to="19005550100"))
    auth = signed("/vonage/answer", stack, body)
    assert (await post_json(stack, "/vonage/answer", tampered, auth)).status_code == 403
    assert stack.registry.active == {}  # nothing forged reserved a call
    metrics = stack.app.state.livecall.metrics
    refused = metrics.registry.get_sample_value(
        "livecall_errors_total", {"kind": "vonage_signature"}
    )
    assert refused == 5

    assert (await post_json(stack, "/vonage/answer", body, auth)).status_code == 200
    replay = await post_json(stack, "/vonage/answer", body, auth)  # same jti again
    assert replay.status_code == 403
    missing = await get_answer(stack, call_fields(uuid=""))  # genuine, but names no call
    assert missing.status_code == 400 and "uuid" in missing.text


@pytest.mark.timeout(30)
async def test_the_event_webhook_logs_genuine_statuses_and_refuses_forged_ones(
    make_stack: Any,
) -> None:
    stack = await vonage_stack(make_stack)
    event = {
        "uuid": "63f61863-4a51-4f6b-86e1-46edebcf9356",
        "conversation_uuid": "CON-f972836a-550f-45fa-956c-12a2ab5b7d22",
        "status": "completed",
        "direction": "inbound",
        "timestamp": "2026-12-01T20:00:00.000Z",
    }
    body = orjson.dumps(event)
    with structlog.testing.capture_logs() as logs:
        ok = await post_json(stack, "/vonage/event", body, signed("/vonage/event", stack, body))
        forged = await post_json(
            stack, "/vonage/event", body, signed("/vonage/event", stack, body, FORGER)
        )
        odd = orjson.dumps({"status": "answered"})  # genuine, but names no leg
        unread = await post_json(stack, "/vonage/event", odd, signed("/vonage/event", stack, odd))
    assert (ok.status_code, forged.status_code, unread.status_code) == (200, 403, 200)
    statuses = [e for e in logs if e["event"] == "vonage.status"]
    assert [(e["call_sid"], e["status"]) for e in statuses] == [(event["uuid"], "completed")]
    assert [e["event"] for e in logs if e["event"].startswith("vonage.")] == [
        "vonage.status",
        "vonage.webhook_rejected",
        "vonage.status_unreadable",
    ]


@pytest.mark.timeout(30)
async def test_the_event_webhook_takes_signed_gets_too(make_stack: Any) -> None:
    """An application set to send its events by GET: the query string is the event, and the
    signature is checked as for the answer webhook's GET."""
    stack = await vonage_stack(make_stack)
    event = {
        "uuid": "63f61863-4a51-4f6b-86e1-46edebcf9356",
        "conversation_uuid": "CON-f972836a-550f-45fa-956c-12a2ab5b7d22",
        "status": "ringing",
    }
    url = f"{stack.base_url}/vonage/event?{urlencode(event)}"
    with structlog.testing.capture_logs() as logs:
        async with httpx.AsyncClient(trust_env=False) as client:
            ok = await client.get(
                url, headers={"Authorization": SIGNER.sign(method="GET", url=url)}
            )
            forged = await client.get(
                url, headers={"Authorization": FORGER.sign(method="GET", url=url)}
            )
            unsigned = await client.get(url)
    assert (ok.status_code, forged.status_code, unsigned.status_code) == (200, 403, 403)
    statuses = [e for e in logs if e["event"] == "vonage.status"]
    # a call never answered here: logged, not kept
    assert [(e["call_sid"], e["status"], e["kept"]) for e in statuses] == [
        (event["uuid"], "ringing", False)
    ]


@pytest.mark.timeout(30)
async def test_without_a_signature_secret_there_is_no_vonage_route(make_stack: Any) -> None:
    stack = await make_stack(Scenario(seed=1))
    assert (await get_answer(stack, call_fields())).status_code == 404
    body = orjson.dumps({"uuid": "x", "status": "completed"})
    assert (await post_json(stack, "/vonage/event", body, None)).status_code == 404


@pytest.mark.timeout(30)
async def test_a_stream_must_carry_the_token_of_its_own_call(make_stack: Any) -> None:
    stack = await vonage_stack(make_stack)
    resp = await get_answer(stack, call_fields())
    endpoint = orjson.loads(resp.content)[0]["endpoint"][0]
    for headers in (
        {**endpoint["headers"], "call_uuid": "another-call"},  # a token for another call
        {**endpoint["headers"], TOKEN_PARAMETER: "v1.forged"},
        {k: v for k, v in endpoint["headers"].items() if k != TOKEN_PARAMETER},
    ):
        signed_upgrade = {"Authorization": SIGNER.sign(method="GET", url=endpoint["uri"])}
        async with connect(
            endpoint["uri"], additional_headers=signed_upgrade, proxy=None, open_timeout=5
        ) as ws:
            hello = {"event": "websocket:connected", "content-type": endpoint["content-type"]}
            await ws.send(orjson.dumps({**hello, **headers}).decode())
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008
    assert stack.gemini.sessions == []


@pytest.mark.timeout(30)
async def test_the_websocket_legs_events_reach_the_event_route(make_stack: Any, call_over) -> None:
    stack = await vonage_stack(make_stack)
    caller = SimulatedVonageCaller(
        stack.base_url, signature_secret=SECRET, script=[Pause(300), HangUp()], seed=1
    )
    result = await caller.run()
    await call_over(stack)
    assert result.webhook_status == 200 and result.protocol_errors == []
    assert result.events_posted == ["answered", "completed"]
    assert result.event_statuses == [200, 200]
    assert result.ended_by == "caller" and result.close_code == 1000


@pytest.mark.timeout(30)
@pytest.mark.parametrize("busy_answer", ["say", "reject"])
async def test_a_full_house_answers_with_the_busy_ncco(make_stack: Any, busy_answer: str) -> None:
    stack = await vonage_stack(make_stack, max_concurrent_calls=1, busy_answer=busy_answer)
    first = await get_answer(stack, call_fields(uuid="call-one"))
    assert first.status_code == 200 and orjson.loads(first.content)[0]["action"] == "connect"
    busy = await get_answer(stack, call_fields(uuid="call-two"))
    assert busy.status_code == 200 and busy.headers["content-type"] == "application/json"
    message = stack.app.state.livecall.settings.busy_message
    expected = [] if busy_answer == "reject" else [{"action": "talk", "text": message}]
    assert orjson.loads(busy.content) == expected
