"""The carrier-neutral `CallControl` and each carrier's adapter onto it, over mock transports.

What the call core relies on: True when done, False when the call was already over, a
`CallControlError` (never a credential in it) for anything else, and a refusal up front on a
line that cannot transfer. The whole calls are in tests/test_carrier_control_e2e.py.
"""

from __future__ import annotations

import json
import types
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from livecall.call.actions import BridgeActions
from livecall.carriers.plivo.control import PlivoCallControl, PlivoControl, PlivoRestError
from livecall.carriers.telnyx.control import TelnyxCallControl, TelnyxCallError, TelnyxControl
from livecall.server.carrier_setup import configured_routes
from livecall.settings import Settings
from livecall.sim.telnyx import generate_keypair
from livecall.telephony.call_control import CallControl, CallControlError, StreamEndControl
from livecall.telephony.twilio_rest import TwilioCallControl, TwilioCallError
from livecall.telephony.whisper import Whispers

KEY = "KEY-telnyx-secret-0001"
TOKEN = "plivo-secret-token-0001"
AUTH_ID = "MAXXXXXXXXXXXXXXXXXX"
PLIVO_CALL = "5c3e5d2a-1111-4a2b-9c3d-0123456789ab"


def telnyx(handler: Any) -> tuple[TelnyxCallControl, httpx.AsyncClient]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    rest = TelnyxControl(KEY, "acct", base_url="http://t.test/v2", http_client=http, max_retries=0)
    return TelnyxCallControl(rest), http


async def test_telnyx_maps_its_answers_onto_call_control() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        call = request.url.path.rsplit("/", 1)[-1]
        if call == "v3:gone":
            return httpx.Response(422, json={"errors": [{"code": "90018"}]})
        if call == "v3:unknown":
            return httpx.Response(404, json={"errors": [{"code": "10005"}]})
        if call == "v3:down":
            return httpx.Response(500, json={"errors": [{"code": "10007"}]})
        return httpx.Response(200, json={"sid": call, "status": "in-progress"})

    control, http = telnyx(handler)
    assert (control.warm_transfer, control.transfer_refusal) == (True, None)
    assert await control.hangup("v3:live") is True
    assert await control.transfer("v3:live", "+15551239999", "Putting you through.") is True
    assert await control.hangup("v3:gone") is False
    assert await control.transfer("v3:unknown", "+15551239999") is False
    with pytest.raises(TelnyxCallError, match="HTTP 500") as failed:
        await control.hangup("v3:down")
    assert isinstance(failed.value, CallControlError) and KEY not in str(failed.value)
    sent = len(bodies)
    with pytest.raises(CallControlError, match="not sent"):
        await control.transfer("v3:live", "12;DROP")  # no target TeXML can dial
    assert len(bodies) == sent
    await control.aclose()
    await http.aclose()
    assert bodies[0] == {"Status": "completed"}
    texml = bodies[1]["Texml"]
    assert texml.index("<Say>Putting you through.</Say>") < texml.index("<Number>+15551239999")


def plivo(handler: Any, published: list[str]) -> PlivoCallControl:
    async def publish(document: str) -> str:
        published.append(document)
        return f"https://lc.example/plivo/transfer/t{len(published)}"

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    rest = PlivoControl(AUTH_ID, TOKEN, base_url="https://p.test", client=http)
    return PlivoCallControl(rest, publish)


async def test_plivo_transfers_through_a_published_document() -> None:
    seen: list[tuple[str, dict[str, Any] | None]] = []
    published: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, json.loads(request.content) if request.content else None))
        if "0000" in request.url.path:
            return httpx.Response(404, json={"error": "not found"})
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(202, json={"message": "call transferred"})

    control = plivo(handler, published)
    assert await control.transfer(PLIVO_CALL, "+15551239999", "One moment.") is True
    assert await control.transfer(PLIVO_CALL, "sip:desk@pbx.example.com") is True
    assert await control.hangup(PLIVO_CALL) is True
    gone = "00000000-0000-0000-0000-000000000000"
    assert await control.hangup(gone) is False
    assert await control.transfer(gone, "+15551239999") is False
    await control.control.aclose()

    first = published[0]
    assert first.index("<Speak>One moment.</Speak>") < first.index("<Number>15551239999</Number>")
    assert "<User>sip:desk@pbx.example.com</User>" in published[1]
    assert seen[0] == (
        "POST",
        {
            "legs": "aleg",
            "aleg_url": "https://lc.example/plivo/transfer/t1",
            "aleg_method": "POST",
        },
    )
    assert seen[2] == ("DELETE", None)


