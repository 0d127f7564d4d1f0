"""`livecall serve --workers 2`: real processes, calls on both workers, /metrics summed, and a
SIGTERM that lets every call hear its goodbye before the parent exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from livecall.metrics import Metrics, MetricsObserver
from livecall.records import CallEventRecord, CallInfo
from livecall.server.workers import split_limit, worker_env
from livecall.sim.gemini import FakeGeminiServer, Scenario
from livecall.sim.twilio import Pause, SimulatedCaller
from support import eventually

TOKEN = "workers-test-twilio-token-0123456789"
API_KEY = "workers-test-gemini-key-0123456789"
DRAIN_TIMEOUT_S = 10.0  # drain_calls keeps the last 8 s for the goodbye: it starts at ~2 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ pure parts


def test_split_limit_sums_to_the_global_limit_and_is_even() -> None:
    for total in (1, 7, 100, 501):
        for n in (2, 3, 8):
            shares = [split_limit(total, n, i) for i in range(n)]
            assert sum(shares) == total
            assert max(shares) - min(shares) <= 1


def test_worker_env_gives_each_worker_its_share_and_own_names(tmp_path: Path) -> None:
    envs = [
        worker_env(
            {"KEEP": "1", "MAX_CONCURRENT_CALLS": "999"},
            i,
            2,
            max_calls=101,
            max_gemini_sessions=9,
            admin_socket=tmp_path / "admin.sock",
            instance_id="pod-a",
            multiproc_dir=str(tmp_path),
        )
        for i in range(2)
    ]
    assert [e["MAX_CONCURRENT_CALLS"] for e in envs] == ["51", "50"]
    assert [e["MAX_GEMINI_SESSIONS"] for e in envs] == ["5", "4"]
    assert envs[0]["ADMIN_SOCKET"] != envs[1]["ADMIN_SOCKET"]
    assert [e["INSTANCE_ID"] for e in envs] == ["pod-a-w0", "pod-a-w1"]
    assert all(e["KEEP"] == "1" and e["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path) for e in envs)


def test_call_setup_time_is_observed_once_per_call() -> None:
    class Sink:
        def call_started(self, info: Any) -> None: ...
        def turn(self, turn: Any) -> None: ...
        def event(self, event: Any) -> None: ...
        def call_ended(self, summary: Any) -> None: ...

    m = Metrics()
    obs = MetricsObserver(Sink(), m)  # type: ignore[arg-type]
    obs.call_started(CallInfo("CA1", "MZ1", started_at=None))  # type: ignore[arg-type]
    obs.event(CallEventRecord("CA1", 420, "session_started"))
    obs.event(CallEventRecord("CA1", 9000, "session_resumed"))
    assert m.registry.get_sample_value("livecall_call_setup_seconds_count") == 1
    assert m.registry.get_sample_value("livecall_call_setup_seconds_sum") == pytest.approx(0.42)


async def test_loop_lag_monitor_sees_a_blocked_loop() -> None:
    import time

    from livecall.metrics import LoopLagMonitor

    m = Metrics()
    mon = LoopLagMonitor(m, interval_s=0.01)
    mon.start()
    await asyncio.sleep(0.03)
    time.sleep(0.12)  # noqa: ASYNC251 (the stall a caller would hear)
    await asyncio.sleep(0.03)
    await mon.stop()
    assert mon.max_s >= 0.1
    assert m.registry.get_sample_value("livecall_event_loop_lag_max_seconds") >= 0.1
    assert m.registry.get_sample_value("livecall_event_loop_lag_seconds_count") >= 3
    assert mon.cpu_wait_s >= 0.0  # read from schedstat where Linux has it


def test_loop_cpu_wait_counts_only_increases() -> None:
    from livecall.metrics import LoopLagMonitor

    m = Metrics()
    mon = LoopLagMonitor(m)
    for total in (1_000_000_000, 1_030_000_000, 1_030_000_000, 1_080_000_000, None):
        mon.record_wait(total)
    assert mon.cpu_wait_s == pytest.approx(0.08)
    assert m.registry.get_sample_value("livecall_event_loop_cpu_wait_seconds_total") == (
        pytest.approx(0.08)
    )


# ------------------------------------------------------------------ real processes


def _active_by_pid(folder: Path) -> dict[int, float]:
    """Each worker's own livecall_active_calls, from its multiprocess file."""
    out: dict[int, float] = {}
    for f in folder.glob("gauge_livesum_*.db"):
        pid = int(re.search(r"_(\d+)\.db$", f.name).group(1))  # type: ignore[union-attr]
        d = MmapedDict(str(f), read_mode=True)
        try:
            for key, value, _ts in d.read_all_values():
                if '"livecall_active_calls"' in key.split(",", 1)[0]:
                    out[pid] = out.get(pid, 0.0) + value
        finally:
            d.close()
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["reuseport", "shared"])
async def test_two_workers_share_calls_sum_metrics_and_drain_with_goodbyes(
    tmp_path: Path, audio: Any, mode: str
) -> None:
    scenario = Scenario(seed=3, greeting="goodbye", default_text_reply="goodbye")
    prom = tmp_path / "prom"
    async with FakeGeminiServer(scenario=scenario) as gemini:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "GEMINI_API_KEY": API_KEY,
            "GEMINI_BASE_URL": gemini.base_url,
            "GEMINI_CA_FILE": str(gemini.ca_file),
            "TWILIO_AUTH_TOKEN": TOKEN,
            "PUBLIC_URL": base,
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/calls.db",
            "RECORDINGS_DIR": str(tmp_path / "rec"),
            "SPOOL_DIR": str(tmp_path / "spool"),
            "DRAIN_TIMEOUT": str(DRAIN_TIMEOUT_S),
            "PROMETHEUS_MULTIPROC_DIR": str(prom),
            "MAX_CONCURRENT_CALLS": "40",
            "LOG_FORMAT": "json",
        }
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "livecall.cli", "serve", "--host", "127.0.0.1"],
            *["--port", str(port), "--workers", "2", "--worker-socket", mode],
            env=env,
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        calls: list[asyncio.Task[Any]] = []
        try:
            async with httpx.AsyncClient(trust_env=False) as http:

                async def healthy() -> bool:
                    assert proc.returncode is None, "livecall serve --workers 2 exited early"
                    try:
                        return (await http.get(base + "/health")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(healthy, within=40)

                async def both_workers_busy() -> bool:
                    by_pid = _active_by_pid(prom)
                    return len([v for v in by_pid.values() if v > 0]) >= 2

                # new calls until each worker carries at least one (the kernel picks)
                for i in range(12):
                    caller = SimulatedCaller(
                        base, auth_token=TOKEN, seed=i, timeout=60, script=[Pause(50_000)]
                    )
                    calls.append(asyncio.create_task(caller.run()))
                    n = len(calls)

                    async def all_up(n: int = n) -> bool:
                        return sum(_active_by_pid(prom).values()) >= n

                    await eventually(all_up, within=20)
                    if await both_workers_busy():
                        break
                assert await both_workers_busy(), _active_by_pid(prom)
                body = (await http.get(base + "/metrics")).text
                summed = re.search(r"^livecall_active_calls (\S+)$", body, re.M)
                assert summed is not None and float(summed.group(1)) == len(calls), body[:2000]
                assert "livecall_event_loop_lag_seconds_bucket" in body

            proc.send_signal(signal.SIGTERM)
            results = await asyncio.wait_for(asyncio.gather(*calls), 40)
            code = await asyncio.wait_for(proc.wait(), 30)
        finally:
            for t in calls:
                t.cancel()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        logs = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert code == 0, logs[-3000:]
    for r in results:
        assert r.ended_by == "server", logs[-2000:]
        heard = r.heard_pcm()
        pieces = [at is not None for _, at in audio.pieces_in(heard, "goodbye")]
        # heard to its end; one 200 ms piece of 8 may straddle a playout gap on a busy machine
        assert pieces[-1] and sum(pieces) >= len(pieces) - 1, pieces
        _, end = audio.span_of(heard, "goodbye")
        assert audio.loud_ms(heard[end:]) == 0.0  # nothing after the goodbye
    assert logs.count('"end_reason": "shutdown"') == len(results), logs[-3000:]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.timeout(90)
async def test_a_worker_that_dies_is_replaced_and_the_parent_still_exits_0(tmp_path: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "GEMINI_API_KEY": API_KEY,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "PUBLIC_URL": base,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/calls.db",
        "SPOOL_DIR": str(tmp_path / "spool"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "livecall.cli", "serve", "--host", "127.0.0.1"],
        *["--port", str(port), "--workers", "2"],
        env=env,
        stderr=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(trust_env=False) as http:

            async def healthy() -> bool:
                try:
                    return (await http.get(base + "/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(healthy, within=40)

            async def two_workers() -> list[int]:
                kids = _children(proc.pid)
                return kids if len(kids) == 2 else []

            first = await eventually(two_workers, within=20)
            os.kill(first[0], signal.SIGKILL)

            async def replaced() -> bool:
                kids = _children(proc.pid)
                return len(kids) == 2 and first[0] not in kids and await healthy()

            await eventually(replaced, within=30)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0
