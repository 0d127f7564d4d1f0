"""Nothing lost: call records survive a database outage followed by a SIGKILL.

The whole path runs for real: `livecall serve` as a subprocess, its DATABASE_URL pointing at a
PostgreSQL port where nothing listens, two calls from simulated callers through the real SDK to
the fake Gemini Live, then SIGKILL (an OOM kill, a lost node: no shutdown hook runs). The
server is started again with a reachable PostgreSQL (a fresh database: it migrates it) and both
calls' records must be there: the call row, its turns and its events.

The unit tests below pin the spool's limits: bounded in bytes (SPOOL_MAX_BYTES) and in memory,
loud (log + alarm metric) when it fills or the disk fails, and whole again afterwards.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from livecall.metrics import Metrics
from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.settings import Settings
from livecall.sim.clips import load_clip
from livecall.sim.gemini import FakeGeminiServer, Scenario
from livecall.sim.twilio import HangUp, Say, SimulatedCaller, WaitForAgentSilence
from livecall.store import db
from livecall.store import writer as writer_module
from livecall.store.writer import SPOOL_PREFIX, CallStore
from pg_support import DEAD_PG_URL, fresh_database, table_counts
from support import eventually
from test_store import Outage

TOKEN = "durability-twilio-token-0123456789"
API_KEY = "durability-gemini-key-0123456789"
API_TOKEN = "durability-api-token-0123456789"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spool_files(spool: Path) -> list[Path]:
    return sorted(spool.glob(f"{SPOOL_PREFIX}*"))


class Server:
    """One `livecall serve` subprocess on a port of its own."""

    def __init__(self, env: dict[str, str], home: Path, name: str) -> None:
        self.env = env
        self.home = home
        self.name = name
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Server:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "livecall.cli",
            "serve",
            "--host",
            "127.0.0.1",
            env={**self.env, "PORT": str(self.port), "PUBLIC_URL": self.base},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=(self.home / f"{self.name}.log").open("wb"),
        )
        return self

    async def ready(self, client: httpx.AsyncClient) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            log = (self.home / f"{self.name}.log").read_text()[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{log}")
        try:
            return (await client.get(self.base + "/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    def caller(self, call_sid: str) -> SimulatedCaller:
        pcm, rate = load_clip("hours")
        return SimulatedCaller(
            self.base,
            auth_token=TOKEN,
            call_sid=call_sid,
            script=[
                Say(pcm, rate=rate, label="hours"),
                WaitForAgentSilence(silence_ms=500, timeout=15),
                HangUp(),
            ],
            timeout=30,
        )


@pytest.mark.postgres
@pytest.mark.timeout(120)
async def test_two_calls_during_a_database_outage_survive_sigkill_and_land_on_restart(
    tmp_path: Path,
) -> None:
    scenario = Scenario(seed=11, greeting=None, pause_prob=0.0, first_audio_delay=0.2)
    async with fresh_database() as database_url, FakeGeminiServer(scenario=scenario) as gemini:
        spool = tmp_path / "spool"
        env = {
            **os.environ,
            "GEMINI_API_KEY": API_KEY,
            "GEMINI_BASE_URL": gemini.base_url,
            "GEMINI_CA_FILE": str(gemini.ca_file),
            "TWILIO_AUTH_TOKEN": TOKEN,
            "LIVECALL_API_TOKEN": API_TOKEN,
            "DATABASE_URL": DEAD_PG_URL,
            "SPOOL_DIR": str(spool),
            "RECORDINGS_DIR": str(tmp_path / "recordings"),
            "VAD_SILENCE_DURATION_MS": "300",
            "LOG_FORMAT": "json",
        }
        sids = ["CA3c8ddd776658334318f5ace2b71d4356", "CA12208a6ae795134b548b0786691cc5ef"]
        first = await Server(env, tmp_path, "outage").start()
        second: Server | None = None
        try:
            async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
                # the database is unreachable, but the spool keeps records: ready for calls
                await eventually(lambda: first.ready(client), within=30)
                for sid in sids:
                    result = await first.caller(sid).run()
                    assert result.webhook_status == 200 and result.ended_by == "caller"
                    assert result.response_latencies_ms, "the agent never answered"

                async def idle() -> bool:
                    return (await client.get(first.base + "/health")).json()["active_calls"] == 0

                # a call is let go only once its records are on disk
                await eventually(idle, within=30)
                assert _spool_files(spool) and all(p.stat().st_size for p in _spool_files(spool))
                assert all(p.stat().st_mode & 0o777 == 0o600 for p in _spool_files(spool))
                await first.kill()  # no shutdown: only what is on disk survives
                assert await table_counts(database_url, sids[0]) == (0, 0, 0)

                # the database is back (fresh: the server migrates it) and the spool replays
                second = await Server(
                    {**env, "DATABASE_URL": database_url}, tmp_path, "recovered"
                ).start()
                await eventually(lambda: second.ready(client), within=30)

                async def landed() -> bool:
                    for sid in sids:
                        calls, turns, events = await table_counts(database_url, sid)
                        if calls != 1 or turns < 2 or events < 1:
                            return False
                    return True

                await eventually(landed, within=30)
                for sid in sids:
                    r = await client.get(f"{second.base}/api/calls/{sid}")
                    assert r.status_code == 200, r.text
                    call = r.json()
                    assert call["status"] == "completed" and call["end_reason"]
                    assert {t["speaker"] for t in call["turns"]} == {"caller", "agent"}
                    assert any(e["kind"] == "session_started" for e in call["events"])
                await eventually(lambda: _no_spool_left(spool), within=15)
        finally:
            await first.kill()
            if second is not None:
                await second.kill()


async def _no_spool_left(spool: Path) -> bool:
    return not _spool_files(spool)


# --- the spool's bounds ---------------------------------------------------------------------


def _dead_store(tmp_path: Path, **kw: Any) -> CallStore:
    settings = Settings(
        database_url=DEAD_PG_URL, spool_dir=tmp_path / "spool", **kw.pop("settings", {})
    )
    return CallStore(settings, migrate=False, write_timeout_s=5, spool_retry_s=0.05, **kw)


def _busy_call(store: CallStore, sid: str, turns: int) -> None:
    obs = store.observer(sid)
    obs.call_started(CallInfo(sid, "MZ" + sid, T0, from_number="+15550001111"))
    for i in range(turns):
        obs.turn(TurnRecord(sid, i, "caller" if i % 2 else "agent", f"words {i} " * 20, i * 900))
        obs.event(CallEventRecord(sid, i * 900 + 5, "dtmf", {"digits": "1"}))


def _metric(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def test_a_full_spool_raises_the_alarm_and_keeps_memory_bounded(tmp_path: Path) -> None:
    metrics = Metrics()
    store = _dead_store(
        tmp_path, settings={"spool_max_bytes": 4096}, memory_limit=50, metrics=metrics
    )
    await store.start()
    try:
        with structlog.testing.capture_logs() as logs:
            _busy_call(store, "CAFIRST", 3)  # small: fits
            assert not await store.flush()  # the database is down
            assert await store.settled("CAFIRST", timeout=10)
            assert store.health()["spool_full"] is None
            _busy_call(store, "CAFLOOD", 200)  # 400 ops of ~250 bytes: far past 4 KiB
            await eventually(_true(lambda: store.health()["spool_full"] is not None), within=10)
            # the call is not held up waiting for a disk that refuses
            assert not await asyncio.wait_for(store.settled("CAFLOOD", timeout=30), 1)
        health = store.health()
        assert health["spool_bytes"] <= 4096
        assert sum(p.stat().st_size for p in _spool_files(tmp_path / "spool")) <= 4096
        assert health["held"] <= 50  # memory bounded
        assert health["lost"] > 0 and health["lost"] + health["held"] + health["spooled"] >= 400
        assert _metric(metrics, "livecall_records_spool_full") == 1
        assert _metric(metrics, "livecall_records_lost_total") == health["lost"]
        assert _metric(metrics, "livecall_records_database_up") == 0
        assert 0 < _metric(metrics, "livecall_records_spool_bytes") <= 4096
        errors = [e for e in logs if e["log_level"] == "error"]
        assert any("SPOOL FULL" in e["event"] for e in errors)
        assert any("LOST" in e["event"] for e in errors)
        # new calls cannot be kept now: said for each of them (/ready reads the same)
        assert store.can_record() == "spool_full"
        with structlog.testing.capture_logs() as logs:
            store.observer("CANEXT").call_started(CallInfo("CANEXT", "MZN", T0))
        assert [e["call_sid"] for e in logs if e["event"].startswith("call.not_recorded")] == [
            "CANEXT"
        ]
        assert _metric(metrics, "livecall_calls_unrecorded_total") == 0  # labelled
        assert (
            metrics.registry.get_sample_value(
                "livecall_calls_unrecorded_total", {"reason": "spool_full"}
            )
            == 1
        )
    finally:
        await store.close(timeout=2)


async def test_a_disk_that_refuses_writes_loses_nothing_it_can_hold_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC mid-outage: the spool file keeps no half line, records wait in (bounded)
    memory, and once the disk takes writes again every record reaches the database."""
    engine_url = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    engine = db.make_engine(engine_url)
    await db.upgrade(engine)
    outage = Outage(engine)
    metrics = Metrics()
    settings = Settings(database_url=engine_url, spool_dir=tmp_path / "spool")
    store = CallStore(
        settings,
        engine=engine,
        migrate=False,
        spool_retry_s=0.05,
        memory_limit=500,
        metrics=metrics,
    )
    await store.start()
    real_write = os.write
    full = {"on": False}

    def write(fd: int, data: Any) -> int:
        if full["on"]:
            real_write(fd, bytes(data[:7]))  # a torn line, as a real full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", write)
    try:
        outage.down = True
        _busy_call(store, "CADISK1", 5)
        assert not await store.flush()
        assert await store.settled("CADISK1", timeout=10)
        [spool_file] = _spool_files(tmp_path / "spool")
        size_before = spool_file.stat().st_size
        full["on"] = True
        with structlog.testing.capture_logs() as logs:
            _busy_call(store, "CADISK2", 5)
            await eventually(_true(lambda: store.health()["spool_full"] is not None), within=10)
        assert (
            "ENOSPC" in store.health()["spool_full"] or "No space" in store.health()["spool_full"]
        )
        assert any("SPOOL FULL" in e["event"] for e in logs if e["log_level"] == "error")
        assert _metric(metrics, "livecall_records_spool_full") == 1
        assert spool_file.stat().st_size == size_before  # the torn bytes were cut off
        assert store.health()["held"] == 12 and store.health()["lost"] == 0  # 1+5+5+answered
        full["on"] = False  # space again: the held records go to disk
        await eventually(_true(lambda: store.health()["held"] == 0), within=10)
        assert store.health()["spool_full"] is None
        assert _metric(metrics, "livecall_records_spool_full") == 0
        outage.down = False
        assert await store.flush()
        call1, call2 = await store.repo.get_call("CADISK1"), await store.repo.get_call("CADISK2")
        assert call1 is not None and len(call1.turns) == 5 and len(call1.events) == 5
        assert call2 is not None and len(call2.turns) == 5 and len(call2.events) == 5
        assert store.health()["rejected"] == 0  # no torn line was ever read back
    finally:
        await store.close(timeout=2)
        await engine.dispose()


