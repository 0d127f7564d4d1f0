"""Agent profiles on live calls: which profile answers (called number, `profile` parameter,
default), everything a profile sets reaching the Gemini session, and edits to the profiles
file taking effect for the next call without a restart (a broken edit keeps the last good
profiles and says what is wrong)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from livecall.agent.profiles import ProfileError, ProfileRegistry
from livecall.server.app import create_app
from livecall.settings import Settings
from livecall.sim.gemini import Scenario, SessionRecord
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import CallResult, WaitForAgentAudio
from livecall.store.models import Call

SALES_NUMBER = "+15550003333"

FRONT_DESK: dict[str, Any] = {
    "name": "front-desk",
    "default": True,
    "system_prompt": "You are the front desk of Bella Vista.",
    "greeting": "Welcome to Bella Vista.",
}
SALES: dict[str, Any] = {
    "name": "sales",
    "numbers": [SALES_NUMBER],
    "system_prompt": "You sell Bella Vista's catering packages.",
    "greeting": "Bella Vista catering, how can I help?",
    "voice": "Puck",
    "language": "en-GB",
    "model": "gemini-3.1-flash-live-preview",
    "vad": {"start_sensitivity": "low", "silence_duration_ms": 800},
    "tools": ["end_call", "transfer_call"],
    "transfer_targets": {"manager": "+15551239999"},
    "recording": False,
    "max_call_duration_s": 300,
}
SUPPORT: dict[str, Any] = {
    "name": "support",
    "system_prompt": "You are Bella Vista's booking support.",
    "greeting": "Booking support, hello.",
}


def dump(*profiles: dict[str, Any], **defaults: Any) -> str:
    data: dict[str, Any] = {"profiles": list(profiles)}
    if defaults:
        data = {"defaults": defaults, **data}
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    """livecall with a profiles file (checked every 50 ms) in `tmp_path/profiles.yaml`."""
    (tmp_path / "profiles.yaml").write_text(dump(FRONT_DESK, SALES, SUPPORT, voice="Aoede"))
    served = LocalStack(
        scenario=Scenario(seed=7),
        settings_overrides={
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}",
            "recordings_dir": tmp_path / "recordings",
            "spool_dir": tmp_path / "spool",
            "profiles_file": tmp_path / "profiles.yaml",
            "profiles_reload_interval_s": 0.05,
        },
    )
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


async def greeted_call(stack: LocalStack, **caller: Any) -> tuple[CallResult, SessionRecord, Call]:
    """A call that hangs up once the agent's greeting is heard; its session and record."""
    result = await stack.caller([WaitForAgentAudio(min_heard_ms=200, timeout=10)], **caller).run()
    assert not result.protocol_errors and not result.script_errors
    state = stack.app.state.livecall
    assert await state.registry.wait_idle(10)
    assert await state.store.flush()
    record = await state.store.repo.get_call(result.call_sid)
    assert record is not None
    assert stack.gemini is not None
    return result, stack.gemini.sessions[-1], record


def prompt_of(session: SessionRecord) -> str:
    assert session.setup is not None
    return str(session.setup["systemInstruction"]["parts"][0]["text"])


def greeting_of(session: SessionRecord) -> str:
    return str(session.client_contents[0]["turns"][0]["parts"][0]["text"])


def tool_names(session: SessionRecord) -> list[str]:
    assert session.setup is not None
    return [d["name"] for t in session.setup.get("tools", []) for d in t["functionDeclarations"]]


