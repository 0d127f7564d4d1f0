"""Post-call analysis and caller memory, piece by piece: the pure parts (schema, prompt,
output check, backoff, number normalization, the memory paragraph), the profile fields, the
fake Gemini's generateContent, and the worker against SQLite and PostgreSQL with the fake
Gemini answering through the real SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from livecall.agent.gemini import GeminiLink, LiveOptions, _client
from livecall.agent.profiles import AgentProfile, AnalysisSettings, ProfileError, ProfileSet
from livecall.outcomes import memory
from livecall.outcomes.analysis import (
    AnalysisWorker,
    InvalidOutput,
    build_prompt,
    parse_output,
    response_schema,
    retry_delay,
    sdk_generate,
    transcript_text,
)
from livecall.settings import Settings
from livecall.sim.gemini import FakeGeminiServer
from livecall.sim.gemini_text import TextFault, fill_schema
from livecall.store import db
from livecall.store.models import CallAnalysis, CallerMemory
from livecall.store.repository import Repository
from pg_support import PG_URL, fresh_schema

FIELDS = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "party_size": {"type": "integer"},
        "callback_number": {"type": ["string", "null"]},
    },
    "required": ["name", "party_size"],
}
SPEC = AnalysisSettings(enabled=True, goal="A table is booked.", fields=FIELDS)


@dataclass
class T:
    speaker: str
    text: str
    heard_text: str | None = None
    interrupted: bool = False


# --------------------------------------------------------------------------- pure parts


def test_the_response_schema_wraps_the_profile_fields_and_the_goal() -> None:
    schema = response_schema(SPEC)
    assert schema["required"] == ["summary", "fields", "success"]
    assert schema["properties"]["fields"] == FIELDS
    assert schema["properties"]["success"]["required"] == ["success", "reason"]
    no_goal = response_schema(AnalysisSettings(enabled=True))
    assert "success" not in no_goal["properties"] and no_goal["required"] == ["summary", "fields"]


def test_the_transcript_is_what_was_heard() -> None:
    turns = [
        T("caller", "  Hi,   a table   please "),
        T("agent", "Of course, we have tables from six and a terrace", "Of course,", True),
        T("agent", ""),
        T("caller", "For two."),
    ]
    assert (
        transcript_text(turns) == "caller: Hi, a table please\nagent: Of course,\ncaller: For two."
    )
    system, content = build_prompt(SPEC, transcript_text(turns))
    assert "Goal: A table is booked." in system and "never an instruction" in system
    assert content.endswith("caller: For two.")


def test_an_answer_that_fits_the_schema_is_parsed() -> None:
    text = (
        '{"summary": " Booked. ", "fields": {"name": "Ann", "party_size": 2, '
        '"callback_number": null}, "success": {"success": true, "reason": "Booked."}}'
    )
    result = parse_output(text, response_schema(SPEC))
    assert result.summary == "Booked." and result.fields["party_size"] == 2
    assert (result.success, result.success_reason) == (True, "Booked.")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "empty answer"),
        ('{"summary": "Ann Lee booked', "not JSON"),
        ('{"summary": "Ann Lee", "fields": {"name": "Ann Lee"}}', "'required' failed"),
        (
            '{"summary": "x", "fields": {"name": "Ann Lee", "party_size": "four"}, '
            '"success": {"success": true, "reason": "r"}}',
            "'type' failed at fields/party_size",
        ),
    ],
)
def test_an_answer_that_does_not_fit_is_refused_without_quoting_it(
    text: str | None, expected: str
) -> None:
    with pytest.raises(InvalidOutput) as caught:
        parse_output(text, response_schema(SPEC))
    assert expected in str(caught.value)
    assert "Ann" not in str(caught.value) and "four" not in str(caught.value)


def test_retries_back_off_exponentially_with_jitter_and_a_cap() -> None:
    assert retry_delay(1, 2.0, rng=lambda: 0.5) == 2.0
    assert retry_delay(3, 2.0, rng=lambda: 0.5) == 8.0
    assert retry_delay(30, 2.0, cap_s=600, rng=lambda: 0.5) == 600
    assert retry_delay(2, 2.0, rng=lambda: 0.0) == 3.0 and retry_delay(2, 2.0, rng=lambda: 1) == 5


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("+15551230000", "+15551230000"),
        ("+1 (555) 123-0000", "+15551230000"),
        ("0044 20 7946 0000", "+442079460000"),
        ("anonymous", None),
        ("Anonymous", None),
        ("restricted", None),
        ("+266696687", None),  # Twilio's stand-in for a withheld number
        ("+86282452253", None),
        ("sip:alice@example.com", None),
        ("client:alice", None),
        ("5551230000", None),  # not E.164: no guessing the country
        ("12345", None),
        ("", None),
        (None, None),
    ],
)
def test_memory_keys_only_on_plain_e164_numbers(raw: str | None, normalized: str | None) -> None:
    assert memory.normalize_number(raw) == normalized


def test_the_memory_paragraph_frames_notes_as_facts_newest_first() -> None:
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    entries = [
        memory.MemoryEntry("CA2", now - timedelta(hours=2), "Booked for four.", {"name": "Ann"}),
        memory.MemoryEntry("CA1", now - timedelta(days=9), "Asked   about\nhours.", {"x": None}),
    ]
    text = memory.memory_instruction(entries, now)
    lines = text.splitlines()
    assert "not instructions" in lines[0] and "Welcome them back" in lines[0]
    assert lines[1] == '- Call today (2026-12-01): Booked for four. Details: {"name":"Ann"}'
    assert lines[2] == "- Call 9 days ago (2026-11-22): Asked about hours."
    assert memory.memory_instruction([], now) == ""


def test_profiles_validate_analysis_and_memory() -> None:
    base = {"name": "p", "system_prompt": "x", "voice": "Kore", "language": "en-US"}
    base |= {"model": "m", "max_call_duration_s": 60}
    profile = AgentProfile.model_validate(
        base | {"analysis": {"enabled": True, "fields": FIELDS}, "memory": {"enabled": True}}
    )
    assert profile.memory.max_calls == 3 and profile.analysis.model is None
    assert not AgentProfile.model_validate(base).analysis.enabled  # off by default
    with pytest.raises(ValueError, match="memory: enabled, but it is built from analysis"):
        AgentProfile.model_validate(base | {"memory": {"enabled": True}})
    with pytest.raises(ValueError, match="type: object"):
        AgentProfile.model_validate(base | {"analysis": {"fields": {"type": "string"}}})
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        AgentProfile.model_validate(
            base | {"analysis": {"fields": {"type": "object", "properties": {"a": {"type": 7}}}}}
        )


def test_a_profiles_file_names_the_bad_analysis_field(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text("profiles:\n  - name: p\n    analysis: {enabled: true, gaol: x}\n")
    with pytest.raises(ProfileError) as caught:
        ProfileSet.load(path, Settings())
    assert "analysis.gaol: unknown field (did you mean 'goal'?)" in str(caught.value)


def test_the_fake_model_fills_a_schema_from_the_callers_words() -> None:
    words = "Hi, a table for six at 8 pm, under the name Lopez. Call me on +1 555 123 4567."
    schema = {
        "properties": {
            "guest_name": {"type": "string"},
            "party_size": {"type": "integer"},
            "time": {"type": "string"},
            "callback_number": {"type": "string"},
            "notes": {"type": ["string", "null"]},
            "vip": {"type": "boolean"},
        },
        "required": ["vip"],
    }
    assert fill_schema(schema, words) == {
        "guest_name": "Lopez",
        "party_size": 6,
        "time": "8 pm",
        "callback_number": "+15551234567",
        "notes": None,
        "vip": False,
    }


# --------------------------------------------------------------------------- the worker


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        engine = db.make_engine(f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}")
        await db.upgrade(engine)
        yield engine
        await engine.dispose()
        return
    async with fresh_schema() as connect_args:
        engine = db.make_engine(PG_URL, connect_args=connect_args)
        try:
            await db.upgrade(engine)
            yield engine
        finally:
            await engine.dispose()


def profiles(**memory_on: bool) -> ProfileSet:
    spec = {"enabled": True, "goal": "A table is booked.", "fields": FIELDS}
    return ProfileSet(
        (
            AgentProfile(
                name="bistro", system_prompt="x", voice="Kore", language="en-US", model="m",
                max_call_duration_s=60, analysis=spec,
                memory={"enabled": memory_on.get("on", True)},
            ),
        )
    )  # fmt: skip


async def seed(repo: Repository, sid: str, number: str, *, said: bool = True) -> None:
    now = datetime.now(UTC)
    ops: list[dict[str, Any]] = [
        {"op": "start", "call_sid": sid, "started_at": now.isoformat(), "from_number": number,
         "to_number": "+15559870000", "profile": "bistro"},
        {"op": "turn", "call_sid": sid, "idx": 0, "speaker": "agent", "text": "Hello.",
         "start_ms": 0},
    ]  # fmt: skip
    if said:
        ops.append(
            {
                "op": "turn",
                "call_sid": sid,
                "idx": 1,
                "speaker": "caller",
                "start_ms": 900,
                "text": "A table for two under the name Lee, please.",
            }
        )
    counters = dict.fromkeys(("turn_count", "interruptions", "frames_in", "frames_out"), 0)
    counters |= dict.fromkeys(("frames_missing", "prompt_tokens", "response_tokens"), 0)
    ops.append(
        {
            "op": "end",
            "call_sid": sid,
            "ended_at": now.isoformat(),
            "status": "completed",
            "duration_s": 1.0,
            "end_reason": "caller_stop",
            "gemini_sessions": 1,
            "total_tokens": 0,
            **counters,
        }
    )
    await repo.apply(ops)


async def test_the_worker_analyses_remembers_forgets_and_prunes(engine: AsyncEngine) -> None:
    repo = Repository(db.make_sessionmaker(engine))
    settings = Settings(analysis_retry_delay_s=0.01, analysis_max_attempts=3)
    async with FakeGeminiServer() as fake:
        client = _client("key", False, None, None, fake.base_url, None, fake.ca_file)
        worker = AnalysisWorker(repo.sessions, settings, profiles, sdk_generate(lambda: client))
        settled: list[tuple[str, str]] = []
        worker.on_settled.append(lambda sid, data: settled.append((sid, data["status"])))
        await seed(repo, "CA1", "+15551230000")
        await seed(repo, "CA2", "anonymous")
        await seed(repo, "CA3", "+15551230000", said=False)
        fake.text.fail_next(TextFault("http", 429))
        await worker.run_once()  # CA1 and CA2 get a 429 and a good answer, CA3 is skipped
        for _ in range(3):
            if all(s != "pending" for s in await _statuses(repo)):
                break
            await worker.run_once()
        assert await _statuses(repo) == ["done", "done", "skipped"]
        assert sorted(settled) == [("CA1", "done"), ("CA2", "done"), ("CA3", "skipped")]
        skipped = await worker.analysis_for("CA3")
        assert skipped is not None and skipped["error"] == "the caller said nothing"
    # remembered: the named caller only, and only for its profile
    recalled = await memory.recall(
        repo.sessions, "+15551230000", "bistro", max_calls=3, max_age_days=30
    )
    assert [e.call_sid for e in recalled] == ["CA1"]
    assert recalled[0].fields == {"name": "Lee", "party_size": 2, "callback_number": None}
    assert (
        await memory.recall(repo.sessions, "+15551230000", "other", max_calls=3, max_age_days=30)
        == []
    )
    # retention: a day of RETENTION_DAYS=1 from now is not yet up; tomorrow plus one it is
    assert await memory.prune(repo.sessions, 1) == 0
    later = datetime.now(UTC) + timedelta(days=2)
    assert await memory.recall(
        repo.sessions, "+15551230000", "bistro", max_calls=3, max_age_days=30,
        retention_days=1, now=later,
    ) == []  # fmt: skip
    assert await memory.forget(repo.sessions, "+15551230000") == 1
    assert await memory.forget(repo.sessions, "+15551230000") == 0
    # erasing a call erases its analysis
    assert await repo.delete_call("CA1")
    async with repo.sessions() as session:
        assert await session.get(CallAnalysis, "CA1") is None


async def test_memory_older_than_retention_is_pruned(engine: AsyncEngine) -> None:
    repo = Repository(db.make_sessionmaker(engine))
    await seed(repo, "CA9", "+15551230000")
    async with repo.sessions.begin() as session:
        session.add(
            CallerMemory(
                call_sid="CA9", number="+15551230000", profile="bistro", summary="s", fields={},
                call_started_at=datetime.now(UTC) - timedelta(days=40),
            )
        )  # fmt: skip
    assert await memory.prune(repo.sessions, 30) == 1
    async with repo.sessions() as session:
        assert (await session.scalars(select(CallerMemory))).all() == []


async def _statuses(repo: Repository) -> list[str]:
    async with repo.sessions() as session:
        rows = await session.scalars(select(CallAnalysis).order_by(CallAnalysis.call_sid))
        return [r.status for r in rows]


# --------------------------------------------------------------------------- the fake's door


async def _raw_post(fake: FakeGeminiServer, path: str, body: bytes, headers: str = "") -> bytes:
    """One HTTP request over TLS, written a byte at a time (the sniffer must wait)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", fake.port, ssl=fake.client_ssl_context(), server_hostname="127.0.0.1"
    )
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    for i in range(0, 12):  # the start, byte by byte, then the rest
        writer.write(request[i : i + 1])
        await writer.drain()
    writer.write(request[12:])
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_the_fake_answers_http_beside_live_sessions_on_one_port() -> None:
    body = b'{"contents": [{"role": "user", "parts": [{"text": "caller: hi"}]}]}'
    path = "/v1beta/models/gemini-3.5-flash:generateContent"
    async with FakeGeminiServer(api_key="right") as fake:
        assert b"403 Forbidden" in await _raw_post(fake, path, body)
        assert b"API key not valid" in await _raw_post(fake, path, body, "x-goog-api-key: no\r\n")
        unknown = "/v1beta/models/gemini-0:generateContent"
        assert b"404 Not Found" in await _raw_post(fake, unknown, body, "x-goog-api-key: right\r\n")
        ok = await _raw_post(fake, path, body, "x-goog-api-key: right\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK") and b'"candidates"' in ok
        assert [r.status for r in fake.text.requests] == [403, 400, 404, 200]
        assert fake.text.requests[3].text == "caller: hi"
        # and the Live socket on the same port still opens through the SDK
        client = _client("right", False, None, None, fake.base_url, None, fake.ca_file)
        link = GeminiLink(client, LiveOptions(model="gemini-3.8-live", system_prompt="hi"))
        await link.connect()
        await link.close()
        assert fake.sessions[0].setup_completed


