"""Agent profiles: loading, clear errors, picking one per call, and hot reload."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import pytest

from livecall.agent.profiles import AgentProfile, ProfileError, ProfileRegistry, ProfileSet
from livecall.settings import Settings

FULL = """
defaults:
  voice: Puck
  vad: {silence_duration_ms: 700}
profiles:
  - name: front-desk
    default: true
    numbers: ["+15551230000"]
    system_prompt_file: prompts/front.md
    greeting: Thanks for calling Rosa's, how can I help?
    tools: [end_call, transfer_call, lookup]
    transfer_targets:
      manager: "+15551239999"
      support: "sip:help@pbx.example.com"
    knowledge_dir: docs
    on_failure: manager
    recording: false
    vad: {start_sensitivity: low}
    http_tools:
      - name: check_order
        description: Look up the status of an order by its number.
        url: https://shop.example.com/api/orders/status
        method: get
        headers: {Authorization: "Bearer ${SHOP_TOKEN}"}
        parameters:
          type: object
          properties:
            order_id: {type: string, description: The order number}
          required: [order_id]
  - name: sales
    numbers: ["+15551230001", "+15551230002"]
    system_prompt: You sell pizza.
    voice: Kore
    model: gemini-3.1-flash-live-preview
    max_call_duration_s: 600
    tools: [end_call, send_dtmf]
    voicemail_message: Hi, this is Rosa's calling back about your order.