def _true(check: Any) -> Any:
    async def run() -> bool:
        return bool(check())

    return run


async def test_a_call_is_settled_on_disk_while_the_database_is_down(tmp_path: Path) -> None:
    """`settled()` (what a call's task awaits before it ends) means: fsynced in the spool."""
    store = _dead_store(tmp_path)
    await store.start()
    try:
        _busy_call(store, "CASETTLE", 2)
        store.observer("CASETTLE").call_ended(CallSummary("CASETTLE", T0, 2.0, "caller_stop"))
        assert await store.settled("CASETTLE", timeout=10)
        lines = b"".join(p.read_bytes() for p in _spool_files(tmp_path / "spool")).splitlines()
        assert len(lines) == 1 + 2 + 2 + 1 + 1  # start, turns, events, answered, end
        assert b'"op":"end"' in lines[-1]
    finally:
        await store.close(timeout=2)


async def test_another_host_s_spool_is_replayed_only_once_it_stops_being_refreshed(
    tmp_path: Path,
) -> None:
    """On a shared volume whose locks are per client (Cloud Run's NFS), a lock cannot tell a
    live pod's spool from a dead one's: another host's file is claimed only once its writer
    has stopped refreshing it; this host's files as soon as their lock is free."""
    engine_url = f"sqlite+aiosqlite:///{tmp_path / 'calls.db'}"
    spool = tmp_path / "spool"
    spool.mkdir()
    line = (
        b'{"op":"start","call_sid":"%s","started_at":"2025-03-01T12:00:00+00:00",'
        b'"direction":"inbound","custom_parameters":{}}\n'
    )
    foreign = spool / f"{SPOOL_PREFIX}otherpod-1-0123456789ab.jsonl"
    foreign.write_bytes(line % b"CAFOREIGN")
    local = spool / f"{SPOOL_PREFIX}{writer_module._HOST}-1-0123456789ab.jsonl"
    local.write_bytes(line % b"CALOCAL")
    settings = Settings(database_url=engine_url, spool_dir=spool)
    async with CallStore(settings) as store:
        assert await store.flush()
        assert await store.repo.get_call("CALOCAL") is not None
        assert await store.repo.get_call("CAFOREIGN") is None and foreign.exists()
    old = time.time() - writer_module.FOREIGN_SPOOL_AGE_S - 5
    os.utime(foreign, (old, old))  # its writer stopped refreshing it: gone
    async with CallStore(settings) as store:
        assert await store.flush()
        assert await store.repo.get_call("CAFOREIGN") is not None
    assert _spool_files(spool) == []


