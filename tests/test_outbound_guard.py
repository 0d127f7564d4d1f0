"""Toll fraud: who may make livecall dial, where, how often (issue 11, item 6).

`POST /api/calls/outbound` on the real app under uvicorn, against the fake Twilio REST API
(the real `twilio` client talks to it over a socket): only `LIVECALL_CALLS_TOKEN` places
calls, `PUBLIC_URL` must be set, destinations are checked against an allowlist (default: the
caller ID's country; never premium-rate), and calls are capped per minute, per hour and at
once. Each refusal is a JSON error, nothing reaches Twilio, and the log names the number by
its last four digits only. The allowlist and the caps are also unit tested as plain logic.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import phonenumbers
import pytest
import structlog
from phonenumbers import PhoneNumberType

import livecall.log
from livecall.server.outbound_limits import OutboundLimits
from livecall.sim.gemini import Scenario
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from livecall.sim.twilio_rest import FakeTwilioState, serve_fake_twilio_rest
from livecall.telephony.destinations import DestinationPolicy, DestinationRefused, country_of

ACCOUNT_SID = "AC" + "3" * 32
READ_TOKEN = "read-TOKEN-4a7c2e9b"
CALLS_TOKEN = "calls-TOKEN-8e1d5f3a"
CALLER_ID = "+14155550100"  # San Francisco: by default only US numbers are called
US_NUMBER = "+14155550123"
FR_MOBILE = "+33612345678"
US_PREMIUM = "+19005551234"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def example(region: str, kind: int) -> str:
    number = phonenumbers.example_number_for_type(region, kind)
    assert number is not None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@pytest.fixture
async def fake_rest() -> AsyncIterator[tuple[FakeTwilioState, str]]:
    async with serve_fake_twilio_rest(ACCOUNT_SID, TEST_AUTH_TOKEN) as served:
        yield served


@pytest.fixture
async def outbound_stack(
    tmp_path: Path, fake_rest: tuple[FakeTwilioState, str]
) -> AsyncIterator[Callable[..., Any]]:
    """`await outbound_stack(**settings)`: a stack that may place calls through the fake."""
    stacks: list[LocalStack] = []

    async def make(**overrides: Any) -> LocalStack:
        home = tmp_path / f"stack{len(stacks)}"
        settings: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
            "recordings_dir": home / "recordings",
            "spool_dir": home / "spool",
            "recording_enabled": False,
            "twilio_account_sid": ACCOUNT_SID,
            "twilio_api_base_url": fake_rest[1],
            "twilio_caller_id": CALLER_ID,
            "api_token": READ_TOKEN,
            "calls_token": CALLS_TOKEN,
            **overrides,
        }
        stack = LocalStack(scenario=Scenario(seed=90), settings_overrides=settings)
        await stack.start()
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            await stack.stop()


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """The process's log lines (JSON, as `livecall serve` renders them), put back after."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    livecall.log.configure_logging("info", "json")
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)


async def post(stack: LocalStack, to: str, token: str | None, **headers: str) -> httpx.Response:
    if token is not None:
        headers.update(bearer(token))
    async with httpx.AsyncClient(base_url=stack.base_url, trust_env=False) as http:
        return await http.post("/api/calls/outbound", json={"to": to}, headers=headers)


# --------------------------------------------------------------------------- over sockets


async def test_only_the_calls_token_places_calls(outbound_stack, fake_rest) -> None:
    """The read token (also the dashboard password) reads records but may not dial."""
    fake = fake_rest[0]
    stack = await outbound_stack()
    read = await post(stack, US_NUMBER, READ_TOKEN)
    assert read.status_code == 403
    assert "LIVECALL_CALLS_TOKEN" in read.json()["detail"]
    assert (await post(stack, US_NUMBER, None)).status_code == 401
    assert (await post(stack, US_NUMBER, "guess")).status_code == 401
    assert not fake.calls
    async with httpx.AsyncClient(base_url=stack.base_url, trust_env=False) as http:
        assert (await http.get("/api/calls", headers=bearer(READ_TOKEN))).status_code == 200

    placed = await post(stack, US_NUMBER, CALLS_TOKEN)
    assert placed.status_code == 201, placed.text
    assert fake.call(placed.json()["call_sid"]).to == US_NUMBER


async def test_without_a_calls_token_no_one_places_calls(outbound_stack, fake_rest) -> None:
    stack = await outbound_stack(calls_token=None, api_local_only=True)
    for token in (READ_TOKEN, None):  # loopback in local-only mode does not place calls either
        refused = await post(stack, US_NUMBER, token)
        assert refused.status_code == 403
        assert "set LIVECALL_CALLS_TOKEN" in refused.json()["detail"]
    assert not fake_rest[0].calls


async def test_without_public_url_no_call_is_placed(outbound_stack, fake_rest) -> None:
    """The stream and AMD callback URLs would otherwise come from the request's headers."""
    stack = await outbound_stack(public_url=None)
    refused = await post(
        stack, US_NUMBER, CALLS_TOKEN, **{"X-Forwarded-Host": "evil.example", "Host": "evil"}
    )
    assert refused.status_code == 503
    assert "PUBLIC_URL" in refused.json()["detail"]
    assert not fake_rest[0].calls


