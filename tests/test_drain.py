"""SIGTERM on a real `livecall serve` process with a call in progress."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from livecall.server.drain import drain_calls
from livecall.sim.clips import load_clip
from livecall.sim.gemini import FakeGeminiServer, Scenario
from livecall.sim.twilio import Pause, Say, SimulatedCaller, WaitForAgentSilence

pytestmark = pytest.mark.timeout(90)
DRAIN_TIMEOUT_S = 16.0
# the last part of DRAIN_TIMEOUT kept for the goodbye (drain_calls' goodbye_s)
GOODBYE_WINDOW_S: float = inspect.signature(drain_calls).parameters["goodbye_s"].default
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


async def test_sigterm_lets_calls_go_on_then_says_a_goodbye_the_caller_hears_and_exits_0(
    tmp_path: Path, audio: Any
) -> None:
    scenario = Scenario(
        seed=7,
        replies={"book": "one_moment", "hours": "hours_reply"},
        # livecall serve has no greeting, so the first text turn (the goodbye line) gets the
        # fake's greeting reply: make both the goodbye clip
        greeting="goodbye",
        default_text_reply="goodbye",
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
            "DRAIN_TIMEOUT": str(DRAIN_TIMEOUT_S),
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
        loop = asyncio.get_running_loop()
        try:
            await _wait_healthy(base, proc)
            book, book_rate = load_clip("book")
            hours, hours_rate = load_clip("hours")
            caller = SimulatedCaller(
                base,
                auth_token=TOKEN,
                seed=7,
                timeout=60,
                script=[
                    Pause(300),
                    Say(book, rate=book_rate, label="book"),
                    WaitForAgentSilence(silence_ms=800, timeout=20),
                    Pause(1000),
                    # asked after SIGTERM: a draining call is still served
                    Say(hours, rate=hours_rate, label="hours"),
                    WaitForAgentSilence(silence_ms=800, timeout=20),
                    Pause(40000),
                ],
            )
            call = asyncio.create_task(caller.run())
            await gemini.wait_for(
                lambda: any(t.completed for s in gemini.sessions for t in s.turns), timeout=30
            )
            proc.send_signal(signal.SIGTERM)
            sigterm_at = loop.time()
            async with httpx.AsyncClient() as client:
                async with asyncio.timeout(10):
                    while (await client.get(base + "/ready")).status_code != 503:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            late = await SimulatedCaller(base, auth_token=TOKEN, script=[Pause(100)]).run()
            assert late.rejected or late.said  # the busy answer, no session opened
            result = await call
            code = await asyncio.wait_for(proc.wait(), 30)
            exited_at = loop.time()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        logs = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert code == 0, logs[-3000:]
    assert result.ended_by == "server"
    assert '"call.summary"' in logs and '"end_reason": "shutdown"' in logs, logs[-3000:]
    assert '"server.gc_frozen"' in logs  # startup's objects out of the collector's way
    heard = result.heard_pcm()
    # The call went on after SIGTERM: the question asked during the drain was answered ...
    answer_start, _ = audio.span_of(heard, "hours_reply")
    assert answer_start > audio.at(result, sigterm_at)
    # ... and the goodbye came only when the drain's time was up, not at once:
    goodbye_from = sigterm_at + DRAIN_TIMEOUT_S - GOODBYE_WINDOW_S
    goodbye_start, goodbye_end = audio.span_of(heard, "goodbye")
    assert goodbye_start >= audio.at(result, goodbye_from - 0.5), (
        f"goodbye {(goodbye_start - audio.at(result, sigterm_at)) / 8000:.1f} s after SIGTERM"
    )
    # The caller heard the whole goodbye before the line was closed, then nothing else.
    assert audio.heard_share(heard, "goodbye") > 0.9
    assert audio.loud_ms(heard[goodbye_end:]) == 0.0
    maintenance = [c for s in gemini.sessions for c in s.client_contents if "maintenance" in str(c)]
    assert len(maintenance) == 1  # the goodbye is livecall's line, said by the agent
    # and the whole drain fit in DRAIN_TIMEOUT (plus the process's own exit)
    assert exited_at - sigterm_at < DRAIN_TIMEOUT_S + 5.0
