"""What happens to a call's records afterwards: erased for good, and expired by retention.

Through the real server and a simulated caller: `DELETE /api/calls/{sid}` while the call is
in progress is refused (409: end it first), and once erased a call never comes back: not when
records of it arrive late (as a spool replayed after a database outage does), not its
recording. Retention runs as configured (`RETENTION_DAYS`) against the real recordings
directory and the real repository: old recordings go, and so does the record's link to them.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from livecall.records import CallInfo, CallSummary, TurnRecord
from livecall.settings import Settings
from livecall.sim.clips import load_clip
from livecall.sim.gemini import Scenario
from livecall.sim.twilio import HangUp, Pause, Say, WaitForAgentSilence
from livecall.store.recordings import LocalRecordingStore
from livecall.store.writer import CallStore
from pg_support import DEAD_PG_URL
from support import eventually

pytestmark = pytest.mark.timeout(60)

API_TOKEN = "lifecycle-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def scenario(seed: int) -> Scenario:
    return Scenario(seed=seed, greeting=None, pause_prob=0.0, first_audio_delay=0.2)


def question(then_wait_ms: int = 0) -> list[Any]:
    pcm, rate = load_clip("hours")
    return [
        Say(pcm, rate=rate, label="hours"),
        WaitForAgentSilence(silence_ms=500, timeout=15),
        Pause(then_wait_ms),
        HangUp(),
    ]


async def test_a_live_call_cannot_be_deleted_and_a_deleted_call_never_comes_back(
    make_stack: Any, call_over: Any, tmp_path: Path
) -> None:
    stack = await make_stack(scenario(31), api_token=API_TOKEN, vad_silence_duration_ms=300)
    state = stack.app.state.livecall
    sid = "CA4064a6e6d2e1ddfeef58f7b3f0419850"
    url = f"{stack.base_url}/api/calls/{sid}"
    async with httpx.AsyncClient(headers=AUTH) as client:
        call = asyncio.create_task(stack.caller(question(then_wait_ms=1500), call_sid=sid).run())

        async def answered() -> bool:
            return sid in state.registry.active and (await client.get(url)).status_code == 200

        await eventually(answered, within=15)
        r = await client.delete(url)
        assert r.status_code == 409, r.text  # in progress: refused, nothing erased
        assert (await client.get(url)).status_code == 200
        await call
        await call_over(stack)
        done = (await client.get(url)).json()
        assert done["status"] == "completed" and done["has_recording"]

        assert (await client.delete(url)).status_code == 204
        assert (await client.get(url)).status_code == 404
        assert (await client.get(url + "/recording")).status_code == 404

        # records of the call arriving late, as from a spool replayed after an outage
        settings = stack.settings
        spooled = CallStore(
            Settings(database_url=DEAD_PG_URL, spool_dir=tmp_path / "late-spool"),
            migrate=False,
            write_timeout_s=5,
        )
        await spooled.start()
        late = spooled.observer(sid)
        late.call_started(CallInfo(sid, "MZLATE", done_started(done)))
        late.turn(TurnRecord(sid, 0, "caller", "late words", 0, 500))
        late.call_ended(CallSummary(sid, done_started(done), 1.0, "caller_stop"))
        assert not await spooled.flush()
        await spooled.close(timeout=2)
        replay = CallStore(
            Settings(database_url=settings.database_url, spool_dir=tmp_path / "late-spool"),
            migrate=False,
        )
        async with replay:
            assert await replay.flush()  # replayed, and dropped by the tombstone
        # and from the live store too
        state.store.observer(sid).turn(TurnRecord(sid, 9, "agent", "ghost", 0, 100))
        assert await state.store.flush()
        assert (await client.get(url)).status_code == 404
        listing = (await client.get(f"{stack.base_url}/api/calls")).json()
        assert sid not in {c["call_sid"] for c in listing["items"]}


def done_started(call: dict[str, Any]) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(call["started_at"])


async def test_retention_expires_old_recordings_through_the_repository_and_settings(
    make_stack: Any, call_over: Any, tmp_path: Path
) -> None:
    home = tmp_path / "kept"
    paths = {
        "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
        "recordings_dir": home / "recordings",
        "spool_dir": home / "spool",
        "api_token": API_TOKEN,
        "vad_silence_duration_ms": 300,
    }
    old, new = "CAaf5aaa272b8787bfd7945e96d210ec90", "CAd97159784f598c091e571933f0187843"
    first = await make_stack(scenario(32), **paths)
    for sid in (old, new):
        result = await first.caller(question(), call_sid=sid).run()
        assert result.response_latencies_ms
    await call_over(first)
    [old_file] = (home / "recordings").glob(f"{old}.*")
    [new_file] = (home / "recordings").glob(f"{new}.*")
    await first.stop()
    three_days_ago = time.time() - 3 * 86400
    os.utime(old_file, (three_days_ago, three_days_ago))

    # a restart with RETENTION_DAYS=2: the retention job's first pass runs at start
    second = await make_stack(scenario(33), retention_days=2, **paths)
    async with httpx.AsyncClient(headers=AUTH) as client:

        async def expired() -> bool:
            r = await client.get(f"{second.base_url}/api/calls/{old}")
            return r.status_code == 200 and not r.json()["has_recording"]

        await eventually(expired, within=15)
        assert not old_file.exists()
        assert (await client.get(f"{second.base_url}/api/calls/{old}/recording")).status_code == 404
        kept = (await client.get(f"{second.base_url}/api/calls/{new}")).json()
        assert kept["has_recording"] and new_file.exists()
        r = await client.get(f"{second.base_url}/api/calls/{new}/recording")
        assert r.status_code == 200 and r.content[:4] == b"RIFF"
        # the record itself stays: retention is about recordings
        assert (await client.get(f"{second.base_url}/api/calls/{old}")).json()["turns"]


async def test_a_retention_pass_cut_off_by_a_stop_still_forgets_what_it_deleted(
    make_stack: Any, call_over: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stops while a retention pass is under way, a recording already deleted:
    its call forgets the recording on the way out. The next pass finds no file for it, so
    nothing else would, and the call would point at a recording gone for good."""
    home = tmp_path / "cut"
    paths = {
        "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
        "recordings_dir": home / "recordings",
        "spool_dir": home / "spool",
        "api_token": API_TOKEN,
        "vad_silence_duration_ms": 300,
    }
    old = "CA3e1f0c6b2a9d4e8f7a6b5c4d3e2f1a0b"
    first = await make_stack(scenario(35), **paths)
    assert (await first.caller(question(), call_sid=old).run()).response_latencies_ms
    await call_over(first)
    [old_file] = (home / "recordings").glob(f"{old}.*")
    await first.stop()
    three_days_ago = time.time() - 3 * 86400
    os.utime(old_file, (three_days_ago, three_days_ago))

    delete, deleted = LocalRecordingStore.delete, asyncio.Event()

    async def delete_then_stall(self: LocalRecordingStore, call_sid: str) -> bool:
        gone = await delete(self, call_sid)
        deleted.set()  # the pass goes on only once the server is stopping
        runner = next(t for t in asyncio.all_tasks() if t.get_name() == "retention")
        await eventually(lambda: _async(runner.cancelling() > 0), 30)
        return gone

    monkeypatch.setattr(LocalRecordingStore, "delete", delete_then_stall)
    second = await make_stack(scenario(36), retention_days=2, **paths)
    await asyncio.wait_for(deleted.wait(), 15)
    await second.stop()
    monkeypatch.undo()
    assert not old_file.exists()
    third = await make_stack(scenario(37), **paths)
    async with httpx.AsyncClient(headers=AUTH) as client:
        record = (await client.get(f"{third.base_url}/api/calls/{old}")).json()
    assert record["turns"] and not record["has_recording"]


