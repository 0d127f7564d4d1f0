"""Two livecall instances, one database, one Redis: any instance lists and ends any call.

`livecall serve` runs twice as real subprocesses (ports A and B) against one SQLite file, the
local Redis (127.0.0.1:6379, under a key prefix of this test's own) and one fake Gemini Live.
A simulated caller rings A; B's API lists the call and ends it; A is then killed with no
chance to withdraw its calls, and they leave B's listing once their TTL runs out.
A second test, with two in-process stacks, ends a call on A from B's dashboard and transfers
another one through B's API.

Without Redis these tests are skipped, except under CI=true where they fail.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from livecall.sim.gemini import FakeGeminiServer, Scenario
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from livecall.sim.twilio import Pause, SimulatedCaller
from livecall.sim.twilio_rest import FakeCall, serve_fake_twilio_rest
from support import eventually, redis_reachable, service_missing

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

REDIS_URL = os.environ.get("LIVECALL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TOKEN = "multi-instance-twilio-token-0123456789"
API_KEY = "multi-instance-gemini-key-0123456789"
API_TOKEN = "multi-instance-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
TTL_S = 2.0  # short, so a dead instance's calls vanish quickly


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own on the local Redis; its keys are deleted afterwards."""
    if not await redis_reachable(REDIS_URL):
        service_missing(f"Redis is not reachable at {REDIS_URL}: the multi-instance tests need it")
    import redis.asyncio as aioredis

    prefix = f"lctest-mi-{uuid.uuid4().hex[:10]}"
    try:
        yield prefix
    finally:
        client = aioredis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    """One `livecall serve` subprocess."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, base: str) -> None:
        self.name = name
        self.proc = proc
        self.base = base

    def caller(self, **kw: Any) -> SimulatedCaller:
        return SimulatedCaller(self.base, auth_token=TOKEN, **kw)


async def _serve(name: str, env: dict[str, str], home: Path) -> Instance:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    (home / name).mkdir()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "livecall.cli",
        "serve",
        "--host",
        "127.0.0.1",
        env={
            **env,
            "PORT": str(port),
            "PUBLIC_URL": base,
            "INSTANCE_ID": name,
            "SPOOL_DIR": str(home / name / "spool"),
            "RECORDINGS_DIR": str(home / name / "rec"),
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(home / name / "log").open("wb"),
    )
    return Instance(name, proc, base)


async def _ready(client: httpx.AsyncClient, inst: Instance) -> bool:
    if inst.proc.returncode is not None:
        raise RuntimeError(f"instance {inst.name} exited with {inst.proc.returncode}")
    try:
        return (await client.get(inst.base + "/ready")).status_code == 200
    except httpx.TransportError:
        return False


async def test_any_instance_lists_and_ends_a_call_and_a_dead_instance_s_calls_expire(
    tmp_path: Path, redis_prefix: str
) -> None:
    from livecall.store import db

    database_url = f"sqlite+aiosqlite:///{tmp_path}/calls.db"
    engine = db.make_engine(database_url)
    await db.upgrade(engine)  # migrated once, so two instances starting together never race
    await engine.dispose()

    async with FakeGeminiServer(scenario=Scenario(seed=5, greeting=None)) as gemini:
        env = {
            **os.environ,
            "GEMINI_API_KEY": API_KEY,
            "GEMINI_BASE_URL": gemini.base_url,
            "GEMINI_CA_FILE": str(gemini.ca_file),
            "TWILIO_AUTH_TOKEN": TOKEN,
            "LIVECALL_API_TOKEN": API_TOKEN,
            "DATABASE_URL": database_url,
            "RECORDING_ENABLED": "false",
            "REDIS_URL": REDIS_URL,
            "CLUSTER_PREFIX": redis_prefix,
            "CLUSTER_TTL": str(TTL_S),
            "CLUSTER_HEARTBEAT": "0.5",
            "LOG_FORMAT": "json",
        }
        a, b = await asyncio.gather(_serve("A", env, tmp_path), _serve("B", env, tmp_path))
        callers: list[asyncio.Task[Any]] = []
        try:
            async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
                await eventually(lambda: _ready(client, a), within=30)
                await eventually(lambda: _ready(client, b), within=30)

                async def listed(inst: Instance) -> dict[str, dict[str, Any]]:
                    r = await client.get(inst.base + "/api/live")
                    assert r.status_code == 200, r.text
                    return {c["call_sid"]: c for c in r.json()["calls"]}

                # --- a call on A is listed on B (and on A), and B ends it
                first = a.caller(script=[Pause(40000)], from_="+15550007777", timeout=50)
                callers.append(asyncio.create_task(first.run()))
                on_b = await eventually(lambda: _has(listed(b), first))
                row = on_b[first.call_sid]
                assert row["instance"] == "A"
                assert row["from"] == "+15550007777" and row["direction"] == "inbound"
                assert row["started_at"]
                assert (await listed(a))[first.call_sid]["instance"] == "A"

                r = await client.post(f"{b.base}/api/live/{first.call_sid}/end")
                assert r.status_code == 202, r.text
                result = await asyncio.wait_for(callers[0], 15)
                assert result.ended_by == "server"  # A closed the caller's stream
                await eventually(lambda: _gone(listed(b), first.call_sid))

                # A wrote the record into the shared database; B's records API reads it
                async def record() -> dict[str, Any] | None:
                    r = await client.get(f"{b.base}/api/calls/{first.call_sid}")
                    if r.status_code != 200 or r.json()["status"] == "in_progress":
                        return None
                    return r.json()

                call = await eventually(record)
                assert call["end_reason"] == "api" and call["status"] == "completed"
                # the call is over: nobody holds it any more
                r = await client.post(f"{b.base}/api/live/{first.call_sid}/end")
                assert r.status_code == 404
                r = await client.post(f"{b.base}/api/live/CA{'0' * 32}/end")
                assert r.status_code == 404
                assert (
                    await client.post(f"{b.base}/api/live/not%20a%20sid/end")
                ).status_code == 422

                # --- A dies without withdrawing: its call leaves B's listing after the TTL
                second = a.caller(script=[Pause(40000)], timeout=50)
                callers.append(asyncio.create_task(second.run()))
                await eventually(lambda: _has(listed(b), second))
                a.proc.send_signal(signal.SIGKILL)
                await a.proc.wait()
                killed_at = asyncio.get_running_loop().time()
                assert second.call_sid in await listed(b)  # still there: only the TTL removes it
                await eventually(lambda: _gone(listed(b), second.call_sid), within=TTL_S + 5)
                waited = asyncio.get_running_loop().time() - killed_at
                assert waited < TTL_S + 5
                # and B can no longer end it
                r = await client.post(f"{b.base}/api/live/{second.call_sid}/end")
                assert r.status_code == 404
                lost = await asyncio.wait_for(callers[1], 15)
                assert lost.ended_by == "server"
        finally:
            for task in callers:
                task.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
            for inst in (a, b):
                if inst.proc.returncode is None:
                    inst.proc.kill()
                    await inst.proc.wait()


async def _has(
    listing: Awaitable[dict[str, dict[str, Any]]], caller: SimulatedCaller
) -> dict[str, dict[str, Any]] | None:
    calls = await listing
    return calls if caller.call_sid in calls else None


async def _gone(listing: Awaitable[dict[str, dict[str, Any]]], call_sid: str) -> bool:
    return call_sid not in await listing


# --------------------------------------------------------------------------- transfer

ACCOUNT_SID = "AC" + "1" * 32
MANAGER = "+15551239999"


async def test_dashboard_end_and_api_transfer_on_one_instance_reach_a_call_on_the_other(
    tmp_path: Path, redis_prefix: str
) -> None:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(
        yaml.safe_dump(
            {
                "profiles": [
                    {
                        "name": "agent",
                        "default": True,
                        "system_prompt": "You answer the phone.",
                        "tools": ["end_call", "transfer_call"],
                        "transfer_targets": {"manager": MANAGER},
                    }
                ]
            }
        )
    )
    async with (
        serve_fake_twilio_rest(ACCOUNT_SID, TEST_AUTH_TOKEN) as (rest, rest_url),
        FakeGeminiServer(scenario=Scenario(seed=6, greeting=None)) as gemini,
    ):
        common = {
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/calls.db",
            "recording_enabled": False,
            "profiles_file": profiles,
            "twilio_account_sid": ACCOUNT_SID,
            "twilio_api_base_url": rest_url,
            "api_token": API_TOKEN,
            "redis_url": REDIS_URL,
            "cluster_prefix": redis_prefix,
        }
        a = LocalStack(gemini=gemini, settings_overrides={**common, "instance_id": "A"})
        b = LocalStack(gemini=gemini, settings_overrides={**common, "instance_id": "B"})
        await a.start()
        await b.start()
        try:
            b_cluster = b.app.state.livecall.cluster  # type: ignore[union-attr]
            async with httpx.AsyncClient(base_url=b.base_url) as browser:
                # the dashboard's end button on B, for a call A carries
                ended = a.caller([Pause(30000)], timeout=40)
                call = asyncio.create_task(ended.run())
                await eventually(lambda: b_cluster.locate(ended.call_sid))
                r = await browser.post("/login", data={"token": API_TOKEN, "next": "/live"})
                assert r.status_code == 303, r.text
                page = await browser.get("/live")
                match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
                assert match is not None
                r = await browser.post(
                    f"/live/{ended.call_sid}/end",
                    headers={
                        "X-CSRF-Token": match.group(1),
                        "Origin": b.base_url,
                        "Accept": "application/json",
                    },
                )
                assert r.status_code == 202, r.text
                assert (await asyncio.wait_for(call, 15)).ended_by == "server"

            sid = "CA" + secrets.token_hex(16)
            rest.calls[sid] = FakeCall(
                sid=sid,
                account_sid=ACCOUNT_SID,
                to="+15550002222",
                from_="+15550001111",
                create_params={},
                status_callback_events=set(),
                status="in-progress",
                status_history=["in-progress"],
            )
            call = asyncio.create_task(a.caller([Pause(30000)], call_sid=sid, timeout=40).run())
            await eventually(lambda: b_cluster.locate(sid))
            async with httpx.AsyncClient(base_url=b.base_url, headers=AUTH) as client:
                r = await client.post(f"/api/live/{sid}/transfer", json={"target": "nobody"})
                assert r.status_code == 409, r.text
                r = await client.post(f"/api/live/{sid}/transfer", json={"target": "manager"})
                assert r.status_code == 202, r.text
            result = await asyncio.wait_for(call, 20)
            assert result.ended_by == "server"
            dial = ET.fromstring(rest.calls[sid].twiml_history[0]).find("Dial")
            assert dial is not None and dial.findtext("Number") == MANAGER
            store = a.app.state.livecall.store  # type: ignore[union-attr]
            assert await a.registry.wait_idle(10) and await store.flush()
            record = await store.repo.get_call(sid)
            assert record is not None and record.end_reason == "transferred"
            record = await store.repo.get_call(ended.call_sid)
            assert record is not None and record.end_reason == "operator_hangup"
        finally:
            await b.stop()
            await a.stop()