"""


@pytest.fixture
def settings() -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        gemini_model="gemini-3.8-live",
        voice="Kore",
        language="en-GB",
        system_prompt="Server default prompt.",
        vad_end_sensitivity="high",
        max_call_duration_s=1800,
        recording_enabled=True,
    )


def write(folder: Path, text: str, name: str = "profiles.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "front.md").write_text("You are the front desk.\n")
    (tmp_path / "docs").mkdir()
    return tmp_path


def load_error(path: Path, settings: Settings) -> str:
    with pytest.raises(ProfileError) as info:
        ProfileSet.load(path, settings)
    return str(info.value)


def test_full_file_loads_with_defaults_from_file_and_settings(folder, settings) -> None:
    profiles = ProfileSet.load(write(folder, FULL), settings)
    assert profiles.names == ["front-desk", "sales"]
    front, sales = profiles.profiles
    assert front.system_prompt == "You are the front desk."
    assert front.system_prompt_file == folder / "prompts" / "front.md"
    assert front.knowledge_dir == folder / "docs"
    assert front.voice == "Puck"  # from defaults:
    assert front.language == "en-GB" and front.model == "gemini-3.8-live"  # from settings
    assert front.vad.start_sensitivity == "low"  # own
    assert front.vad.silence_duration_ms == 700  # defaults:
    assert front.vad.end_sensitivity == "high"  # settings
    assert front.recording is False and front.max_call_duration_s == 1800
    assert front.transfer_targets["support"] == "sip:help@pbx.example.com"
    assert front.on_failure == "manager"
    assert front.http_tools[0].method == "GET"
    assert front.http_tools[0].env_vars() == ["SHOP_TOKEN"]
    assert front.tool_names == ["end_call", "transfer_call", "lookup", "check_order"]
    assert sales.system_prompt == "You sell pizza." and sales.system_prompt_file is None
    assert sales.voice == "Kore" and sales.model == "gemini-3.1-flash-live-preview"
    assert sales.greeting is None and sales.max_call_duration_s == 600


def test_mapping_form_and_settings_prompt(folder, settings) -> None:
    path = write(
        folder,
        """
        profiles:
          main: {numbers: ["+442071234567"]}
          other: {greeting: Hello!}
        """,
    )
    profiles = ProfileSet.load(path, settings)
    assert profiles.names == ["main", "other"]
    assert profiles.default.name == "main"  # none marked: the first
    assert profiles.get("other").system_prompt == "Server default prompt."
    assert profiles.get("other").tools == ["end_call"]


def test_matching_rules(folder, settings) -> None:
    profiles = ProfileSet.load(write(folder, FULL), settings)
    assert profiles.match("+15551230001", None).name == "sales"
    assert profiles.match("+15551230000", "sales").name == "sales"  # parameter wins
    assert profiles.match("+15550000000", None).name == "front-desk"  # default
    assert profiles.match(None, None).name == "front-desk"
    assert profiles.match("+15551230002", "no-such-profile").name == "sales"  # then the number
    assert profiles.match(" +15551230001 ", "").name == "sales"


def test_default_is_the_one_marked(folder, settings) -> None:
    path = write(
        folder,
        """
        profiles:
          - {name: a}
          - {name: b, default: true}
        """,
    )
    assert ProfileSet.load(path, settings).match("+15551230000", None).name == "b"


def test_default_from_settings(settings) -> None:
    profiles = ProfileSet.default_from_settings(settings)
    (only,) = profiles.profiles
    assert only.name == "default" and profiles.match("+15551230000", "x") is only
    assert only.system_prompt == "Server default prompt." and only.language == "en-GB"
    assert only.vad.end_sensitivity == "high" and only.tools == ["end_call"]


def test_error_names_file_profile_and_field(folder, settings) -> None:
    path = write(
        folder,
        """
        profiles:
          - name: front-desk
            tools: [end_call, transfer_call]
            transfer_targets: {manager: abc}
        """,
    )
    assert load_error(path, settings) == (
        f"{path}: profile 'front-desk': transfer_targets.manager: "
        "'abc' is not an E.164 number or sip: URI"
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "- {name: a, greting: hi}",
            "profile 'a': greting: unknown field (did you mean 'greeting'?)",
        ),
        (
            "- {name: a, numbers: ['555-1234']}",
            "profile 'a': numbers[0]: '555-1234' is not an E.164",
        ),
        ("- {name: a, tools: [fly]}", "profile 'a': tools[0]: Input should be 'end_call'"),
        (
            "- {name: a, tools: [transfer_call]}",
            "transfer_call is enabled but transfer_targets is empty",
        ),
        ("- {name: a, tools: [lookup]}", "lookup is enabled but knowledge_dir is not set"),
        (
            "- {name: a, on_failure: boss}",
            "on_failure: 'boss' is neither 'hangup' nor a transfer target",
        ),
        ("- {name: a, knowledge_dir: nowhere}", "profile 'a': knowledge_dir: "),
        ("- {name: a, system_prompt_file: missing.md}", "system_prompt_file: cannot read"),
        ("- {name: a, system_prompt: x, system_prompt_file: p.md}", "are both set"),
        (
            "- {name: a, max_call_duration_s: 0}",
            "max_call_duration_s: Input should be greater than 0",
        ),
        ("- {name: a, vad: {start_sensitivity: medium}}", "vad.start_sensitivity: Input should be"),
        ("- {name: 'bad name'}", "name: 'bad name' is not a valid profile name"),
        ("- {greeting: hi}", "profile '#1': name: required field is missing"),
        ("- {name: a}\n- {name: a}", "profile 'a' is defined 2 times"),
        (
            "- {name: a, numbers: ['+15551230000']}\n- {name: b, numbers: ['+15551230000']}",
            "profile 'b': numbers: +15551230000 is already answered by profile 'a'",
        ),
        (
            "- {name: a, default: true}\n- {name: b, default: true}",
            "more than one profile has default",
        ),
        (
            "- {name: a, http_tools: [{name: end_call, description: d, url: 'https://x.test'}]}",
            "http_tools[0].name: 'end_call' is the name of a built-in tool",
        ),
        (
            "- {name: a, http_tools: [{name: t, description: d, url: 'https://x.test',"
            " headers: {X-Key: '${NOT CLOSED'}}]}",
            "http_tools[0].headers: header X-Key: unclosed ${",
        ),
        (
            "- {name: a, http_tools: [{name: t, description: d, url: 'https://x.test',"
            " parameters: {type: string}}]}",
            "http_tools[0].parameters: must be a JSON schema with type: object",
        ),
        (
            "- {name: a, http_tools: [{name: t, description: d, url: 'https://x.test',"
            " parameters: {type: object, propertes: {}}}]}",
            "http_tools[0].parameters: not a JSON schema Gemini accepts: propertes",
        ),
        (
            "- {name: a, http_tools: [{name: t, description: d, url: 'https://x.test',"
            " timeout: 3}]}",
            "http_tools[0].timeout: unknown field (did you mean 'timeout_s'?)",
        ),
    ],
)
def test_invalid_profiles_are_explained(folder, settings, body: str, expected: str) -> None:
    (folder / "p.md").write_text("prompt")
    path = write(folder, "profiles:\n" + textwrap.indent(body, "  ") + "\n")
    message = load_error(path, settings)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_all_problems_reported_at_once(folder, settings) -> None:
    path = write(
        folder,
        """
        profiles:
          - {name: a, recording: maybe}
          - {name: b, voice: ""}
        """,
    )
    with pytest.raises(ProfileError) as info:
        ProfileSet.load(path, settings)
    assert len(info.value.problems) == 2
    assert "profile 'a': recording:" in info.value.problems[0]
    assert "profile 'b': voice:" in info.value.problems[1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("profiles: [\n  {name: a\n", "invalid YAML"),
        ("profiles:\n  - name: a\n   bad: indent\n", "line 3"),
        ("- just a list", "expected a mapping with a 'profiles' key"),
        ("profile: []", "unknown top-level key(s): profile"),
        ("profiles: []", "no profiles defined"),
        ("profiles: 3", "'profiles' must be a list or a mapping"),
        ("defaults: {numbers: []}\nprofiles: [{name: a}]", "defaults: numbers belong(s) in each"),
    ],
)
def test_file_level_errors(folder, settings, text: str, expected: str) -> None:
    assert expected in load_error(write(folder, text), settings)


def test_missing_file(folder, settings) -> None:
    assert "cannot read" in load_error(folder / "nope.yaml", settings)


def test_profiles_are_immutable(folder, settings) -> None:
    profile = ProfileSet.load(write(folder, FULL), settings).default
    assert isinstance(profile, AgentProfile)
    with pytest.raises(ValueError):
        profile.voice = "Charon"  # type: ignore[misc]


# ----------------------------------------------------------------- hot reload


def bump_mtime(path: Path) -> None:
    """Make the change visible even on filesystems with coarse timestamps."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_registry_without_file_uses_settings(settings) -> None:
    registry = ProfileRegistry(None, settings)
    assert registry.current.names == ["default"]
    assert registry.reload_now() is False


