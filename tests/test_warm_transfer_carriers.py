"""Warm transfers on Telnyx, Plivo and Vonage, end to end through the real server.

Each carrier's fake REST API plays its callee the way the carrier documents it: Telnyx runs
the TeXML `<Number url>` (TwiML's mirror), Plivo fetches the `<Dial confirmSound>` and plays
its `<Speak>`, Vonage requests the connect endpoint's `onAnswer` NCCO; each fetch is signed
like the carrier's webhooks. The briefing sits behind a single-use token at
`/<carrier>/whisper/<token>`, bound to the call and carrier it was minted for; the dial's end
(`<Dial action>`, Plivo's `DialStatus`, Vonage's synchronous connect `eventUrl`) gives the
caller the profile's no-answer line when no one took the call.
"""

from __future__ import annotations

import json
import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from livecall.sim.gemini import Scenario, ToolCallFault
from livecall.sim.stack import LocalStack
from livecall.telephony.whisper import Briefing
from support import say
from test_carrier_control_e2e import LINES, Line

SUMMARY = "Dana Whitfield wants to move her Friday booking for six to Saturday at eight."
HOLD = "Please hold while I connect you."
NO_ANSWER = "Sorry, the manager could not take your call. Please call again after five."
MANAGER = "+15551239999"


@dataclass(frozen=True)
class Warm:
    """How one carrier's fake shows a warm transfer."""

    line: Line
    no_answer: str  # the carrier's status for a dial no one took

    @property
    def name(self) -> str:
        return self.line.name

    def dial_document(self, fake: Any, call_id: str) -> str:
        """The document the caller's leg ran for the transfer."""
        call = fake.calls[call_id]
        if self.name == "telnyx":
            return str(call.texml_history[-1])
        if self.name == "plivo":
            return str(call.dial_xml)
        [request] = [r for r in fake.requests if r.path.endswith(f"/v1/calls/{call_id}")]
        return json.dumps(request.body["destination"]["ncco"])

    def whisper_url(self, document: str) -> str:
        if self.name == "vonage":
            connect = json.loads(document)[-1]
            return str(connect["endpoint"][0]["onAnswer"]["url"])
        dial = ET.fromstring(document).find("Dial")
        assert dial is not None
        if self.name == "plivo":
            return dial.get("confirmSound", "")
        return next(noun.get("url", "") for noun in dial)


WARM = [
    Warm(next(line for line in LINES if line.name == name), no_answer)
    for name, no_answer in (("telnyx", "no-answer"), ("plivo", "no-answer"), ("vonage", "busy"))
]


@pytest.fixture(params=WARM, ids=[w.name for w in WARM])
def warm(request: pytest.FixtureRequest) -> Warm:
    return request.param


@pytest.fixture
async def make_stack(tmp_path: Path) -> Any:
    stacks: list[LocalStack] = []

    async def make(carrier: str, scenario: Scenario) -> LocalStack:
        home = tmp_path / f"stack{len(stacks)}"
        home.mkdir()
        profile = {
            "name": "agent",
            "default": True,
            "system_prompt": "You answer the phone for Bella Vista.",
            "tools": ["transfer_call"],
            "transfer_targets": {"manager": MANAGER},
            "transfer": {"mode": "warm", "hold_message": HOLD, "no_answer_message": NO_ANSWER},
        }
        (home / "profiles.yaml").write_text(yaml.safe_dump({"profiles": [profile]}))
        stack = LocalStack(
            scenario=scenario,
            carrier_apis=(carrier,),
            settings_overrides={
                "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
                "recordings_dir": home / "recordings",
                "spool_dir": home / "spool",
                "profiles_file": home / "profiles.yaml",
                "vad_silence_duration_ms": 300,
                "recording_enabled": False,
            },
        )
        stacks.append(stack)
        await stack.start()
        return stack

    try:
        yield make
    finally:
        for stack in reversed(stacks):
            await stack.stop()


