"""What the outbound end-to-end suites share: the profiles they place calls with, and a stack
factory whose app talks to one carrier's fake REST API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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
