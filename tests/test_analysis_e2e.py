"""Post-call analysis and caller memory on live calls: the real server, the fake Gemini (Live
and generateContent over TLS, through the real SDK) and a simulated caller.

Analysis: a booking call is analysed after it ends (summary, the profile's fields, success
against its goal), stored, shown in the API and on the dashboard; an answer outside the schema
and HTTP errors are retried, then the analysis fails with a reason and no transcript text;
a slow analysis never holds the call; pending work survives a restart. Memory: a second call
from the same number starts with the first call's summary in the system instruction, another
number and an anonymous caller get nothing, and deleting the number's memory (API) forgets it.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import structlog.testing
import yaml

from livecall.sim.clips import load_clip
from livecall.sim.gemini import Scenario, SessionRecord
from livecall.sim.gemini_text import TextFault
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import (
    CallResult,
    HangUp,
    Pause,
    Say,
    WaitForAgentAudio,
    WaitForAgentSilence,
)
from support import eventually

TOKEN = "analysis-test-token-0123456789"
CALLER = "+15551230000"
OTHER = "+15557770000"
TO = "+15559870000"
FIELDS = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "party_size": {"type": "integer"},
        "time": {"type": "string"},
        "callback_number": {"type": ["string", "null"]},
    },
    "required": ["name"],
}
GOAL = "A table is booked with a name, a party size and a time."
BISTRO: dict[str, Any] = {
    "name": "bistro",
    "default": True,
    "system_prompt": "You take table bookings for Bella Vista.",
    "greeting": "Thank you for calling Bella Vista.",
    "analysis": {"enabled": True, "goal": GOAL, "fields": FIELDS},
    "memory": {"enabled": True, "max_calls": 3, "max_age_days": 30},
}
pytestmark = pytest.mark.timeout(120)


def write_profiles(path: Path, *profiles: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"profiles": list(profiles)}, sort_keys=False))
    return path


async def start(make_stack: Any, tmp_path: Path, **overrides: Any) -> LocalStack:
    settings: dict[str, Any] = {
        "profiles_file": write_profiles(tmp_path / "profiles.yaml", BISTRO),
        "api_token": TOKEN,
        "vad_silence_duration_ms": 400,
        "analysis_retry_delay_s": 0.05,
        "analysis_poll_interval_s": 0.2,
        **overrides,
    }
    return await make_stack(Scenario(seed=3), **settings)


async def booking_call(stack: LocalStack, from_: str = CALLER) -> CallResult:
    """The demo's call: books a table for four at seven thirty under Garcia; confirmed."""
    book, book_rate = load_clip("book")
    when, when_rate = load_clip("time")
    script = [
        WaitForAgentAudio(min_heard_ms=500, timeout=15),
        WaitForAgentSilence(silence_ms=400, timeout=15),
        Say(book, rate=book_rate, label="book"),
        WaitForAgentAudio(min_heard_ms=2500, timeout=15),
        Say(when, rate=when_rate, label="time"),
        WaitForAgentSilence(silence_ms=900, timeout=20),
        HangUp(),
    ]
    result = await stack.caller(script, from_=from_, to=TO).run()
    assert result.script_errors == [] and result.protocol_errors == []
    return result


async def quick_call(stack: LocalStack, from_: str = CALLER) -> CallResult:
    """A short call with something said: the caller asks the opening hours over the greeting,
    hears the start of the answer and hangs up."""
    hours, rate = load_clip("hours")
    script = [
        WaitForAgentAudio(min_heard_ms=300, timeout=15),
        Say(hours, rate=rate, label="hours"),
        WaitForAgentAudio(min_heard_ms=300, timeout=15),
        HangUp(),
    ]
    result = await stack.caller(script, from_=from_, to=TO).run()
    assert result.script_errors == [] and result.protocol_errors == []
    return result


async def short_call(stack: LocalStack, from_: str) -> SessionRecord:
    """A call that only hears the greeting; the Gemini session it opened."""
    before = len(stack.gemini.sessions)
    script = [WaitForAgentAudio(min_heard_ms=300, timeout=15), Pause(200), HangUp()]
    result = await stack.caller(script, from_=from_, to=TO).run()
    assert result.script_errors == []
    [session] = stack.gemini.sessions[before:]
    return session


def api(stack: LocalStack) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )


async def analysis_when(
    stack: LocalStack, call_sid: str, status: str, within: float = 20
) -> dict[str, Any]:
    async with api(stack) as client:

        async def check() -> dict[str, Any] | None:
            record = (await client.get(f"/api/calls/{call_sid}")).json()
            analysis = record.get("analysis")
            return analysis if analysis and analysis["status"] == status else None

        return await eventually(check, within)