async def test_premium_foreign_and_invalid_destinations_are_refused(
    outbound_stack, fake_rest, logs: io.StringIO
) -> None:
    fake = fake_rest[0]
    stack = await outbound_stack()
    refused = {
        US_PREMIUM: "premium-rate",
        example("GB", PhoneNumberType.PREMIUM_RATE): "premium-rate",
        example("FR", PhoneNumberType.SHARED_COST): "shared-cost",
        example("US", PhoneNumberType.PERSONAL_NUMBER): "personal",
        FR_MOBILE: "country FR is not allowed",
        "+15557654321": "not a valid phone number",  # fictional 555 range
    }
    for number, reason in refused.items():
        answer = await post(stack, number, CALLS_TOKEN)
        assert answer.status_code == 403, (number, answer.text)
        assert reason in answer.json()["detail"], answer.json()
    not_e164 = await post(stack, "0044 20 7946 0000", CALLS_TOKEN)
    assert not_e164.status_code == 422
    assert not fake.calls

    text = logs.getvalue()
    assert text.count('"outbound.refused"') == len(refused)
    for number in refused:
        assert number not in text and number[1:] not in text
        assert "*" * (len(number) - 5) + number[-4:] in text  # the last four digits only

    # the operator's own list: France, and the fictional range by prefix; premium stays out
    listed = await outbound_stack(outbound_allowed_destinations="FR,+1555")
    for number in (FR_MOBILE, "+15557654321"):
        assert (await post(listed, number, CALLS_TOKEN)).status_code == 201
    assert (await post(listed, US_NUMBER, CALLS_TOKEN)).status_code == 403
    assert (
        await post(listed, example("FR", PhoneNumberType.PREMIUM_RATE), CALLS_TOKEN)
    ).status_code == 403
    assert sorted(c.to for c in fake.calls.values()) == sorted([FR_MOBILE, "+15557654321"])


async def test_calls_are_capped_per_minute(outbound_stack, fake_rest) -> None:
    stack = await outbound_stack(outbound_max_per_minute=2)
    assert [(await post(stack, US_NUMBER, CALLS_TOKEN)).status_code for _ in range(2)] == [
        201,
        201,
    ]
    third = await post(stack, US_NUMBER, CALLS_TOKEN)
    assert third.status_code == 429
    assert "2 outbound calls a minute" in third.json()["detail"]
    assert 1 <= int(third.headers["Retry-After"]) <= 60
    assert len(fake_rest[0].calls) == 2


async def test_calls_ringing_at_once_are_capped(outbound_stack, fake_rest) -> None:
    stack = await outbound_stack(outbound_max_concurrent=1)
    assert (await post(stack, US_NUMBER, CALLS_TOKEN)).status_code == 201  # rings, unanswered
    second = await post(stack, US_NUMBER, CALLS_TOKEN)
    assert second.status_code == 429
    assert "already in progress" in second.json()["detail"]
    assert len(fake_rest[0].calls) == 1


# --------------------------------------------------------------------------- the logic


def test_default_allowlist_is_the_caller_ids_countries() -> None:
    policy = DestinationPolicy.parse([], caller_ids=[CALLER_ID, None, "+15550009999"])
    assert policy.countries == {"US"} and policy.prefixes == ()
    policy.check(US_NUMBER)
    for number in (FR_MOBILE, "+14165550123"):  # Canada shares +1 but is another country
        with pytest.raises(DestinationRefused, match="country"):
            policy.check(number)
    with pytest.raises(DestinationRefused, match="no destinations are allowed"):
        DestinationPolicy.parse([], caller_ids=[None]).check(US_NUMBER)
    with pytest.raises(DestinationRefused, match=r"E\.164"):
        policy.check("14155550123")
    assert country_of("+447700900123") is None and country_of(FR_MOBILE) == "FR"


def test_allowlist_entries_and_premium_switch() -> None:
    policy = DestinationPolicy.parse(["gb", " +1415 "])
    assert policy.countries == {"GB"} and policy.prefixes == ("+1415",)
    policy.check(example("GB", PhoneNumberType.MOBILE))
    policy.check(US_NUMBER)
    with pytest.raises(DestinationRefused, match="premium-rate"):
        policy.check(example("GB", PhoneNumberType.PREMIUM_RATE))
    DestinationPolicy.parse(["GB"], allow_costly=True).check(
        example("GB", PhoneNumberType.PREMIUM_RATE)
    )
    with pytest.raises(ValueError, match="neither an ISO country"):
        DestinationPolicy.parse(["USA"])


def test_rate_caps_slide() -> None:
    limits = OutboundLimits(per_minute=2, per_hour=3, concurrent=99)
    assert limits.admit(0.0, ()) is None and limits.admit(1.0, ()) is None
    refusal = limits.admit(2.0, ())
    assert refusal is not None and refusal.retry_after_s == 58
    assert limits.admit(60.5, ()) is None  # the first attempt left the minute
    refusal = limits.admit(200.0, ())
    assert refusal is not None and "an hour" in refusal.reason
    assert refusal.retry_after_s == 3400
    assert limits.admit(3600.0, ()) is None


def test_concurrency_counts_calls_until_their_stream_is_gone_or_never_came() -> None:
    limits = OutboundLimits(per_minute=99, per_hour=99, concurrent=2, ring_s=90.0)
    assert limits.admit(0.0, ()) is None and limits.admit(0.0, ()) is None
    assert limits.admit(0.0, ()) is not None  # two reserved while Twilio is asked
    limits.release()  # Twilio refused one
    limits.placed("CA1", 1.0)
    assert limits.in_progress(5.0, {"CA1"}) == 1  # answered: streaming
    assert limits.in_progress(500.0, {"CA1"}) == 1  # a long call still counts
    assert limits.in_progress(501.0, set()) == 0  # its stream is over
    assert limits.admit(502.0, ()) is None
    limits.placed("CA2", 502.0)
    assert limits.in_progress(550.0, set()) == 1  # ringing, unanswered
    assert limits.in_progress(593.0, set()) == 0  # nobody answered
