"""Attacks across workers: two servers on one database (as `livecall serve --workers 2` runs,
or two instances behind a load balancer). A signed Vonage webhook replayed to the other
server, and an outbound call's token presented by another call at the other server, are
refused there, and so is a Plivo webhook (its nonce) replayed to the other server: the
single-use checks live in the database both share, not in one process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import websockets
from structlog.testing import capture_logs

from livecall.carriers.plivo.signatures import PlivoSignature, new_nonce
from livecall.carriers.vonage import VonageSignature
from livecall.server.carrier_route import stream_tokens_for
from livecall.server.outbound_carriers import OUTBOUND_PARAMETER
from livecall.server.twilio_routes import twilio_stream_tokens
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.telephony.stream_token import TOKEN_PARAMETER
from pg_support import DEAD_PG_URL
from support import eventually
from test_stream_security import (
    ACCOUNT,
    attacker_stream,
    replayed_signature,
    start_frame,
    stream_url,
)

SECRET = "vonage-claims-test-secret-0123456789"
SIGNER = VonageSignature(SECRET)


def answer_query(uuid: str, **more: str) -> str:
    fields = {
        "to": "447700900001",
        "from": "447700900000",
        "conversation_uuid": "CON-" + uuid,
        "uuid": uuid,
        "region_url": "https://api-eu-1.vonage.com",
        **more,
    }
    return urlencode(fields)


async def two_servers(make_stack: Any, tmp_path: Path) -> tuple[LocalStack, LocalStack]:
    shared = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}",
        "vonage_signature_secret": SECRET,
        "twilio_account_sid": ACCOUNT,
    }
    first = await make_stack(Scenario(seed=1), **shared)
    second = await make_stack(Scenario(seed=1), **shared)
    return first, second


async def get(url: str, authorization: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.get(url, headers={"Authorization": authorization})


def refusals(stack: LocalStack, kind: str) -> float:
    assert stack.app is not None
    metrics = stack.app.state.livecall.metrics
    return metrics.registry.get_sample_value("livecall_errors_total", {"kind": kind}) or 0.0


@pytest.mark.timeout(60)
async def test_a_vonage_webhook_replayed_to_another_server_is_refused(
    make_stack: Any, tmp_path: Path
) -> None:
    first, second = await two_servers(make_stack, tmp_path)
    query = answer_query("63f61863-4a51-4f6b-86e1-46edebcf9356")
    authorization = SIGNER.sign(method="GET", url=f"{first.base_url}/vonage/answer?{query}")
    answered = await get(f"{first.base_url}/vonage/answer?{query}", authorization)
    assert answered.status_code == 200
    # the captured request, word for word, at the other server: its jti was used
    replayed = await get(f"{second.base_url}/vonage/answer?{query}", authorization)
    assert replayed.status_code == 403
    assert refusals(second, "vonage_signature") == 1
    assert second.registry.active == {}  # nothing reserved for the replay
    # the status webhook's replay too (a POST: the JWT covers its body)
    event = b'{"uuid": "63f61863-4a51-4f6b-86e1-46edebcf9356", "status": "answered"}'
    auth = SIGNER.sign(method="POST", url=f"{first.base_url}/vonage/event", body=event)
    async with httpx.AsyncClient(trust_env=False) as client:
        for stack, status in ((first, 200), (second, 403)):
            response = await client.post(
                f"{stack.base_url}/vonage/event",
                content=event,
                headers={"Authorization": auth, "Content-Type": "application/json"},
            )
            assert response.status_code == status


@pytest.mark.timeout(60)
async def test_an_outbound_token_claimed_at_one_server_is_refused_to_another_call_at_the_other(
    make_stack: Any, tmp_path: Path
) -> None:
    first, second = await two_servers(make_stack, tmp_path)
    assert first.app is not None
    secret = first.app.state.livecall.stream_secret
    token = stream_tokens_for(secret, "vonage").for_outbound("", time.time())
    ours = answer_query("11111111-4a51-4f6b-86e1-46edebcf9356", **{OUTBOUND_PARAMETER: token})
    url = f"{first.base_url}/vonage/answer?{ours}"
    assert (await get(url, SIGNER.sign(method="GET", url=url))).status_code == 200
    # another call (freshly signed: a genuine request) presenting the same outbound token
    theirs = answer_query("22222222-4a51-4f6b-86e1-46edebcf9356", **{OUTBOUND_PARAMETER: token})
    for stack in (second, first):
        url = f"{stack.base_url}/vonage/answer?{theirs}"
        refused = await get(url, SIGNER.sign(method="GET", url=url))
        assert refused.status_code == 403
        assert "already used by another call" in refused.text
    assert refusals(second, "stream_token") == 1
    # the call that claimed it may present it again at either server (Vonage retrying)
    url = f"{second.base_url}/vonage/answer?{ours}"
    assert (await get(url, SIGNER.sign(method="GET", url=url))).status_code == 200


@pytest.mark.timeout(60)
async def test_a_twilio_outbound_token_opens_one_call_across_servers(
    make_stack: Any, tmp_path: Path
) -> None:
    first, second = await two_servers(make_stack, tmp_path)
    assert first.app is not None
    secret = first.app.state.livecall.stream_secret
    token = twilio_stream_tokens(secret).for_outbound(ACCOUNT, time.time())
    ours, theirs = "CA" + "1" * 32, "CA" + "2" * 32
    async with websockets.connect(
        stream_url(first), additional_headers=replayed_signature(first), proxy=None
    ) as ws:
        await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        await ws.send(start_frame(ours, {TOKEN_PARAMETER: token}))

        async def live() -> bool:
            return ours in first.registry.active

        await eventually(live)
        # the token, seen in the TwiML, presented by another call at the other server
        code = await attacker_stream(second, start_frame(theirs, {TOKEN_PARAMETER: token}))
        assert code == 1008
    assert second.gemini is not None and second.gemini.sessions == []
    assert refusals(second, "stream_token") == 1  # refused before any Gemini session


@pytest.mark.timeout(60)
async def test_a_plivo_webhook_replayed_to_another_server_is_refused(
    make_stack: Any, tmp_path: Path
) -> None:
    """Plivo signs no timestamp: its nonce, once across servers, is the replay defence."""
    token = "plivo-claims-test-token-0123456789"
    first = await make_stack(
        Scenario(seed=1),
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}",
        plivo_auth_token=token,
    )
    # one public URL for both, as workers behind one port (the signature covers the URL)
    second = await make_stack(
        Scenario(seed=1),
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}",
        plivo_auth_token=token,
        public_url=first.base_url,
    )
    form = {"CallUUID": "9c1e3f4a-0000-4000-8000-000000000001", "From": "14155550100"}
    form |= {"To": "14155550199", "Direction": "inbound"}
    nonce = new_nonce()
    headers = {
        "X-Plivo-Signature-V3": PlivoSignature(token).sign(
            "POST", f"{first.base_url}/plivo/answer", form, nonce
        ),
        "X-Plivo-Signature-V3-Nonce": nonce,
    }
    async with httpx.AsyncClient(trust_env=False) as client:
        answered = await client.post(f"{first.base_url}/plivo/answer", data=form, headers=headers)
        assert answered.status_code == 200
        replayed = await client.post(f"{second.base_url}/plivo/answer", data=form, headers=headers)
    assert replayed.status_code == 403
    assert refusals(second, "plivo_signature") == 1


@pytest.mark.timeout(60)
async def test_with_the_database_down_calls_are_answered_and_replays_here_still_refused(
    make_stack: Any,
) -> None:
    """An outage must not drop calls: the checks fall back to this process (said once)."""
    stack = await make_stack(
        Scenario(seed=1), database_url=DEAD_PG_URL, vonage_signature_secret=SECRET
    )
    query = answer_query("33333333-4a51-4f6b-86e1-46edebcf9356")
    url = f"{stack.base_url}/vonage/answer?{query}"
    authorization = SIGNER.sign(method="GET", url=url)
    with capture_logs() as logs:
        assert (await get(url, authorization)).status_code == 200
        assert (await get(url, authorization)).status_code == 403  # the replay, here
    assert refusals(stack, "claims_fallback") >= 1
    down = [e for e in logs if e["event"] == "claims.shared_unavailable"]
    assert len(down) == 1 and down[0]["log_level"] == "error"