async def test_plivo_failures_are_call_control_errors_without_secrets() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": "internal error"})

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    for handler in (down, unreachable):
        control = plivo(handler, [])
        for attempt in (control.hangup(PLIVO_CALL), control.transfer(PLIVO_CALL, "+15551239999")):
            with pytest.raises(PlivoRestError) as failed:
                await attempt
            assert isinstance(failed.value, CallControlError)
            assert TOKEN not in str(failed.value)
        await control.control.aclose()
    control = plivo(down, [])
    with pytest.raises(CallControlError, match="not sent"):
        await control.transfer(PLIVO_CALL, "reception")  # no number: nothing goes out
    await control.control.aclose()


async def test_a_line_without_rest_hangs_up_by_closing_and_refuses_transfers() -> None:
    control: CallControl = StreamEndControl("this line cannot transfer calls")
    assert not control.briefs("+15551230000")
    assert await control.hangup("call-1") is True  # the stream's close was the hang-up
    with pytest.raises(CallControlError, match="cannot transfer"):
        await control.transfer("call-1", "+15551239999")
    with pytest.raises(ValueError):
        StreamEndControl("")
    # the call core refuses up front, with the line's reason, before any handoff line
    actions = BridgeActions(types.SimpleNamespace(call_sid="call-1"), control, profile=None)  # type: ignore[arg-type]
    answer = await actions.transfer("manager", "+15551239999")
    assert answer["error"].startswith("this line cannot transfer calls")


def test_twilio_conforms_as_it_is() -> None:
    assert issubclass(TwilioCallError, CallControlError)
    assert (TwilioCallControl.warm_transfer, TwilioCallControl.transfer_refusal) == (True, None)


async def test_documents_of_another_kind_keep_their_own_keys() -> None:
    class Stash:
        def __init__(self) -> None:
            self.values: dict[str, str] = {}

        async def stash(self, key: str, value: str, ttl_s: float) -> bool:
            self.values[key] = value
            return True

        async def take(self, key: str) -> str | None:
            return self.values.pop(key, None)

    shared = Stash()
    documents = Whispers(shared, prefix="plivo-transfer")
    whispers = Whispers(shared)
    token = await documents.put("<Response/>")
    assert list(shared.values) == [f"plivo-transfer:{token}"]
    assert await whispers.take(token) is None  # a briefing's door opens no document
    assert await documents.take(token) == "<Response/>"
    assert await documents.take(token) is None  # once


def test_carrier_routes_get_call_control_only_with_their_api_credentials() -> None:
    _, public = generate_keypair()
    webhooks_only = Settings(
        telnyx_public_key=SecretStr(public),
        telnyx_api_key=SecretStr(KEY),  # no TELNYX_ACCOUNT_SID: no control
        plivo_auth_token=SecretStr(TOKEN),
    )
    assert [(r.name, r.control, r.documents) for r in configured_routes(webhooks_only)] == [
        ("telnyx", None, False),
        ("plivo", None, False),
    ]
    both = Settings(
        telnyx_public_key=SecretStr(public),
        telnyx_api_key=SecretStr(KEY),
        telnyx_account_sid="acct",
        plivo_auth_token=SecretStr(TOKEN),
        plivo_auth_id=AUTH_ID,
    )
    routes = configured_routes(both)
    assert [(r.name, r.control is not None, r.documents) for r in routes] == [
        ("telnyx", True, False),
        ("plivo", True, True),
    ]
    assert KEY not in repr(routes) and TOKEN not in repr(routes)
