"""What the outbound end-to-end suites share: the profiles they place calls with, and a stack
factory whose app talks to one carrier's fake REST API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack

OUR_NUMBER = "+15550009999"
CALLEE = "+15557654321"  # fictional 555 numbers: allowed by prefix
OUTREACH: dict[str, Any] = {
    "name": "outreach",
    "numbers": [OUR_NUMBER],
    "system_prompt": "You call guests to confirm their bookings at Bella Vista.",
    "greeting": "Hello, this is Bella Vista calling about your booking.",
    "max_call_duration_s": 600,
}
FRONT_DESK: dict[str, Any] = {
    "name": "front-desk",
    "default": True,
    "system_prompt": "You are the front desk of Bella Vista.",
}


def write_profiles(tmp_path: Path) -> Path:
    file = tmp_path / "profiles.yaml"
    file.write_text(yaml.safe_dump({"profiles": [FRONT_DESK, OUTREACH]}, sort_keys=False))
    return file


@asynccontextmanager
async def outbound_stacks(
    tmp_path: Path, profiles_file: Path, carrier: str, calls_token: str
) -> AsyncIterator[Callable[..., Any]]:
    """`await make(**settings)`: the app with `carrier`'s fake REST API; all stopped at exit."""
    stacks: list[LocalStack] = []

    async def make(**overrides: Any) -> LocalStack:
        home = tmp_path / f"stack{len(stacks)}"
        stack = LocalStack(
            scenario=Scenario(seed=13),
            carrier_apis=(carrier,),
            settings_overrides={
                "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
                "recordings_dir": home / "recordings",
                "spool_dir": home / "spool",
                "recording_enabled": False,
                "profiles_file": profiles_file,
                "calls_token": calls_token,
                "outbound_allowed_destinations": "+1555",
                **overrides,
            },
        )
        stacks.append(stack)
        await stack.start()
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            await stack.stop()


async def post(stack: LocalStack, headers: dict[str, str] | None = None, **body: Any) -> Any:
    """`POST /api/calls/outbound` on the stack's app."""
    async with httpx.AsyncClient(base_url=stack.base_url, trust_env=False) as http:
        return await http.post("/api/calls/outbound", json=body, headers=headers or {})


Dials = Callable[[LocalStack, str], list[Any]]  # the create-call requests a fake received


async def assert_guards_refuse(
    make_stack: Callable[..., Any], carrier: str, auth: dict[str, str], dials: Dials
) -> None:
    """Twilio's guards on `carrier`: no token 401, a foreign number 403, AMD 400 (nothing
    reaches the carrier), the carrier's refusal 502 (counted), then the rate cap 429."""
    stack = await make_stack(outbound_max_per_minute=1)
    fake = stack.fakes[carrier]

    no_token = await post(stack, None, to=CALLEE, carrier=carrier)
    assert no_token.status_code == 401
    foreign = await post(stack, auth, to="+33612345678", carrier=carrier)
    assert foreign.status_code == 403
    assert "destination refused" in foreign.json()["detail"]
    amd = await post(stack, auth, to=CALLEE, carrier=carrier, machine_detection=True)
    assert amd.status_code == 400
    assert "Twilio-only" in amd.json()["detail"]
    assert not dials(stack, carrier)  # nothing reached the carrier

    fake.fail_status = 500  # the carrier refuses: 502, and the attempt still counts
    refused = await post(stack, auth, to=CALLEE, carrier=carrier, profile="outreach")
    assert refused.status_code == 502
    assert "refused the call" in refused.json()["detail"]
    assert CALLEE not in refused.json()["detail"]
    fake.fail_status = None
    capped = await post(stack, auth, to=CALLEE, carrier=carrier, profile="outreach")
    assert capped.status_code == 429
    assert int(capped.headers["Retry-After"]) >= 1
    assert len(dials(stack, carrier)) == 1


async def assert_refused_when_not_set_up(
    make_stack: Callable[..., Any], carrier: str, missing: str, auth: dict[str, str], dials: Dials
) -> None:
    """`carrier` without the `missing` setting: 503 naming it, asked by name or by default."""
    stack = await make_stack(**{missing: None}, outbound_carrier=carrier)

    named = await post(stack, auth, to=CALLEE, carrier=carrier)
    by_default = await post(stack, auth, to=CALLEE)  # OUTBOUND_CARRIER picks the carrier

    for response in (named, by_default):
        assert response.status_code == 503
        assert missing.upper() in response.json()["detail"]
    assert not dials(stack, carrier)