def instruction(session: SessionRecord) -> str:
    assert session.setup is not None
    parts = session.setup["systemInstruction"]["parts"]
    return "".join(p.get("text", "") for p in parts)


# --------------------------------------------------------------------------- analysis


async def test_a_booking_call_is_analysed_stored_and_shown(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    stack = await start(make_stack, tmp_path)
    result = await booking_call(stack)
    await call_over(stack)
    analysis = await analysis_when(stack, result.call_sid, "done")
    assert analysis["fields"] == {
        "name": "Garcia",
        "party_size": 4,
        "time": "seven thirty tonight",
        "callback_number": None,
    }
    assert analysis["success"] is True and analysis["success_reason"]
    assert "Garcia" in analysis["summary"] and analysis["attempts"] == 1
    assert analysis["model"] == "gemini-3.5-flash" and analysis["error"] is None
    # what the SDK sent: the transcript, a JSON response schema with the profile's fields,
    # and the goal in the system instruction
    [request] = stack.gemini.text.requests
    assert request.model == "gemini-3.5-flash" and request.has_api_key
    assert "caller: Hi, I'd like to book a table for four people tonight." in request.text
    config = request.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"]["properties"]["fields"] == FIELDS
    assert GOAL in request.body["systemInstruction"]["parts"][0]["text"]
    # the dashboard: the call page and the list
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as browser:
        signed = await browser.post("/login", data={"token": TOKEN, "next": "/"})
        assert signed.status_code == 303
        page = (await browser.get(f"/calls/{result.call_sid}")).text
        assert 'id="analysis-summary"' in page and "Garcia" in page
        assert "goal reached" in page and "party size" in page
        listing = (await browser.get("/")).text
        row = re.search(rf'data-sid="{result.call_sid}".*?</tr>', listing, re.S)
        assert row is not None and "goal reached" in row.group(0)
        # the caller is remembered; "Forget this caller" erases it
        assert f"The agents remember 1 call with {CALLER}." in page
        csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
        assert csrf is not None
        action = "/callers/%2B15551230000/memory/delete"
        assert f'action="{action}"' in page
        refused = await browser.post(action, data={"call_sid": result.call_sid})
        assert refused.status_code == 403  # no CSRF token
        forgot = await browser.post(
            action, data={"csrf": csrf.group(1), "call_sid": result.call_sid}
        )
        assert forgot.status_code == 303
        assert forgot.headers["location"] == f"/calls/{result.call_sid}?forgotten=1"
        after = (await browser.get(forgot.headers["location"])).text
        assert 'id="forgotten"' in after and 'id="remembered"' not in after


async def test_an_answer_outside_the_schema_is_retried_then_the_analysis_fails(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    stack = await start(make_stack, tmp_path, analysis_max_attempts=3)
    stack.gemini.text.fail_next(TextFault("off_schema", times=2), TextFault("invalid_json"))
    with structlog.testing.capture_logs() as logs:
        result = await quick_call(stack)
        await call_over(stack)
        analysis = await analysis_when(stack, result.call_sid, "failed")
    ours = [e for e in logs if str(e["event"]).startswith(("analysis.", "memory."))]
    assert [e["event"] for e in ours] == ["analysis.retry", "analysis.retry", "analysis.failed"]
    assert not [e for e in ours if "Sundays" in repr(e)]  # no transcript text in our logs
    assert analysis["attempts"] == 3 and len(stack.gemini.text.requests) == 3
    assert analysis["error"].startswith("invalid output: answer is not JSON")
    assert analysis["summary"] is None and analysis["fields"] is None
    # nothing the caller said is in the stored error
    assert "Sundays" not in analysis["error"] and "open" not in analysis["error"]


async def test_gemini_errors_are_retried_with_backoff_until_an_answer_fits(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    stack = await start(make_stack, tmp_path, analysis_max_attempts=4)
    stack.gemini.text.fail_next(TextFault("http", 500), TextFault("http", 429))
    result = await quick_call(stack)
    await call_over(stack)
    analysis = await analysis_when(stack, result.call_sid, "done")
    assert analysis["attempts"] == 3
    assert "What time do you open on Sundays?" in analysis["summary"]
    assert [r.status for r in stack.gemini.text.requests] == [500, 429, 200]


async def test_gemini_failing_every_time_ends_in_the_failed_state(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    stack = await start(make_stack, tmp_path, analysis_max_attempts=2)
    stack.gemini.text.fail_next(TextFault("http", 500, times=None))
    result = await quick_call(stack)
    await call_over(stack)
    analysis = await analysis_when(stack, result.call_sid, "failed")
    assert analysis["error"] == "Gemini error 500 INTERNAL" and analysis["attempts"] == 2


async def test_a_refusal_that_cannot_change_is_not_retried(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    unknown = {**BISTRO, "analysis": {**BISTRO["analysis"], "model": "gemini-0-nonexistent"}}
    stack = await start(
        make_stack, tmp_path, profiles_file=write_profiles(tmp_path / "p.yaml", unknown)
    )
    result = await quick_call(stack)
    await call_over(stack)
    analysis = await analysis_when(stack, result.call_sid, "failed")
    assert analysis["error"] == "Gemini error 404 NOT_FOUND" and analysis["attempts"] == 1
    assert analysis["model"] == "gemini-0-nonexistent"
    assert [r.status for r in stack.gemini.text.requests] == [404]


async def test_a_slow_analysis_never_holds_the_call(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    stack = await start(make_stack, tmp_path)
    release = asyncio.Event()  # the first analysis answers only when the test says so
    stack.gemini.text.fail_next(TextFault("slow", delay_s=60.0, release=release))
    result = await quick_call(stack)
    await call_over(stack, timeout=3)  # the call is over, records written...
    text = stack.gemini.text
    await eventually(lambda: _async(len(text.requests) == 1), 20)
    assert text.requests[0].status == 0  # ...while the analysis is still waiting on Gemini
    async with api(stack) as client:
        record = (await client.get(f"/api/calls/{result.call_sid}")).json()
    assert record["status"] == "completed" and record["analysis"]["status"] == "pending"
    assert not stack.registry.active
    # nor the next call's analysis: it is done while the slow one still waits
    second = await quick_call(stack, from_=OTHER)
    await analysis_when(stack, second.call_sid, "done")
    assert text.requests[0].status == 0
    release.set()
    await analysis_when(stack, result.call_sid, "done")


async def test_pending_analysis_survives_a_restart(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    first = await start(
        make_stack, tmp_path, database_url=database, analysis_max_attempts=50,
        analysis_retry_delay_s=0.2,
    )  # fmt: skip
    first.gemini.text.fail_next(TextFault("http", 503, times=None))
    result = await quick_call(first)
    await call_over(first)
    pending = await eventually(lambda: _attempted(first, result.call_sid), 10)
    assert pending["status"] == "pending" and pending["error"] == "Gemini error 503 UNAVAILABLE"
    await first.stop()
    second = await start(make_stack, tmp_path, database_url=database)
    analysis = await analysis_when(second, result.call_sid, "done")
    assert analysis["summary"] and analysis["attempts"] > 1
    assert len(second.gemini.text.requests) == 1


async def test_an_analysis_cut_off_by_a_restart_is_taken_up_at_once(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    """Stopping the server mid-attempt hands the claim back: the next instance analyses the
    call right away (not after the lease runs out) and the cut-off try is not counted."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    first = await start(make_stack, tmp_path, database_url=database)
    first.gemini.text.fail_next(TextFault("slow", delay_s=120.0))  # never answers in time
    result = await quick_call(first)
    await call_over(first)
    text = first.gemini.text
    await eventually(lambda: _async(len(text.requests) == 1), 10)
    assert text.requests[0].status == 0  # in flight when the server stops
    await first.stop()
    second = await start(make_stack, tmp_path, database_url=database)
    analysis = await analysis_when(second, result.call_sid, "done", within=30)  # lease: 90 s
    assert analysis["attempts"] == 1 and analysis["summary"]
    assert len(second.gemini.text.requests) == 1


async def test_a_claim_cut_off_by_a_restart_is_handed_back(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    """A stop that lands after the claim's commit but before its answer is back (a slow
    database round trip) hands that claim back too: no lease is left with no attempt behind
    it, the next instance analyses the call at once, and the cut-off claim is not counted."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    first = await start(make_stack, tmp_path, database_url=database)
    worker = first.app.state.livecall.analysis
    due, claimed = worker._due, asyncio.Event()

    async def answer_after_the_stop(slots: int) -> list[tuple[str, int]]:
        claims = await due(slots)
        if claims:  # committed; the answer is back only once the worker is being stopped
            claimed.set()
            runner = next(t for t in asyncio.all_tasks() if t.get_name() == "analysis")
            await eventually(lambda: _async(runner.cancelling() > 0), 60)
        return claims

    worker._due = answer_after_the_stop
    result = await quick_call(first)
    await call_over(first)
    await asyncio.wait_for(claimed.wait(), 10)
    await first.stop()
    assert first.gemini.text.requests == []  # the attempt never started
    second = await start(make_stack, tmp_path, database_url=database)
    analysis = await analysis_when(second, result.call_sid, "done", within=30)  # lease: 90 s
    assert analysis["attempts"] == 1 and analysis["summary"]
    assert len(second.gemini.text.requests) == 1


async def _attempted(stack: LocalStack, call_sid: str) -> dict[str, Any] | None:
    async with api(stack) as client:
        analysis = (await client.get(f"/api/calls/{call_sid}")).json().get("analysis")
    return analysis if analysis and analysis["error"] else None


async def _async(value: Any) -> Any:
    return value


# --------------------------------------------------------------------------- memory


async def test_a_returning_caller_is_remembered_by_number_only_until_forgotten(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    stack = await start(make_stack, tmp_path)
    first = await booking_call(stack)
    await call_over(stack)
    done = await analysis_when(stack, first.call_sid, "done")
    # the same number (written another way): the agent starts knowing the first call
    again = instruction(await short_call(stack, "+1 (555) 123-0000"))
    assert again.startswith(BISTRO["system_prompt"])
    assert "This caller has called before" in again and done["summary"] in again
    assert '"name":"Garcia"' in again and '"party_size":4' in again
    # another number: nothing of it
    other = instruction(await short_call(stack, OTHER))
    assert other == BISTRO["system_prompt"]
    # forgotten on request: the next call from the number starts fresh
    async with api(stack) as client:
        assert (await client.delete("/api/callers/not-a-number/memory")).status_code == 400
        gone = await client.delete(f"/api/callers/{CALLER}/memory")
        assert gone.status_code == 200 and gone.json() == {"number": CALLER, "calls": 1}
        record = (await client.get(f"/api/calls/{first.call_sid}")).json()
    assert record["analysis"]["status"] == "done"  # the call's own analysis stays
    await call_over(stack)
    assert instruction(await short_call(stack, CALLER)) == BISTRO["system_prompt"]


async def test_anonymous_callers_get_no_memory(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    stack = await start(make_stack, tmp_path)
    first = await quick_call(stack, from_="anonymous")
    await call_over(stack)
    await analysis_when(stack, first.call_sid, "done")  # analysed, but not remembered
    assert instruction(await short_call(stack, "anonymous")) == BISTRO["system_prompt"]
    async with api(stack) as client:
        forgotten = await client.delete("/api/callers/anonymous/memory")
    assert forgotten.status_code == 400


async def test_a_profile_without_analysis_sends_nothing_to_gemini(
    make_stack: Any, tmp_path: Path, call_over: Any
) -> None:
    plain = {k: v for k, v in BISTRO.items() if k not in ("analysis", "memory")}
    stack = await start(
        make_stack, tmp_path, profiles_file=write_profiles(tmp_path / "plain.yaml", plain)
    )
    result = await quick_call(stack)
    await call_over(stack)
    assert await stack.app.state.livecall.analysis.run_once() is None  # a whole worker pass
    async with api(stack) as client:
        record = (await client.get(f"/api/calls/{result.call_sid}")).json()
    assert record["status"] == "completed" and record["analysis"] is None
    assert stack.gemini.text.requests == []


async def test_a_database_that_never_answers_delays_the_call_by_the_time_box_only(
    make_stack: Any, tmp_path: Path
) -> None:
    """Memory is read at the call's start; a hung database costs MEMORY_TIMEOUT, no more."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts, then never says a word (a hung PostgreSQL)

    blackhole = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = blackhole.sockets[0].getsockname()[1]
    try:
        stack = await start(
            make_stack, tmp_path, database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x",
            memory_timeout_s=0.3,
        )  # fmt: skip
        script = [WaitForAgentAudio(min_heard_ms=300, timeout=15), HangUp()]
        result = await stack.caller(script, from_=CALLER, to=TO).run()
        assert result.script_errors == []
        [session] = stack.gemini.sessions
        assert instruction(session) == BISTRO["system_prompt"]  # went on without memory
        waited = session.opened_at - result.stream_started
        assert 0.3 <= waited < 1.5, waited
    finally:
        for writer in held:
            writer.close()
        blackhole.close()
        await blackhole.wait_closed()