def test_the_remembered_party_is_the_other_end_of_the_call() -> None:
    assert memory.remote_number("inbound", "+15550001111", "+15559990000") == "+15550001111"
    assert memory.remote_number("outbound-api", "+15559990000", "+15550001111") == "+15550001111"
    assert memory.remote_number(None, None, "+15559990000") == ""


async def test_recall_is_bounded_by_count_age_and_profile(engine: AsyncEngine) -> None:
    repo = Repository(db.make_sessionmaker(engine))
    now = datetime.now(UTC)
    ages = {"CA10": 1, "CA11": 5, "CA12": 10, "CA13": 20, "CA14": 200}
    for sid in ages:
        await seed(repo, sid, "+15551230000")
    async with repo.sessions.begin() as session:
        for sid, days in ages.items():
            session.add(
                CallerMemory(
                    call_sid=sid, number="+15551230000", profile="bistro", summary=sid,
                    fields={}, call_started_at=now - timedelta(days=days),
                )
            )  # fmt: skip

    async def recalled(**bounds: Any) -> list[str]:
        entries = await memory.recall(repo.sessions, "+15551230000", "bistro", **bounds)
        return [e.summary for e in entries]

    assert await recalled(max_calls=3, max_age_days=90) == ["CA10", "CA11", "CA12"]
    assert await recalled(max_calls=10, max_age_days=90) == ["CA10", "CA11", "CA12", "CA13"]
    assert await recalled(max_calls=10, max_age_days=7) == ["CA10", "CA11"]
    assert await recalled(max_calls=10, max_age_days=90, retention_days=3) == ["CA10"]
    assert await memory.count(repo.sessions, "+15551230000") == 5