def test_registry_refuses_to_start_on_a_broken_file(folder, settings) -> None:
    with pytest.raises(ProfileError):
        ProfileRegistry(write(folder, "profiles: 3"), settings)


def test_reload_now_swaps_and_keeps_previous_on_error(folder, settings) -> None:
    path = write(folder, FULL)
    registry = ProfileRegistry(path, settings)
    assert registry.current.match("+15551230001", None).name == "sales"

    write(folder, FULL.replace("name: sales", "name: sales-v2"))
    assert registry.reload_now() is True
    assert registry.current.match("+15551230001", None).name == "sales-v2"

    write(folder, FULL.replace('"+15551239999"', "abc"))
    assert registry.reload_now() is False
    assert registry.current.names == ["front-desk", "sales-v2"]
    assert registry.last_error is not None
    assert "transfer_targets.manager" in str(registry.last_error)


async def test_run_watches_the_file(folder, settings) -> None:
    path = write(folder, FULL)
    registry = ProfileRegistry(path, settings, poll_interval_s=0.02)
    reloaded: asyncio.Queue[ProfileSet] = asyncio.Queue()
    failed: asyncio.Queue[ProfileError] = asyncio.Queue()
    registry.on_reload.append(reloaded.put_nowait)
    registry.on_error.append(failed.put_nowait)
    watcher = asyncio.create_task(registry.run())
    try:
        write(folder, FULL.replace("You sell pizza.", "You sell pasta."))
        bump_mtime(path)
        new = await asyncio.wait_for(reloaded.get(), 5)
        assert new.get("sales").system_prompt == "You sell pasta."
        assert registry.current is new

        write(folder, FULL + "\n  - {name: broken, tools: [fly]}\n")
        bump_mtime(path)
        error = await asyncio.wait_for(failed.get(), 5)
        assert "profile 'broken': tools[0]" in str(error)
        assert registry.current is new  # the previous profiles stay active

        # a prompt file pulled in by the profiles is watched too
        write(folder, FULL)
        bump_mtime(path)
        await asyncio.wait_for(reloaded.get(), 5)
        prompt = folder / "prompts" / "front.md"
        prompt.write_text("You are the NEW front desk.")
        bump_mtime(prompt)
        new = await asyncio.wait_for(reloaded.get(), 5)
        assert new.default.system_prompt == "You are the NEW front desk."
        assert failed.empty()
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
