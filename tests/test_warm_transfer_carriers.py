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


# ------------------------------------------------------------------------ pure pieces


def test_each_carrier_s_warm_dial_names_its_whisper_and_its_end() -> None:
    from livecall.carriers.plivo.answer import after_dial_xml, dial_xml, whisper_xml
    from livecall.carriers.telnyx.control import after_dial_texml, transfer_texml, whisper_texml
    from livecall.carriers.vonage.control import after_dial_ncco, transfer_ncco, whisper_ncco

    url, action = "https://x.example/c/whisper/tok", "https://x.example/c/transfer-ended"
    texml = ET.fromstring(transfer_texml(MANAGER, say=HOLD, whisper_url=url, dial_action=action))
    dial = texml.find("Dial")
    assert dial is not None and (dial.get("action"), dial.get("method")) == (action, "POST")
    number = texml.find("Dial/Number")
    assert number is not None and (number.get("url"), number.get("method")) == (url, "POST")
    cold = ET.fromstring(transfer_texml(MANAGER)).find("Dial/Number")
    assert cold is not None and cold.get("url") is None
    said = ET.fromstring(whisper_texml("<b>&", "en-GB")).find("Say")
    assert said is not None and (said.text, said.get("language")) == ("<b>&", "en-GB")
    assert [c.tag for c in ET.fromstring(after_dial_texml("no-answer", "Sorry."))] == [
        "Say",
        "Hangup",
    ]

    plivo = ET.fromstring(dial_xml("15551239999", confirm_sound=url, action=action)).find("Dial")
    assert plivo is not None and plivo.get("confirmSound") == url
    assert plivo.get("confirmKey") is None  # nothing to press: briefed, then bridged
    assert (plivo.get("action"), plivo.get("method")) == (action, "POST")
    speak = ET.fromstring(whisper_xml("brief", "en-US")).find("Speak")
    assert speak is not None and speak.get("language") == "en-US"
    assert [c.tag for c in ET.fromstring(after_dial_xml("completed", "Sorry."))] == ["Hangup"]

    [connect] = transfer_ncco(MANAGER, on_answer=url, event_url=action)
    assert connect["endpoint"] == [
        {"type": "phone", "number": MANAGER[1:], "onAnswer": {"url": url}}
    ]
    assert (connect["eventType"], connect["eventUrl"]) == ("synchronous", [action])
    [sip] = transfer_ncco("sip:desk@pbx.example", on_answer=url)
    assert "onAnswer" not in sip["endpoint"][0]  # Vonage's SIP endpoint has no onAnswer
    assert whisper_ncco("brief", "en-US") == [
        {"action": "talk", "text": "brief", "language": "en-US"}
    ]
    assert after_dial_ncco("busy", "Sorry.") == [{"action": "talk", "text": "Sorry."}]
    assert after_dial_ncco("answered", "Sorry.") is None
    assert after_dial_ncco("timeout", None) is None


def test_a_briefing_plays_only_for_its_carrier_and_call() -> None:
    stored = Briefing("brief", "CA1", "telnyx", "en-US")
    again = Briefing.loads(stored.dumps())
    assert again == stored
    assert again.refusal("telnyx", "CA1") is None
    assert again.refusal("telnyx", None) is None  # a fetch naming no parent
    assert again.refusal("telnyx", "CA2") == "minted for another call"
    assert again.refusal("plivo", "CA1") == "minted for another carrier"
    assert Briefing.loads("plain text") == Briefing("plain text")  # unbound (minted by hand)
