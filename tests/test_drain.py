"""SIGTERM on a real `livecall serve` process with a call in progress."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from livecall.sim.clips import load_clip
from livecall.sim.gemini import FakeGeminiServer, Scenario
from livecall.sim.twilio import Pause, Say, SimulatedCaller

pytestmark = pytest.mark.timeout(90)
TOKEN = "drain-test-twilio-token-0123456789"
API_KEY = "drain-test-gemini-key-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_healthy(url: str, proc: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as client:
        async with asyncio.timeout(30):
            while True:
                if proc.returncode is not None:
                    raise RuntimeError("livecall serve exited early")
                try:
                    if (await client.get(url + "/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)


async def test_sigterm_ends_calls_with_a_goodbye_refuses_new_ones_and_exits_0(
    tmp_path: Path,
) -> None:
    scenario = Scenario(
        seed=7, replies={"book": "one_moment"}, greeting="goodbye", default_text_reply="goodbye"
    )
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
            "PORT": str(port),
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/calls.db",
            "RECORDINGS_DIR": str(tmp_path / "rec"),
            "SPOOL_DIR": str(tmp_path / "spool"),
            "DRAIN_TIMEOUT": "6",
            "LOG_FORMAT": "json",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "livecall.cli",
            "serve",
            "--host",
            "127.0.0.1",
            env=env,
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        try:
            await _wait_healthy(base, proc)
            book, rate = load_clip("book")
            caller = SimulatedCaller(
                base,
                auth_token=TOKEN,
                seed=7,
                timeout=60,
                script=[Pause(300), Say(book, rate=rate), Pause(40000)],
            )
            call = asyncio.create_task(caller.run())
            await gemini.wait_for(
                lambda: any(t.completed for s in gemini.sessions for t in s.turns), timeout=30
            )
            proc.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient() as client:
                async with asyncio.timeout(10):
                    while (await client.get(base + "/ready")).status_code != 503:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            late = await SimulatedCaller(base, auth_token=TOKEN, script=[Pause(100)]).run()
            assert late.rejected or late.said  # the busy answer, no session opened
            result = await call
            code = await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        logs = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert code == 0, logs[-3000:]
    assert result.ended_by == "server"
    assert '"call.summary"' in logs and '"end_reason": "shutdown"' in logs, logs[-3000:]
    # the goodbye was spoken to the caller before the stream closed
    sessions_texts = [c for s in gemini.sessions for c in s.client_contents]
    assert any("maintenance" in str(c) for c in sessions_texts)