async def _async(value: Any) -> Any:
    return value


async def test_a_recording_whose_record_never_landed_is_still_found(
    make_stack: Any, call_over: Any
) -> None:
    """The recording is keyed by call SID on disk: a call whose records are lost still has
    its recording served, and erased."""
    stack = await make_stack(scenario(34), api_token=API_TOKEN, vad_silence_duration_ms=300)
    sid = "CAc52b13f01f36a9f207e07fb36b63be99"
    result = await stack.caller(question(), call_sid=sid).run()
    assert result.response_latencies_ms
    await call_over(stack)
    repo = stack.app.state.livecall.store.repo
    from sqlalchemy import delete

    from livecall.store.models import Call

    async with repo.sessions.begin() as session:  # as if its records never landed
        await session.execute(delete(Call).where(Call.call_sid == sid))
    async with httpx.AsyncClient(headers=AUTH) as client:
        assert (await client.get(f"{stack.base_url}/api/calls/{sid}")).status_code == 404
        r = await client.get(f"{stack.base_url}/api/calls/{sid}/recording")
        assert r.status_code == 200 and r.content[:4] == b"RIFF"
        assert (await client.delete(f"{stack.base_url}/api/calls/{sid}")).status_code == 204
        assert (await client.get(f"{stack.base_url}/api/calls/{sid}/recording")).status_code == 404