async def test_the_called_number_picks_the_profile(stack: LocalStack) -> None:
    result, session, record = await greeted_call(stack, to=SALES_NUMBER)

    assert result.parameters["profile"] == "sales"
    assert prompt_of(session) == SALES["system_prompt"]
    assert greeting_of(session).endswith(SALES["greeting"])
    assert session.model == "gemini-3.1-flash-live-preview"
    assert session.setup is not None
    speech = session.setup["generationConfig"]["speechConfig"]
    assert speech["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"] == "Puck"
    assert speech["languageCode"] == "en-GB"
    vad = session.setup["realtimeInputConfig"]["automaticActivityDetection"]
    assert vad["startOfSpeechSensitivity"] == "START_SENSITIVITY_LOW"
    assert vad["silenceDurationMs"] == 800
    assert tool_names(session) == ["end_call", "transfer_call"]
    assert record.profile == "sales"
    assert record.recording_key is None  # recording: false


async def test_the_profile_parameter_wins_and_the_default_catches_the_rest(
    stack: LocalStack,
) -> None:
    result, session, record = await greeted_call(
        stack, to=SALES_NUMBER, webhook_path="/twiml?profile=support"
    )
    assert result.parameters["profile"] == "support"
    assert prompt_of(session) == SUPPORT["system_prompt"]
    assert greeting_of(session).endswith(SUPPORT["greeting"])
    assert record.profile == "support"

    result, session, record = await greeted_call(stack, to="+15550009876")
    assert result.parameters["profile"] == "front-desk"
    assert prompt_of(session) == FRONT_DESK["system_prompt"]
    speech = session.setup["generationConfig"]["speechConfig"]  # type: ignore[index]
    assert speech["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"] == "Aoede"  # from defaults
    assert tool_names(session) == ["end_call"]
    assert record.profile == "front-desk"


def watch(registry: ProfileRegistry) -> tuple[asyncio.Event, asyncio.Event]:
    reloaded, failed = asyncio.Event(), asyncio.Event()
    registry.on_reload.append(lambda _: reloaded.set())
    registry.on_error.append(lambda _: failed.set())
    return reloaded, failed


async def test_edits_apply_to_the_next_call_and_broken_edits_are_refused(
    stack: LocalStack, tmp_path: Path
) -> None:
    registry = stack.app.state.livecall.profiles
    file = tmp_path / "profiles.yaml"
    reloaded, failed = watch(registry)

    edited = {
        **FRONT_DESK,
        "system_prompt": "You are the night desk of Bella Vista.",
        "greeting": "Bella Vista, night desk.",
    }
    file.write_text(dump(edited, SALES, SUPPORT, voice="Aoede"))
    async with asyncio.timeout(5):
        await reloaded.wait()
    _, session, _ = await greeted_call(stack)
    assert prompt_of(session) == edited["system_prompt"]
    assert greeting_of(session).endswith(edited["greeting"])

    broken = {**edited, "system_prompt": "Broken edit.", "voise": "Puck"}
    with structlog.testing.capture_logs() as logs:
        file.write_text(dump(broken, {**SALES, "numbers": ["555-0100"]}, SUPPORT))
        async with asyncio.timeout(5):
            await failed.wait()
    problems = registry.last_error.problems
    assert f"{file}: profile 'front-desk': voise: unknown field (did you mean 'voice'?)" in problems
    assert any("profile 'sales': numbers[0]" in p and "E.164" in p for p in problems)
    failure = next(e for e in logs if e["event"] == "profiles.reload_failed")
    assert failure["log_level"] == "error"
    assert failure["problems"] == problems
    assert failure["keeping"] == ["front-desk", "sales", "support"]

    # the last good profiles keep answering
    _, session, record = await greeted_call(stack)
    assert prompt_of(session) == edited["system_prompt"]
    assert record.profile == "front-desk"


def test_a_broken_profiles_file_stops_the_server_with_the_reasons(tmp_path: Path) -> None:
    file = tmp_path / "profiles.yaml"
    file.write_text(dump({**SALES, "tools": ["transfer_call"], "transfer_targets": {}}))
    with pytest.raises(ProfileError) as caught:
        create_app(Settings(profiles_file=file, database_url="sqlite+aiosqlite:///:memory:"))
    assert caught.value.problems == [
        f"{file}: profile 'sales': tools: transfer_call is enabled but transfer_targets is empty"
    ]
