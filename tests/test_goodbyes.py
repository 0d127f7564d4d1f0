"""Goodbyes and handoff lines are heard before the line drops or moves, in either order.

A model may speak and then call `end_call`/`transfer_call`, or decide, call, and only then
speak. Either way the caller must hear the goodbye (or the handoff line) before the hang-up
(or the transfer): these tests check what the simulated caller HEARD, through the real
server, the real SDK against the fake Gemini Live (which honours `scheduling`: SILENT means
no words after the answer) and the fake Twilio REST API.
"""

from __future__ import annotations

import asyncio
import secrets
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from livecall.sim.gemini import Scenario, ToolCallFault, TurnEndFault
from livecall.sim.twilio import CallResult
from test_tools_e2e import (  # the REST fake, its stack and helpers
    MANAGER,
    fake_rest,
    live_call,
    make_stack,
    profiles_yaml,
    run_call,
)

__all__ = ["fake_rest", "make_stack"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(60)

# Each line sent as fast as it is made: the carrier queues it, so a busy test machine cannot
# starve the caller's playout and split the line with gaps (what is heard is the point here).
UNHURRIED: dict[str, Any] = {"greeting": None, "rate": None, "pause_prob": 0.0}

TRANSFER_PROFILE = profiles_yaml(
    tools=["end_call", "transfer_call"], transfer_targets={"manager": MANAGER}
)


def heard_whole(result: CallResult, audio: Any, clip: str) -> bool:
    """The caller heard `clip` from start to end (its pieces, spanning the whole clip)."""
    heard = result.heard_pcm()
    if audio.heard_share(heard, clip) < 0.85:
        return False
    start, end = audio.span_of(heard, clip)
    return (end - start) >= 0.95 * len(audio.phone_ref(clip))


def heard_end_t(result: CallResult, audio: Any, clip: str) -> float:
    """Loop time at which the caller had heard `clip` to its end."""
    _, end = audio.span_of(result.heard_pcm(), clip)
    assert result.stream_started is not None
    return result.stream_started + end / audio.RATE


def _hangup(record: Any) -> dict[str, Any]:
    return next(e for e in record.events if e.kind == "hangup").data


async def _end_call(make_stack: Any, fake: Any, fault: ToolCallFault, **scenario: Any) -> Any:
    stack = await make_stack(
        Scenario(seed=11, tool_calls=[fault], **UNHURRIED, **scenario),
        profiles_yaml(tools=["end_call"]),
    )
    sid = "CA" + secrets.token_hex(16)
    rest_call = live_call(fake, sid)
    from test_tools_e2e import say

    result, session, record = await run_call(stack, [say()], call_sid=sid, on_script_end="wait")
    async with asyncio.timeout(5):
        await rest_call.ended.wait()
    assert result.ended_by == "server" and record.end_reason == "agent_hangup"
    return result, session, record


@pytest.mark.parametrize("order", ["speak_then_call", "call_then_speak"])
async def test_end_call_goodbye_is_heard_before_the_hang_up(
    order: str, make_stack: Any, fake_rest: Any, audio: Any
) -> None:
    if order == "speak_then_call":
        fault = ToolCallFault(after_caller_turn=1, name="end_call", say_first="goodbye")
    else:  # the model answers the result with its goodbye (only if it may speak)
        fault = ToolCallFault(after_caller_turn=1, name="end_call", reply="goodbye")
    result, session, record = await _end_call(make_stack, fake_rest[0], fault)

    assert heard_whole(result, audio, "goodbye")  # heard before the drop
    scheduling = session.tool_responses[0].scheduling
    assert scheduling == ("SILENT" if order == "speak_then_call" else "WHEN_IDLE")
    assert _hangup(record)["goodbye_heard"] is True
    assert _hangup(record)["goodbye_by"] == "agent"
    # the order really was as named: the goodbye's audio came before/after the answer
    turn = session.turns[0]
    assert turn.first_audio_at is not None
    answered = session.tool_responses[0].received_at
    assert (turn.first_audio_at < answered) == (order == "speak_then_call")


async def test_end_call_waits_for_what_an_in_progress_turn_announced(
    make_stack: Any, fake_rest: Any, audio: Any
) -> None:
    # the model speaks, calls end_call, and its turn ends with interactionStatus IN_PROGRESS:
    # its goodbye follows 1.5 s later (a turn of its own, ending IDLE); the hang-up waits
    fault = ToolCallFault(after_caller_turn=1, name="end_call", say_first="one_moment")
    end = TurnEndFault(
        reply=1, reason=None, speak=True, interaction_status="IN_PROGRESS",
        then="goodbye", then_after=1.5,
    )  # fmt: skip
    result, session, record = await _end_call(make_stack, fake_rest[0], fault, turn_ends=[end])
    assert session.tool_responses[0].scheduling == "SILENT"  # it had spoken: no words asked
    assert heard_whole(result, audio, "one_moment")
    assert heard_whole(result, audio, "goodbye")  # not cut off by an "idle" hang-up
    assert _hangup(record)["goodbye_heard"] is True


async def test_end_call_without_a_word_plays_the_recorded_goodbye(
    make_stack: Any, fake_rest: Any, audio: Any
) -> None:
    fault = ToolCallFault(after_caller_turn=1, name="end_call")  # and no words after the answer
    started = asyncio.get_running_loop().time()
    result, _, record = await _end_call(make_stack, fake_rest[0], fault, replies={"yes": None})
    assert heard_whole(result, audio, "goodbye")
    assert _hangup(record) | {} == {
        "by": "agent",
        "reason": "the agent ended the call",
        "goodbye_heard": True,
        "goodbye_by": "recorded",
    }
    # bounded: the model's chance to speak (3 s), then the 1.8 s line, then the hang-up
    assert result.ended - started < 15


@pytest.mark.parametrize("order", ["speak_then_call", "call_then_speak"])
async def test_transfer_line_is_heard_before_the_transfer(
    order: str, make_stack: Any, fake_rest: Any, audio: Any
) -> None:
    fake = fake_rest[0]
    loop = asyncio.get_running_loop()
    updated_at: list[float] = []
    fake.on_update = lambda call, twiml: updated_at.append(loop.time())
    args = {"target": "manager"}
    if order == "speak_then_call":
        fault = ToolCallFault(1, name="transfer_call", args=args, say_first="one_moment")
    else:
        fault = ToolCallFault(1, name="transfer_call", args=args, reply="one_moment")
    scenario = Scenario(seed=12, tool_calls=[fault], **UNHURRIED)
    stack = await make_stack(scenario, TRANSFER_PROFILE)
    sid = "CA" + secrets.token_hex(16)
    rest_call = live_call(fake, sid)
    from test_tools_e2e import say

    result, session, record = await run_call(stack, [say()], call_sid=sid, on_script_end="wait")

    dial = ET.fromstring(rest_call.twiml_history[0]).find("Dial")
    assert dial is not None and dial.findtext("Number") == MANAGER
    assert heard_whole(result, audio, "one_moment")
    assert updated_at and heard_end_t(result, audio, "one_moment") <= updated_at[0] + 0.05
    assert record.end_reason == "transferred"
    transfer = next(e for e in record.events if e.kind == "transfer")
    assert transfer.data["ok"] is True and transfer.data["line_heard"] is True
    if order == "call_then_speak":
        assert session.tool_responses[0].scheduling == "WHEN_IDLE"


def test_call_control_answers_let_the_model_speak_only_when_it_has_not() -> None:
    """SILENT after a goodbye already said; WHEN_IDLE when the call came before any word."""
    from livecall.agent.tools import function_response

    for name in ("end_call", "transfer_call"):
        spoke = function_response("fc-1", name, {"result": "ok"}, spoke_first=True)
        silent = function_response("fc-2", name, {"result": "ok"}, spoke_first=False)
        assert (spoke["scheduling"], silent["scheduling"]) == ("SILENT", "WHEN_IDLE")
    lookup = function_response("fc-3", "lookup", {}, spoke_first=True)
    assert lookup["scheduling"] == "WHEN_IDLE"
