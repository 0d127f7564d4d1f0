"""Vonage's call control pieces without a call: the `CallControl` adapter over a mock
transport, the region a call's control goes to, the per-call directory, the private key's
forms, the fake's strict JWT checks, the status events' bounds, and which routes get which
control. The whole calls are in tests/test_carrier_control_e2e.py."""

from __future__ import annotations

import time
import types
import uuid
from typing import Any

import httpx
import jwt
import orjson
import pytest
from pydantic import SecretStr

from livecall.call.actions import BridgeActions
from livecall.carriers.vonage.answer import AnswerRequest
from livecall.carriers.vonage.calls import CallDirectory, region_base
from livecall.carriers.vonage.control import (
    VonageApiError,
    VonageCall,
    VonageCallControl,
    load_private_key,
)
from livecall.records import CallEventRecord
from livecall.server.carrier_route import EXOTEL_TRANSFER_REFUSAL
from livecall.server.carrier_setup import configured_routes
from livecall.server.carrier_status import STATUS_EVENT, CarrierStatuses
from livecall.settings import Settings
from livecall.sim.vonage_rest import build_fake_vonage_rest, generate_application_keys
from livecall.telephony.call_control import CallControlError, DtmfControl, StreamEndControl

APP_ID = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
CALL = "63f61863-4a51-4f6b-86e1-46edebcf9356"


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return generate_application_keys()


def adapter(
    pem: str, handler: Any, region: str | None = None
) -> tuple[VonageCall, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(record))
    rest = VonageCallControl(APP_ID, pem, base_url="https://api.nexmo.test", http_client=http)
    return VonageCall(rest, region), seen


async def test_the_adapter_maps_vonages_answers_onto_call_control(
    keys: tuple[str, str],
) -> None:
    pem, _ = keys
    answers = iter([204, 204, 404, 500])
    control, seen = adapter(
        pem, lambda r: httpx.Response(next(answers)), "https://api-eu-1.vonage.com"
    )
    assert (control.warm_transfer, control.transfer_refusal) == (True, None)
    # a SIP endpoint has no onAnswer: a warm transfer there is connected (and recorded) cold
    assert control.briefs("+15551230000") and not control.briefs("sip:desk@pbx.example")
    assert await control.hangup(CALL) is True
    assert await control.transfer(CALL, "sip:desk@pbx.example", say="Putting you through.")
    assert await control.hangup(CALL) is False  # 404: Vonage knows no such call (any more)
    with pytest.raises(CallControlError, match="500") as failed:
        await control.hangup(CALL)
    assert isinstance(failed.value, VonageApiError)
    assert "PRIVATE" not in str(failed.value) and "PRIVATE" not in repr(control)
    with pytest.raises(CallControlError, match="not sent"):  # nothing sent for a bad target
        await control.transfer(CALL, "the manager")

    assert [str(r.url) for r in seen] == [f"https://api-eu-1.vonage.com/v1/calls/{CALL}"] * 4
    assert orjson.loads(seen[1].content) == {
        "action": "transfer",
        "destination": {
            "type": "ncco",
            "ncco": [
                {"action": "talk", "text": "Putting you through."},
                {"action": "connect", "endpoint": [{"type": "sip", "uri": "sip:desk@pbx.example"}]},
            ],
        },
    }


