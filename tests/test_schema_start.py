"""A fresh PostgreSQL database is migrated on start, and a call through the whole stack is
recorded in it; instances starting together take turns (advisory lock); a schema that cannot
be brought up is said loudly (/ready 503, a metric, an error per call) or, with AUTO_MIGRATE
off, stops the start naming `livecall db upgrade`.

Each test gets a database of its own (`pg_support.fresh_database`). Without PostgreSQL they
are skipped, except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
from sqlalchemy.engine import make_url

from livecall.settings import Settings
from livecall.sim.clips import load_clip
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import HangUp, Say, WaitForAgentSilence
from livecall.store import db
from livecall.store.writer import CallStore, SchemaNotReady
from pg_support import PG_URL, fresh_database

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]

API_TOKEN = "schema-start-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def scenario(seed: int) -> Scenario:
    return Scenario(seed=seed, greeting=None, pause_prob=0.0, first_audio_delay=0.2)


def question() -> list[Any]:
    pcm, rate = load_clip("hours")
    return [
        Say(pcm, rate=rate, label="hours"),
        WaitForAgentSilence(silence_ms=500, timeout=15),
        HangUp(),
    ]


def stack_settings(tmp_path: Path, name: str, database_url: str, **kw: Any) -> dict[str, Any]:
    home = tmp_path / name
    return {
        "database_url": database_url,
        "recordings_dir": home / "recordings",
        "spool_dir": home / "spool",
        "api_token": API_TOKEN,
        "vad_silence_duration_ms": 300,
        **kw,
    }


async def test_a_fresh_postgres_database_is_migrated_on_start_and_a_call_is_recorded_in_it(
    tmp_path: Path, call_over: Any
) -> None:
    async with fresh_database() as url:
        async with LocalStack(
            scenario(4), settings_overrides=stack_settings(tmp_path, "a", url)
        ) as stack:
            engine = db.make_engine(url)
            try:
                assert await db.current_revision(engine) == db.head_revision()
            finally:
                await engine.dispose()
            result = await stack.caller(
                question(), call_sid="CA09e76327164d28d93e821544b41aa9d0"
            ).run()
            assert result.webhook_status == 200 and result.response_latencies_ms
            await call_over(stack)
            async with httpx.AsyncClient(headers=AUTH) as client:
                r = await client.get(f"{stack.base_url}/api/calls/{result.call_sid}")
                assert r.status_code == 200, r.text
                call = r.json()
                recording = await client.get(
                    f"{stack.base_url}/api/calls/{result.call_sid}/recording"
                )
        # read straight from PostgreSQL too: the rows are really there
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            row = await conn.fetchrow(
                "SELECT status, from_number, recording_key FROM calls WHERE call_sid = $1",
                result.call_sid,
            )
            speakers = await conn.fetch(
                "SELECT speaker, text FROM turns WHERE call_sid = $1 ORDER BY idx", result.call_sid
            )
            kinds = await conn.fetch(
                "SELECT kind FROM call_events WHERE call_sid = $1 ORDER BY seq", result.call_sid
            )
        finally:
            await conn.close()
        assert row is not None and row["status"] == "completed" and row["recording_key"]
        assert [s["speaker"] for s in speakers] == ["caller", "agent"]
        assert all(s["text"] for s in speakers)
        assert "session_started" in {k["kind"] for k in kinds}
        assert call["status"] == "completed" and len(call["turns"]) == 2
        assert call["has_recording"] and recording.status_code == 200


async def test_two_instances_starting_together_on_a_fresh_database_both_come_up(
    tmp_path: Path, call_over: Any
) -> None:
    async with fresh_database() as url:
        stacks = [
            LocalStack(scenario(5 + i), settings_overrides=stack_settings(tmp_path, f"s{i}", url))
            for i in range(2)
        ]
        try:
            await asyncio.gather(*(s.start() for s in stacks))  # both migrate at once
            async with httpx.AsyncClient() as client:
                for stack in stacks:
                    r = await client.get(f"{stack.base_url}/ready")
                    assert r.status_code == 200 and r.json()["records"] == "ok", r.text
            for i, stack in enumerate(stacks):
                sid = f"CA{i:032x}"  # a well-formed CallSid
                result = await stack.caller(question(), call_sid=sid).run()
                assert result.response_latencies_ms
                await call_over(stack)
                call = await stack.app.state.livecall.store.repo.get_call(sid)
                assert call is not None and call.status == "completed" and len(call.turns) == 2
        finally:
            for stack in stacks:
                await stack.stop()


async def test_without_auto_migrate_an_old_schema_stops_the_start_naming_the_command(
    tmp_path: Path,
) -> None:
    async with fresh_database() as url:
        settings = Settings(database_url=url, spool_dir=tmp_path / "spool", auto_migrate=False)
        store = CallStore(settings)
        try:
            with pytest.raises(SchemaNotReady, match="livecall db upgrade"):
                await store.start()
        finally:
            await store.close(timeout=1)
        # and through the app: its start (the lifespan uvicorn runs) fails the same way
        from livecall.server.app import create_app

        app = create_app(Settings(**stack_settings(tmp_path, "x", url, auto_migrate=False)))
        with pytest.raises(SchemaNotReady, match="livecall db upgrade"):
            async with app.router.lifespan_context(app):
                pass
        # once migrated, the same settings start
        engine = db.make_engine(url)
        await db.upgrade(engine)
        await engine.dispose()
        async with CallStore(settings) as store:
            assert store.can_record() is None


async def test_a_schema_that_cannot_be_migrated_is_said_loudly_ready_metric_and_each_call(
    tmp_path: Path, call_over: Any
) -> None:
    """A database user without CREATE rights: the migration fails for good. /ready says 503,
    and every call taken anyway is counted and logged as not recorded."""
    async with fresh_database() as url:
        role = f"lc_noddl_{uuid.uuid4().hex[:8]}"
        admin_dsn = url.replace("postgresql+asyncpg://", "postgresql://")
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'CREATE ROLE "{role}" LOGIN')
            await admin.execute(f'REVOKE CREATE ON SCHEMA public FROM PUBLIC, "{role}"')
            limited = make_url(url).set(username=role).render_as_string(hide_password=False)
            overrides = stack_settings(tmp_path, "n", limited)
            async with LocalStack(scenario(8), settings_overrides=overrides) as stack:
                state = stack.app.state.livecall
                async with httpx.AsyncClient() as client:
                    r = await client.get(f"{stack.base_url}/ready")
                assert r.status_code == 503 and r.json()["records"] == "schema", r.text
                with structlog.testing.capture_logs() as logs:
                    result = await stack.caller(
                        question(), call_sid="CAbf6b6744c0ad0cb89bec85857add6519"
                    ).run()
                    assert result.webhook_status == 200
                    await state.registry.wait_idle(15)
                errors = [e for e in logs if e["event"].startswith("call.not_recorded")]
                assert [e["call_sid"] for e in errors] == [result.call_sid]
                assert errors[0]["log_level"] == "error" and errors[0]["reason"] == "schema"
                count = state.metrics.registry.get_sample_value(
                    "livecall_calls_unrecorded_total", {"reason": "schema"}
                )
                assert count == 1
        finally:
            await admin.execute(f'DROP OWNED BY "{role}"')
            await admin.close()
            cleanup = await asyncpg.connect(
                PG_URL.replace("postgresql+asyncpg://", "postgresql://")
            )
            try:
                await cleanup.execute(f'DROP ROLE IF EXISTS "{role}"')
            finally:
                await cleanup.close()
