"""The Vonage NCCO replay gap, closed at the WebSocket handshake, through the real server.

Our NCCO asks Vonage to sign the stream's upgrade (`"authorization": {"type": "vonage"}`): it
arrives with `Authorization: Bearer <JWT>`, the signed webhooks' JWT (HS256 over the signature
secret). Whoever replays the NCCO has its URI and stream token but no such JWT: without one,
with a forged, expired or already used one (another call's), the upgrade is answered 403
before anything is accepted; a genuine one signed before this call was answered (so for
another call) closes the stream at its start. No Gemini session opens for any of them, and
the log says why without quoting the header or the secret.
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
from support import eventually

SECRET = "vonage-handshake-test-secret-0123456789"
SIGNER = VonageSignature(SECRET, api_key="abcd1234")
FORGER = VonageSignature("not-the-signature-secret-0123456789", api_key="abcd1234")


async def answered_ncco(stack: LocalStack, uuid: str) -> dict[str, Any]:
    """The websocket endpoint of the NCCO a genuine, signed answer webhook got for `uuid`."""
    fields = {"to": "447700900001", "from": "447700900000", "uuid": uuid}
    url = f"{stack.base_url}/vonage/answer?{urlencode(fields)}"
    async with httpx.AsyncClient(trust_env=False) as client:
        resp = await client.get(url, headers={"Authorization": SIGNER.sign(method="GET", url=url)})
    assert resp.status_code == 200, resp.text
    endpoint: dict[str, Any] = orjson.loads(resp.content)[0]["endpoint"][0]
    assert endpoint["authorization"] == {"type": "vonage"}
    return endpoint


async def refused_at_upgrade(endpoint: dict[str, Any], headers: dict[str, str]) -> int:
    """Replay the NCCO's stream with `headers` on the upgrade: the HTTP status it got."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(endpoint["uri"], additional_headers=headers, proxy=None, open_timeout=5):
            pass
    return refused.value.response.status_code


@pytest.mark.timeout(60)
async def test_a_replayed_ncco_without_vonages_own_jwt_is_refused_at_the_handshake(
    make_stack: Any, call_over: Any
) -> None:
    stack: LocalStack = await make_stack(Scenario(seed=1), vonage_signature_secret=SECRET)
    # call A, as Vonage makes it: its handshake's JWT is what a thief could have captured
    caller = SimulatedVonageCaller(
        stack.base_url, signature_secret=SECRET, script=[Pause(300), HangUp()], seed=1
    )
    first = await caller.run()
    await call_over(stack)
    assert first.protocol_errors == [] and first.ended_by == "caller"
    assert first.ws_authorization is not None and len(stack.gemini.sessions) == 1

    endpoint = await answered_ncco(stack, "b1d7f0c2-5a3e-4c1b-9f00-000000000002")
    uri = endpoint["uri"]
    attempts = {
        "none": {},
        "forged": {"Authorization": FORGER.sign(method="GET", url=uri)},
        "expired": {"Authorization": SIGNER.sign(method="GET", url=uri, iat=time.time() - 600)},
        "other call's": {"Authorization": first.ws_authorization},
        "not a JWT": {"Authorization": "Bearer " + endpoint["headers"]["lc_token"]},
    }
    with structlog.testing.capture_logs() as logs:
        for label, headers in attempts.items():
            assert await refused_at_upgrade(endpoint, headers) == 403, label
    refusals = [e for e in logs if e["event"] == "vonage.stream_refused"]
    assert len(refusals) == len(attempts)
    reasons = [e["reason"] for e in refusals]
    assert all(r.startswith("handshake: ") for r in reasons)
    for expected in ("no Authorization", "does not verify", "replay window", "already used"):
        assert any(expected in r for r in reasons), (expected, reasons)
    text = repr(logs)
    assert SECRET not in text and first.ws_authorization.split(" ")[1] not in text
    assert len(stack.gemini.sessions) == 1  # nothing opened for any replay

    # the call's own, genuine handshake still opens it (its stream token checked after)
    genuine = {"Authorization": SIGNER.sign(method="GET", url=uri)}
    async with connect(uri, additional_headers=genuine, proxy=None, open_timeout=5) as ws:
        hello = {"event": "websocket:connected", "content-type": endpoint["content-type"]}
        await ws.send(orjson.dumps({**hello, **endpoint["headers"]}).decode())

        async def opened() -> bool:
            return len(stack.gemini.sessions) == 2

        await eventually(opened)
    await call_over(stack)


@pytest.mark.timeout(30)
async def test_a_genuine_jwt_signed_before_the_call_was_answered_is_another_calls(
    make_stack: Any,
) -> None:
    stack: LocalStack = await make_stack(Scenario(seed=1), vonage_signature_secret=SECRET)
    # signed by Vonage two minutes ago (fresh, never presented): for a call before this one
    earlier = {"Authorization": SIGNER.sign(method="GET", url="wss://x", iat=time.time() - 120)}
    endpoint = await answered_ncco(stack, "c2e8a1d3-6b4f-4d2c-8a11-000000000003")
    with structlog.testing.capture_logs() as logs:
        async with connect(
            endpoint["uri"], additional_headers=earlier, proxy=None, open_timeout=5
        ) as ws:
            hello = {"event": "websocket:connected", "content-type": endpoint["content-type"]}
            await ws.send(orjson.dumps({**hello, **endpoint["headers"]}).decode())
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008
    [refusal] = [e for e in logs if e["event"] == "vonage.stream_refused"]
    assert refusal["reason"] == "handshake Authorization issued before this call's answer"
    assert stack.gemini.sessions == []