async def test_an_unreachable_api_is_a_call_control_error(keys: tuple[str, str]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    control, _ = adapter(keys[0], refuse)
    with pytest.raises(CallControlError, match="hangup failed"):
        await control.hangup(CALL)


def test_the_region_is_used_only_when_it_is_vonages_or_the_configured_origin() -> None:
    base = "https://api.nexmo.com"
    assert region_base("https://api-us-3.vonage.com", base) == "https://api-us-3.vonage.com"
    assert region_base("https://api-eu-1.vonage.com/", base) == "https://api-eu-1.vonage.com"
    assert region_base("https://api.nexmo.com", base) == "https://api.nexmo.com"
    for foreign in (
        "http://api-us-3.vonage.com",  # the JWT never travels in clear
        "https://vonage.com.attacker.example",
        "https://api-us-3.vonage.com?x=1",
        "https://user:pw@api-us-3.vonage.com",
        "not a url",
        "",
        None,
    ):
        assert region_base(foreign, base) is None, foreign
    fake = "http://127.0.0.1:8123"
    assert region_base(fake + "/region-us-3", fake) == fake + "/region-us-3"
    assert region_base("http://127.0.0.1:9999/region", fake) is None


def answer(call_uuid: str, conversation: str, region: str | None = None) -> AnswerRequest:
    return AnswerRequest(call_uuid, conversation, "447700900000", "447700900001", region)


def test_the_directory_finds_a_call_by_uuid_or_conversation_for_a_bounded_time() -> None:
    directory = CallDirectory(ttl_s=60.0, max_calls=2)
    directory.answered(answer("a", "CON-a", "https://api-us-3.vonage.com"), now=0.0)
    known = directory.get("a", now=1.0)
    assert known is not None and known.region_url == "https://api-us-3.vonage.com"
    assert known.line_number == "447700900001"  # the number rung: a transfer's caller id
    leg = directory.for_event("leg-of-a", "CON-a", now=1.0)  # a leg's own uuid
    assert leg is not None and leg.uuid == "a"
    assert directory.for_event("leg-x", "CON-x", now=1.0) is None
    assert directory.get("a", now=61.0) is None  # past its time
    assert directory.for_event("leg-of-a", "CON-a", now=61.0) is None

    for i in range(3):  # at most max_calls: the oldest go
        directory.answered(answer(f"c{i}", f"CON-{i}"), now=100.0 + i)
    assert len(directory) == 2 and directory.get("c0", now=103.0) is None
    assert directory.for_event("leg", "CON-0", now=103.0) is None  # its conversation too


def test_the_private_key_inline_escaped_or_from_a_file(
    keys: tuple[str, str], tmp_path: Any
) -> None:
    pem, _ = keys
    assert load_private_key(pem) == pem.strip() + "\n"
    assert load_private_key(pem.strip().replace("\n", "\\n")) == pem.strip() + "\n"
    path = tmp_path / "private.key"
    path.write_text(pem)
    assert load_private_key(str(path)) == pem.strip() + "\n"
    mangled = pem.replace("-----BEGIN", "----BEGIN")
    with pytest.raises(ValueError) as refused:
        load_private_key(mangled)
    assert "PRIVATE KEY" not in str(refused.value) and mangled[40:80] not in str(refused.value)
    with pytest.raises(ValueError):
        load_private_key(str(tmp_path / "missing.key"))


async def test_the_fake_refuses_any_jwt_but_a_fresh_one_of_its_application(
    keys: tuple[str, str],
) -> None:
    pem, public = keys
    other_pem, _ = generate_application_keys()
    app, fake = build_fake_vonage_rest(APP_ID, public)
    fake.calls[CALL] = types.SimpleNamespace(status="answered")  # type: ignore[assignment]
    now = int(time.time())

    def token(key: str = pem, **claims: Any) -> str:
        body = {"application_id": APP_ID, "iat": now, "exp": now + 900, "jti": str(uuid.uuid4())}
        body.update(claims)
        return jwt.encode({k: v for k, v in body.items() if v is not None}, key, "RS256")

    cases = {
        "wrong key": token(other_pem),
        "expired": token(iat=now - 1000, exp=now - 100),
        "wrong application": token(application_id="0" * 36),
        "no jti": token(jti=None),
        "unsigned": jwt.encode(
            {"application_id": APP_ID, "iat": now, "exp": now + 9}, None, "none"
        ),
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        for why, value in cases.items():
            resp = await client.put(
                f"/v1/calls/{CALL}/dtmf",
                json={"digits": "1"},
                headers={"Authorization": f"Bearer {value}"},
            )
            assert resp.status_code == 401, why
        resp = await client.put(f"/v1/calls/{CALL}/dtmf", json={"digits": "1"})
        assert resp.status_code == 401  # no token at all
    assert [r.auth_error for r in fake.requests] == [
        "InvalidSignatureError",
        "expired",
        "wrong application_id",
        "MissingRequiredClaimError",
        "InvalidAlgorithmError",
        "no bearer token",
    ]


class _Kept:
    def __init__(self) -> None:
        self.events: list[CallEventRecord] = []

    def event(self, event: CallEventRecord) -> None:
        self.events.append(event)


def statuses_over(kept: _Kept, live: dict[str, Any]) -> CarrierStatuses:
    state = types.SimpleNamespace(
        registry=types.SimpleNamespace(active=live),
        store=types.SimpleNamespace(observer=lambda call_id: kept),
    )
    return CarrierStatuses(state, "vonage", ttl_s=60.0, max_events=3)  # type: ignore[arg-type]


def test_statuses_are_kept_for_calls_answered_here_and_bounded() -> None:
    stored = _Kept()
    live_events = _Kept()
    bridge = types.SimpleNamespace(observer=live_events, now_ms=lambda: 1234.4)
    live: dict[str, Any] = {}
    statuses = statuses_over(stored, live)

    assert statuses.record("never-answered", "completed") is False
    statuses.answered("c1")
    assert statuses.record("c1", "ringing") is True  # before the stream: held
    assert stored.events == [] and live_events.events == []
    statuses.started("c1")
    live["c1"] = types.SimpleNamespace(bridge=bridge)
    assert statuses.record("c1", "Answered") is True  # live: through the call's observer
    assert [(e.kind, e.data["status"]) for e in live_events.events] == [
        (STATUS_EVENT, "ringing"),
        (STATUS_EVENT, "answered"),
    ]
    assert statuses.record("c1", "<script>") is False  # not a status word
    del live["c1"]
    statuses.ended("c1")
    assert statuses.record("c1", "completed") is True  # over: to the stored record
    assert [(e.call_sid, e.data) for e in stored.events] == [
        ("c1", {"carrier": "vonage", "status": "completed"})
    ]
    assert statuses.record("c1", "completed") is False  # max_events reached


def test_which_routes_get_which_control(keys: tuple[str, str]) -> None:
    pem, _ = keys
    signature = SecretStr("vonage-signature-secret-0123456789")
    exotel = SecretStr("exotel-url-secret-0123456789")
    bare = configured_routes(Settings(vonage_signature_secret=signature, exotel_url_secret=exotel))
    assert [(r.name, r.control is None) for r in bare] == [("vonage", True), ("exotel", False)]
    assert [r.status_methods for r in bare if r.name == "vonage"] == [("GET", "POST")]
    [exotel_route] = [r for r in bare if r.name == "exotel"]
    assert exotel_route.control is not None
    line = exotel_route.control(None)  # type: ignore[arg-type]
    assert isinstance(line, StreamEndControl)
    assert line.transfer_refusal == EXOTEL_TRANSFER_REFUSAL

    wired = configured_routes(
        Settings(
            vonage_signature_secret=signature,
            vonage_application_id=APP_ID,
            vonage_private_key=SecretStr(pem),
        )
    )
    [vonage] = wired
    assert vonage.control is not None and vonage.aclose is not None
    assert "PRIVATE" not in repr(wired)
    with pytest.raises(ValueError, match="VONAGE_PRIVATE_KEY"):
        configured_routes(
            Settings(
                vonage_signature_secret=signature,
                vonage_application_id=APP_ID,
                vonage_private_key=SecretStr("/nonexistent/private.key"),
            )
        )


async def test_keys_go_over_rest_where_the_control_can_and_as_tones_when_it_fails(
    keys: tuple[str, str],
) -> None:
    answers = iter([200, 404])
    control, seen = adapter(keys[0], lambda r: httpx.Response(next(answers), json={}))
    assert isinstance(control, DtmfControl)
    assert not isinstance(StreamEndControl("no"), DtmfControl)
    played: list[bytes] = []

    async def no_dtmf_message(digits: str) -> None:
        return None  # Vonage's stream has none

    async def play_ulaw(ulaw: bytes) -> int:
        played.append(ulaw)
        return len(ulaw)

    async def wait_heard(timeout: float) -> bool:  # noqa: ASYNC109
        return True

    bridge = types.SimpleNamespace(
        call_sid=CALL, send_dtmf=no_dtmf_message, play_ulaw=play_ulaw, wait_heard=wait_heard
    )
    actions = BridgeActions(bridge, control, profile=None)  # type: ignore[arg-type]
    assert await actions.send_dtmf("12#") == {"result": "ok", "pressed": "12#"}
    assert played == [] and orjson.loads(seen[0].content) == {"digits": "12#"}
    assert await actions.send_dtmf("9") == {"error": "the call has ended"}  # 404
    assert await actions.send_dtmf("A") == {"result": "ok", "pressed": "A"}  # Vonage cannot
    assert played and len(seen) == 2  # A went as tones, nothing was sent over REST