def transfer_with_summary() -> Scenario:
    args = {"target": "manager", "summary": SUMMARY}
    fault = ToolCallFault(1, name="transfer_call", args=args, say_first="one_moment")
    return Scenario(seed=21, greeting=None, pause_prob=0.0, tool_calls=[fault])


@pytest.mark.timeout(60)
async def test_the_callee_is_briefed_then_the_dial_end_is_handled(
    warm: Warm, make_stack: Any, call_over: Any
) -> None:
    stack = await make_stack(warm.name, transfer_with_summary())
    caller = warm.line.make(stack, [say("hours")], seed=2, on_script_end="wait", timeout=30)
    result = await caller.run()
    await call_over(stack)
    fake = stack.fakes[warm.name]
    await fake.drain()

    assert result.transferred_to == warm.line.dialled
    document = warm.dial_document(fake, result.call_sid)
    assert "Dana" not in document and "Saturday" not in document  # never in a URL
    url = warm.whisper_url(document)
    assert url.startswith(f"{stack.base_url}/{warm.name}/whisper/")
    # the callee picked up: the carrier's signed fetch got the briefing, once
    [whisper] = fake.whispers
    assert (whisper.status_code, whisper.error, whisper.said) == (200, None, [SUMMARY])
    record = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
    assert record is not None and record.end_reason == "transferred"
    [transfer] = [e.data for e in record.events if e.kind == "transfer"]
    assert transfer["warm"] is True
    # the dial ends: after a conversation nothing more; when no one took it, the line
    call = fake.calls[result.call_sid]
    talked = await fake.end_dial(call, "completed" if warm.name != "vonage" else "answered")
    if warm.name == "vonage":
        assert (talked.status_code, talked.body) == (204, None)  # nothing replaces the call
    else:
        assert (talked.status_code, talked.verbs, talked.said) == (200, ["Hangup"], [])
    missed = await fake.end_dial(call, warm.no_answer)
    assert missed.status_code == 200 and missed.said == [NO_ANSWER]


@pytest.mark.timeout(60)
async def test_whisper_replayed_unsigned_or_for_another_call_is_refused(
    warm: Warm, make_stack: Any, call_over: Any
) -> None:
    """Attacks on the whisper door: a token is answered once, only to the carrier's signed
    request, only for the call (and carrier) it was minted for."""
    stack = await make_stack(warm.name, transfer_with_summary())
    caller = warm.line.make(stack, [say("hours")], seed=3, on_script_end="wait", timeout=30)
    result = await caller.run()
    await call_over(stack)
    fake = stack.fakes[warm.name]
    await fake.drain()
    call = fake.calls[result.call_sid]
    url = warm.whisper_url(warm.dial_document(fake, result.call_sid))
    assert fake.whispers[0].status_code == 200

    replayed = await fake.fetch_whisper(call, MANAGER, url)
    assert (replayed.status_code, replayed.said) == (404, [])  # used once: gone

    whispers = stack.app.state.livecall.whispers
    base = f"{stack.base_url}/{warm.name}/whisper/"

    async def minted(call_id: str, carrier: str) -> str:
        return base + await whispers.put(Briefing(SUMMARY, call_id, carrier).dumps())

    fresh = await minted(result.call_sid, warm.name)
    unsigned = await fake.fetch_whisper(call, MANAGER, fresh, signed=False)
    assert unsigned.status_code == 403  # refused before the token is even looked up
    other_carrier = await fake.fetch_whisper(call, MANAGER, await minted(result.call_sid, "x"))
    assert (other_carrier.status_code, other_carrier.said) == (403, [])
    if warm.name != "vonage":  # the fetch names the caller's call: another call's is refused
        other = await minted("CA" + secrets.token_hex(16), warm.name)
        stranger = await fake.fetch_whisper(call, MANAGER, other)
        assert (stranger.status_code, stranger.said) == (403, [])
    signed = await fake.fetch_whisper(call, MANAGER, fresh)  # the unsigned try spent nothing
    assert (signed.status_code, signed.said) == (200, [SUMMARY])
    assert urlsplit(fresh).path.count("/") == 3