def test_deployments_keep_the_spool_and_recordings_on_persistent_volumes() -> None:
    import subprocess

    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    docs = {}
    for path in sorted((deploy / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    claim = docs["PersistentVolumeClaim"]
    for path in ("/app/spool", "/app/recordings"):
        volume = volumes[mounts[path]["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    kustomization = yaml.safe_load((deploy / "k8s" / "kustomization.yaml").read_text())
    assert "pvc.yaml" in kustomization["resources"]

    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    service_volumes = compose["services"]["livecall"]["volumes"]
    for path in ("/app/spool", "/app/recordings"):
        named = next(v.split(":")[0] for v in service_volumes if v.endswith(":" + path))
        assert named in compose["volumes"]  # a named volume: persists across re-creates

    env = {**os.environ, "DRY_RUN": "1", "PROJECT": "p", "NFS_SERVER": "10.0.0.2"}
    out = subprocess.run(
        ["bash", str(deploy / "cloudrun" / "deploy.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    deploy_line = next(line for line in out.splitlines() if " run deploy " in line)
    assert "type=nfs" in deploy_line and "SPOOL_DIR=/data/spool" in deploy_line
    assert "RECORDINGS_DIR=/data/recordings" in deploy_line
    warned = subprocess.run(
        ["bash", str(deploy / "cloudrun" / "deploy.sh")],
        env={**env, "NFS_SERVER": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stderr
    assert "NFS_SERVER" in warned  # without a share, the deploy says what is at stake
