"""Warm transfers (issue 14, item 4): the person answering is briefed before the caller joins.

End to end through the real server, the fake Gemini Live and the fake Twilio REST API, which
plays the callee: on a redirect that dials a `<Number url>` it fetches that URL signed like
Twilio and keeps what the callee heard. The briefing lives behind a single-use token (never
in a URL), with Redis in the cluster store so any instance answers it once.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from livecall.agent.profiles import AgentProfile, ProfileError, ProfileSet
from livecall.agent.tools import function_declarations
from livecall.cluster import ClusterRegistry, LocalRegistry
from livecall.sim.gemini import Scenario, ToolCallFault
from livecall.telephony.twilio_rest import transfer_twiml
from livecall.telephony.whisper import (
    TRANSFER_ENDED_PATH,
    WHISPER_PATH,
    Briefing,
    Whispers,
    after_dial_twiml,
    clean_summary,
    fallback_summary,
    whisper_twiml,
)
from support import redis_reachable, service_missing
from test_goodbyes import UNHURRIED, heard_end_t, heard_whole
from test_leaks import capture_logs, json_lines
from test_tools_e2e import MANAGER, fake_rest, live_call, make_stack, profiles_yaml, run_call, say

__all__ = ["capture_logs", "fake_rest", "make_stack"]  # fixtures, used by name

SUMMARY = "Dana Whitfield wants to move her Friday booking for six to Saturday at eight."
HOLD = "Please hold while I connect you."
NO_ANSWER = "Sorry, the manager could not take your call. Please call again after five."
REDIS_URL = os.environ.get("LIVECALL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WARM_PROFILE = profiles_yaml(
    tools=["end_call", "transfer_call"],
    transfer_targets={"manager": MANAGER, "support": "sip:help@pbx.example.com"},
    transfer={"mode": "warm", "hold_message": HOLD, "no_answer_message": NO_ANSWER},
)


def _profile(tmp_path: Path, **extra: Any) -> AgentProfile:
    text = profiles_yaml(tools=["transfer_call"], transfer_targets={"manager": MANAGER}, **extra)
    path = tmp_path / f"profiles-{secrets.token_hex(4)}.yaml"
    path.write_text(text)
    return ProfileSet.load(path).default


# ------------------------------------------------------------------------ pure pieces


def test_warm_transfer_twiml_holds_the_caller_and_points_the_callee_at_the_whisper() -> None:
    url = "https://calls.example.com/twilio/whisper/tok"
    action = "https://calls.example.com/twilio/transfer-ended?profile=agent"
    root = ET.fromstring(transfer_twiml(MANAGER, HOLD, whisper_url=url, dial_action=action))
    assert [child.tag for child in root] == ["Say", "Dial"]  # the hold line, then the dial
    dial = root.find("Dial")
    assert dial is not None and (dial.get("action"), dial.get("method")) == (action, "POST")
    number = root.find("Dial/Number")
    assert number is not None and number.text == MANAGER
    assert (number.get("url"), number.get("method")) == (url, "POST")
    sip = ET.fromstring(transfer_twiml("sip:help@pbx.example.com", whisper_url=url)).find(
        "Dial/Sip"
    )
    assert sip is not None and sip.get("url") == url
    # cold: exactly what it was
    assert transfer_twiml(MANAGER) == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Dial><Number>'
        f"{MANAGER}</Number></Dial></Response>"
    )


def test_summary_is_one_bounded_line_and_the_fallback_says_nothing_from_the_call() -> None:
    assert clean_summary("  Dana\n\twants\x00 a table ") == "Dana wants a table"
    assert clean_summary(" \n ") is None and clean_summary(None) is None
    long = clean_summary("word " * 200)
    assert long is not None and len(long) <= 401
    assert fallback_summary("front-desk", "+15550001111", "manager") == (
        "Transfer from the front-desk line: a caller from 1 5 5 5 0 0 0 1 1 1 1 asked for manager."
    )
    unknown = fallback_summary("x", None, "manager")
    assert unknown == "Transfer from the x line: a caller asked for manager."
    said = ET.fromstring(whisper_twiml("<b>&")).findtext("Say")
    assert said == "<b>&"  # escaped in the XML, intact when spoken
    spoken = ET.fromstring(whisper_twiml("brief", "en-GB")).find("Say")
    assert spoken is not None and spoken.get("language") == "en-GB"  # the profile's language


def test_after_the_dial_the_caller_hears_sorry_only_when_no_one_took_the_call() -> None:
    def verbs(status: str) -> list[tuple[str, str | None]]:
        return [(c.tag, c.text) for c in ET.fromstring(after_dial_twiml(status, "Sorry."))]

    assert verbs("completed") == [("Hangup", None)]  # after a conversation: nothing more
    for status in ("no-answer", "busy", "failed", "canceled", ""):
        assert verbs(status) == [("Say", "Sorry."), ("Hangup", None)]
    assert [c.tag for c in ET.fromstring(after_dial_twiml("busy", None))] == ["Hangup"]


async def test_whispers_answer_a_token_once_and_not_after_it_expires() -> None:
    now = [100.0]
    whispers = Whispers(LocalRegistry(), ttl_s=60, clock=lambda: now[0])
    token = await whispers.put("briefing")
    assert len(token) >= 40 and "briefing" not in token
    assert await whispers.take(token) == "briefing"
    assert await whispers.take(token) is None  # single use
    late = await whispers.put("late")
    now[0] += 61
    assert await whispers.take(late) is None  # expired
    assert await whispers.take("../../etc") is None  # not a token's shape
    assert await whispers.take(secrets.token_urlsafe(32)) is None


async def test_a_briefing_is_answered_once_by_whichever_instance_twilio_reaches() -> None:
    if not await redis_reachable(REDIS_URL):
        service_missing(f"Redis is not reachable at {REDIS_URL}")
    prefix = f"lc-test-{secrets.token_hex(4)}"
    one = ClusterRegistry(REDIS_URL, prefix=prefix, heartbeat_s=1, ttl_s=5)
    two = ClusterRegistry(REDIS_URL, prefix=prefix, heartbeat_s=1, ttl_s=5)
    await one.start()
    await two.start()
    try:
        here, there = Whispers(one), Whispers(two)
        token = await here.put("briefing")
        assert await there.take(token) == "briefing"  # the other instance answers ...
        assert await here.take(token) is None  # ... and the minting one no longer does
        assert await there.take(token) is None
    finally:
        await one.stop()
        await two.stop()


async def test_without_redis_a_briefing_is_kept_here() -> None:
    """REDIS_URL set but Redis away: the briefing is still answered, once, from memory."""
    away = ClusterRegistry("redis://127.0.0.1:1/0", op_timeout_s=0.2)  # never started
    whispers = Whispers(away)
    token = await whispers.put("briefing")
    assert await whispers.take(token) == "briefing"
    assert await whispers.take(token) is None


def test_summary_is_declared_only_for_warm_transfers(tmp_path: Path) -> None:
    def params(profile: AgentProfile) -> dict[str, Any]:
        [decl] = [d for d in function_declarations(profile) if d.name == "transfer_call"]
        assert decl.parameters is not None
        return {"props": set(decl.parameters.properties or {}), "req": decl.parameters.required}

    assert params(_profile(tmp_path)) == {"props": {"target"}, "req": ["target"]}
    warm = params(_profile(tmp_path, transfer={"mode": "warm"}))
    assert warm == {"props": {"target", "summary"}, "req": ["target"]}


def test_transfer_settings_in_profiles(tmp_path: Path) -> None:
    assert _profile(tmp_path).transfer.mode == "cold"  # existing files stay valid and cold
    assert _profile(tmp_path, transfer={"mode": "warm"}).transfer.hold_message
    with pytest.raises(ProfileError, match="transfer"):
        _profile(tmp_path, transfer={"mode": "lukewarm"})


# ------------------------------------------------------------------------ end to end


def _dialled(twiml: str) -> ET.Element:
    root = ET.fromstring(twiml)
    number = root.find("Dial/Number")
    assert number is not None
    return number


@pytest.mark.timeout(60)
async def test_warm_transfer_briefs_the_callee_with_the_model_s_summary(
    make_stack: Any, fake_rest: Any, audio: Any, capture_logs: Any
) -> None:
    logs = capture_logs("json")
    fake, _ = fake_rest
    loop = asyncio.get_running_loop()
    updated_at: list[float] = []
    fake.on_update = lambda call, twiml: updated_at.append(loop.time())
    args = {"target": "manager", "summary": SUMMARY}
    fault = ToolCallFault(1, name="transfer_call", args=args, say_first="one_moment")
    stack = await make_stack(Scenario(seed=41, tool_calls=[fault], **UNHURRIED), WARM_PROFILE)
    sid = "CA" + secrets.token_hex(16)
    rest_call = live_call(fake, sid)

    result, session, record = await run_call(stack, [say()], call_sid=sid, on_script_end="wait")
    async with asyncio.timeout(10):
        await fake.drain()

    # the caller heard the handoff line before the redirect, then the hold line from Twilio
    assert heard_whole(result, audio, "one_moment")
    assert updated_at and heard_end_t(result, audio, "one_moment") <= updated_at[0] + 0.05
    [twiml] = rest_call.twiml_history
    assert ET.fromstring(twiml)[0].text == HOLD
    number = _dialled(twiml)
    assert number.text == MANAGER
    url = number.get("url") or ""
    assert urlsplit(url).path.startswith(WHISPER_PATH + "/")
    assert url.startswith(stack.base_url)
    assert "Dana" not in twiml and "Saturday" not in twiml  # never the summary in a URL
    # the callee answered: Twilio's signed request got the briefing
    [whisper] = fake.whispers
    assert whisper.status_code == 200, whisper
    assert whisper.form["ParentCallSid"] == sid
    assert whisper.said == [SUMMARY]
    # the token is single-use, and an unsigned request is refused before it is even looked up
    again = await fake.fetch_whisper(rest_call, MANAGER, url)
    assert (again.status_code, again.twiml) == (404, None)
    unsigned = await fake.fetch_whisper(rest_call, MANAGER, url, signed=False)
    assert unsigned.status_code == 403
    # the conversation with the manager ends: the caller's leg hangs up, no "sorry"
    dial = ET.fromstring(twiml).find("Dial")
    assert dial is not None and (dial.get("action") or "").startswith(
        stack.base_url + TRANSFER_ENDED_PATH
    )
    ended = await fake.end_dial(rest_call, "completed")
    assert (ended.status_code, ended.verbs) == (200, ["Hangup"])
    assert record.end_reason == "transferred"
    transfer = next(e for e in record.events if e.kind == "transfer")
    assert transfer.data == {
        "target": "manager",
        "number": MANAGER,
        "ok": True,
        "line_heard": True,
        "warm": True,
    }
    assert session.tool_responses[0].scheduling == "SILENT"
    # LOG_TRANSCRIPTS is off: the briefing is in no log line
    lines = json_lines(logs)
    assert any(line["event"] == "twilio.whisper" for line in lines)
    assert "Dana" not in logs.getvalue() and "Saturday" not in logs.getvalue()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("target", "noun"), [("manager", "Number"), ("support", "Sip")])
async def test_warm_transfer_without_a_summary_briefs_with_line_and_number(
    target: str, noun: str, make_stack: Any, fake_rest: Any, audio: Any
) -> None:
    fake, _ = fake_rest
    fault = ToolCallFault(1, name="transfer_call", args={"target": target}, reply="one_moment")
    stack = await make_stack(Scenario(seed=42, tool_calls=[fault], **UNHURRIED), WARM_PROFILE)
    sid = "CA" + secrets.token_hex(16)
    rest_call = live_call(fake, sid)

    result, session, record = await run_call(stack, [say()], call_sid=sid, on_script_end="wait")
    async with asyncio.timeout(10):
        await fake.drain()

    assert heard_whole(result, audio, "one_moment")  # decide, call, then speak: still heard
    assert session.tool_responses[0].scheduling == "WHEN_IDLE"
    dialled = ET.fromstring(rest_call.twiml_history[0]).find(f"Dial/{noun}")
    assert dialled is not None and dialled.get("url")
    [whisper] = fake.whispers
    assert whisper.said == [fallback_summary("agent", rest_call.from_, target)]
    assert "1 5 5 5 0 0 0 1 1 1 1" in whisper.said[0]  # the caller's number, digit by digit
    assert record.end_reason == "transferred"
    # no one took it: the caller is told so (the profile's message), then the call ends
    ended = await fake.end_dial(rest_call, "no-answer")
    assert ended.status_code == 200
    assert (ended.verbs, ended.said) == (["Say", "Hangup"], [NO_ANSWER])


@pytest.mark.timeout(30)
async def test_an_unsigned_whisper_request_is_refused_and_does_not_spend_the_token(
    make_stack: Any, fake_rest: Any
) -> None:
    fake, _ = fake_rest
    stack = await make_stack(Scenario(seed=44), WARM_PROFILE)
    token = await stack.app.state.livecall.whispers.put(SUMMARY)
    url = f"{stack.base_url}{WHISPER_PATH}/{token}"
    call = live_call(fake, "CA" + secrets.token_hex(16))

    unsigned = await fake.fetch_whisper(call, MANAGER, url, signed=False)
    assert (unsigned.status_code, unsigned.twiml) == (403, None)
    forged = await fake.fetch_whisper(call, MANAGER, url.replace(token, token[::-1]))
    assert forged.status_code == 404  # signed, but no such token
    signed = await fake.fetch_whisper(call, MANAGER, url)
    assert (signed.status_code, signed.said) == (200, [SUMMARY])
    # a briefing minted for one call is not played on another call's dial
    whispers = stack.app.state.livecall.whispers
    bound = await whispers.put(Briefing(SUMMARY, call.sid, "twilio").dumps())
    stranger = await fake.fetch_whisper(
        call, MANAGER, f"{stack.base_url}{WHISPER_PATH}/{bound}", parent="CA" + "0" * 32
    )
    assert (stranger.status_code, stranger.twiml) == (403, None)
    elsewhere = await whispers.put(Briefing(SUMMARY, call.sid, "telnyx").dumps())
    wrong_door = await fake.fetch_whisper(
        call, MANAGER, f"{stack.base_url}{WHISPER_PATH}/{elsewhere}"
    )
    assert wrong_door.status_code == 403  # a Telnyx call's briefing: not at Twilio's door
    async with httpx.AsyncClient() as client:  # the dial's action is Twilio's door too
        form = {"CallSid": call.sid, "DialCallStatus": "completed"}
        ended = await client.post(f"{stack.base_url}{TRANSFER_ENDED_PATH}", data=form)
    assert ended.status_code == 403


@pytest.mark.timeout(60)
async def test_cold_transfer_dials_without_a_whisper(make_stack: Any, fake_rest: Any) -> None:
    fake, _ = fake_rest
    args = {"target": "manager", "summary": SUMMARY}  # not declared: dropped, not used
    fault = ToolCallFault(1, name="transfer_call", args=args, say_first="one_moment")
    profile = profiles_yaml(tools=["transfer_call"], transfer_targets={"manager": MANAGER})
    stack = await make_stack(Scenario(seed=43, tool_calls=[fault], **UNHURRIED), profile)
    sid = "CA" + secrets.token_hex(16)
    rest_call = live_call(fake, sid)

    _, _, record = await run_call(stack, [say()], call_sid=sid, on_script_end="wait")
    async with asyncio.timeout(10):
        await fake.drain()

    [twiml] = rest_call.twiml_history
    assert [child.tag for child in ET.fromstring(twiml)] == ["Dial"]
    assert _dialled(twiml).get("url") is None and fake.whispers == []
    dial = ET.fromstring(twiml).find("Dial")
    assert dial is not None and dial.get("action") is None
    transfer = next(e for e in record.events if e.kind == "transfer")
    assert "warm" not in transfer.data and record.end_reason == "transferred"
