"""A carrier without marks, or without clear: the core falls back, and says so (#13).

No carrier livecall speaks lacks marks or clear today, so the fallback is exercised through a
test-only carrier: Telnyx's real adapter with `Capabilities(marks=False)` (or `clear=False`),
whose `mark()` / `clear()` send nothing. It is served through the generic carrier routes
(`create_app(extra_carriers=...)`) and rung from the real Telnyx simulator, so every call here
is a real call through the real server, the real adapter and real WebSockets.

Without marks the core settles each mark itself when its pacing model says the audio has
played (`CallBridge._estimated_echo`), and the heard part of an interrupted turn is
"estimated". Without clear a barge-in sends nothing more and the carrier's queue runs out.
"""

from __future__ import annotations

import asyncio
import secrets
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import yaml
from typer.testing import CliRunner

from livecall.carriers.base import Capabilities, CarrierEvent, CarrierStream, Frame
from livecall.carriers.telnyx import TelnyxCarrier, busy_texml
from livecall.server.app import create_app
from livecall.server.carrier_route import CarrierRoute
from livecall.settings import Settings
from livecall.sim.gemini import Scenario, ToolCallFault
from livecall.sim.stack import LocalStack
from livecall.sim.telnyx import TelnyxSimulatedCaller, generate_keypair
from livecall.sim.twilio import (
    HangUp,
    Pause,
    WaitForAgentAudio,
    WaitForAgentSilence,
)
from livecall.store.cli import calls_app
from support import assert_clean, say

SEED, PUBLIC = generate_keypair()
FAST = {"vad_silence_duration_ms": 300}
API_TOKEN = "estimated-playout-api-token-0123456789"
BOUND_MS = 100  # the pacing model vs the carrier's real playout (measured: ~15 ms on loopback)


class LimitedStream:
    """A real `TelnyxStream` whose carrier cannot confirm playout (`marks`) or drop its queue
    (`clear`): those builders send nothing, as the `CarrierStream` contract says."""

    def __init__(self, inner: CarrierStream, capabilities: Capabilities) -> None:
        self.inner = inner
        self.capabilities = capabilities

    @property
    def media_format(self) -> Any:
        return self.inner.media_format

    @property
    def started(self) -> Any:
        return self.inner.started

    def __getattr__(self, name: str) -> Any:  # counters (frames_missing…) read through
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def receive(self, frame: Frame) -> CarrierEvent:
        return self.inner.receive(frame)

    def closed(self, code: int | None = None) -> Any:
        return self.inner.closed(code)

    def play(self, audio: bytes) -> list[Frame]:
        return self.inner.play(audio)

    def flush(self) -> list[Frame]:
        return self.inner.flush()

    def mark(self, name: str) -> list[Frame]:
        return self.inner.mark(name) if self.capabilities.marks else []

    def clear(self) -> list[Frame]:
        return self.inner.clear() if self.capabilities.clear else []

    def send_dtmf(self, digits: str) -> list[Frame]:
        return self.inner.send_dtmf(digits)

    def hangup(self) -> list[Frame]:
        return self.inner.hangup()


class LimitedCarrier:
    """Telnyx as a carrier with fewer capabilities, under its own name and paths."""

    def __init__(self, name: str, **missing: bool) -> None:
        self.inner = TelnyxCarrier(PUBLIC)
        self.name = name
        self.capabilities = replace(self.inner.capabilities, **missing)

    def new_stream(self, *, max_frame_bytes: int) -> LimitedStream:
        inner = self.inner.new_stream(max_frame_bytes=max_frame_bytes)
        return LimitedStream(inner, self.capabilities)

    def answer_document(self, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        return self.inner.answer_document(stream_url, parameters)

    def verify_webhook(self, url: str, headers: Mapping[str, str], body: bytes) -> bool:
        return self.inner.verify_webhook(url, headers, body)


NO_MARKS = LimitedCarrier("nomarks", marks=False)
NO_CLEAR = LimitedCarrier("noclear", clear=False)


def route(carrier: LimitedCarrier) -> CarrierRoute:
    return CarrierRoute(
        carrier, f"/{carrier.name}/texml", "CallSid", lambda m, r: busy_texml(m, reject=r)
    )


StackMaker = Callable[..., Awaitable[LocalStack]]


@pytest.fixture
async def limited_stack(tmp_path: Path) -> AsyncIterator[StackMaker]:
    """`await limited_stack(carrier, scenario, **settings)`: the real app serving `carrier`."""
    stacks: list[LocalStack] = []

    async def make(carrier: LimitedCarrier, scenario: Scenario, **overrides: Any) -> LocalStack:
        home = tmp_path / f"stack{len(stacks)}"
        settings: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
            "recordings_dir": home / "recordings",
            "spool_dir": home / "spool",
            "api_token": API_TOKEN,
            **FAST,
            **overrides,
        }

        def app(s: Settings) -> Any:
            return create_app(s, extra_carriers=[route(carrier)])

        stack = LocalStack(scenario=scenario, settings_overrides=settings, app_factory=app)
        stacks.append(stack)
        await stack.start()
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            await stack.stop()


def ring(stack: LocalStack, carrier: LimitedCarrier, script: list[Any], **kw: Any) -> Any:
    # Telnyx's own ids ("v3:…") hold a colon, which the records API's sid pattern refuses;
    # these calls are read back through it, so they get ids it serves.
    kw.setdefault("call_sid", "v3-" + secrets.token_urlsafe(33))
    return TelnyxSimulatedCaller(
        stack.base_url,
        private_key=SEED,
        webhook_path=f"/{carrier.name}/texml",
        script=script,
        **kw,
    )


def model(seed: int, **kw: Any) -> Scenario:
    kw.setdefault("first_audio_delay", 0.2)
    return Scenario(seed=seed, greeting=None, pause_prob=0.0, **kw)


async def record(stack: LocalStack, call_sid: str) -> Any:
    return await stack.app.state.livecall.store.repo.get_call(call_sid)


def heard_of(heard: npt.NDArray[Any], clip: str, audio: Any) -> tuple[int, float, float]:
    """Where `clip` starts in `heard` (sample) and how much of it was heard there, in ms, as
    (at least, at most): the end of the last voiced 20 ms frame of the clip really heard, and
    the start of the first voiced frame after it that was not (a pause between the two could
    have played or not: silence sounds the same)."""
    ref = audio.phone_ref(clip)
    start, _ = audio.span_of(heard, clip)
    n = audio.FRAME
    x = np.asarray(heard[start : start + len(ref)], dtype=np.float64)
    voiced: list[tuple[int, bool]] = []
    for i in range(0, len(ref) - n + 1, n):
        r, y = ref[i : i + n], x[i : i + n] if i + n <= len(x) else np.zeros(n)
        if np.sqrt(np.mean(r * r)) >= 300:  # a pause in the clip says nothing either way
            voiced.append((i, float(r @ y) / (np.linalg.norm(r) * np.linalg.norm(y) + 1e-9) > 0.8))
    last = max((k for k, (_, ok) in enumerate(voiced) if ok), default=-1)
    lo = voiced[last][0] + n if last >= 0 else 0
    hi = voiced[last + 1][0] if last + 1 < len(voiced) else len(ref)
    return start, lo / 8.0, hi / 8.0


async def api_call(stack: LocalStack, call_sid: str) -> dict[str, Any]:
    """The call as the records API serves it."""
    async with httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await client.get(
            f"/api/calls/{call_sid}", headers={"Authorization": f"Bearer {API_TOKEN}"}
        )
    assert response.status_code == 200, response.text
    return response.json()


async def dashboard_page(stack: LocalStack, call_sid: str) -> str:
    """The call's page on the dashboard, signed in."""
    async with httpx.AsyncClient(base_url=stack.base_url) as client:
        response = await client.post("/login", data={"token": API_TOKEN, "next": "/"})
        assert response.status_code == 303, response.text
        page = await client.get(f"/calls/{call_sid}")
    assert page.status_code == 200, page.text
    return page.text


BARGE_IN = [
    Pause(200),
    say("yes"),
    WaitForAgentAudio(min_heard_ms=1000, timeout=10),
    say("hours"),
    WaitForAgentSilence(silence_ms=500, timeout=15),
    HangUp(),
]


def barge_in_model(seed: int) -> Scenario:
    """Replies at twice real time, so the carrier holds a second or so when the caller cuts in."""
    return model(seed, replies={"yes": "book_reply", "hours": "hours_reply"}, rate=2.0)


@pytest.mark.timeout(60)
async def test_a_whole_call_without_marks_is_paced_heard_and_recorded(
    limited_stack, call_over, leftover_tasks, audio
) -> None:
    stack = await limited_stack(NO_MARKS, model(7), recording_enabled=True, recording_format="wav")
    script = [say("hours"), WaitForAgentSilence(silence_ms=500, timeout=15), HangUp()]
    result = await ring(stack, NO_MARKS, script, seed=7).run()
    await call_over(stack)

    assert_clean(result)
    assert result.marks_received == [] and result.clears == []  # nothing but audio was sent
    assert audio.heard_share(result.heard_pcm(), "hours_reply") >= 0.9
    call = await record(stack, result.call_sid)
    assert call is not None and call.status == "completed", call
    assert [(t.speaker, t.interrupted) for t in call.turns] == [
        ("caller", False),
        ("agent", False),
    ]
    # the estimated echoes settled every chunk: the agent's audio is in the recording
    with wave.open(call.recording_key) as recording:
        frames = np.frombuffer(recording.readframes(recording.getnframes()), "<i2")
    assert audio.heard_share(frames[1::2], "hours_reply") >= 0.9
    assert stack.registry.active == {}
    assert leftover_tasks(result.call_sid) == []


@pytest.mark.timeout(60)
async def test_barge_in_without_marks_clears_and_the_transcript_says_estimated(
    limited_stack, call_over, audio
) -> None:
    stack = await limited_stack(NO_MARKS, barge_in_model(3))
    result = await ring(stack, NO_MARKS, BARGE_IN, seed=3).run()
    await call_over(stack)

    assert_clean(result)
    assert result.marks_received == [] and len(result.clears) == 1
    heard = result.heard_pcm()
    cleared_at = audio.at(result, result.clears[0])
    start, lo, hi = heard_of(heard, "book_reply", audio)
    assert start < cleared_at
    # the clear stopped the reply: what follows it is the next answer, not the rest of this one
    assert audio.heard_share(heard[cleared_at + 480 :], "book_reply") < 0.2
    assert audio.heard_share(heard[cleared_at + 480 :], "hours_reply") > 0.9

    call = await record(stack, result.call_sid)
    [cut] = [t for t in call.turns if t.interrupted]
    assert cut.heard_estimated and cut.heard_text and cut.text.startswith(cut.heard_text)
    assert len(cut.heard_text) < len(cut.text)
    [event] = [e for e in call.events if e.kind == "interrupted"]
    assert event.data["heard"] == "estimated"
    # the pacing model's estimate of what was heard is within the bound of what really was
    assert lo - BOUND_MS <= event.data["heard_ms"] <= hi + BOUND_MS, (event.data, lo, hi)
    assert lo - BOUND_MS <= cut.end_ms - cut.start_ms <= hi + BOUND_MS
    assert not any(t.heard_estimated for t in call.turns if not t.interrupted)

    served = await api_call(stack, result.call_sid)
    assert [t["heard_estimated"] for t in served["turns"]] == [t.interrupted for t in call.turns]
    page = await dashboard_page(stack, result.call_sid)
    assert page.count("heard: estimated") == 1
    assert "s of the reply (estimated)" in page
    shown = await asyncio.to_thread(  # `livecall calls show` runs its own event loop
        CliRunner().invoke,
        calls_app,
        ["show", result.call_sid, "--database-url", stack.settings.database_url.get_secret_value()],
        env={"COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert shown.exit_code == 0, shown.output
    assert shown.output.count("(interrupted)  (heard: estimated)") == 1, shown.output


@pytest.mark.timeout(60)
async def test_barge_in_without_clear_lets_the_queue_run_out(
    limited_stack, call_over, audio
) -> None:
    stack = await limited_stack(NO_CLEAR, barge_in_model(3))
    result = await ring(stack, NO_CLEAR, BARGE_IN, seed=3).run()
    await call_over(stack)

    assert_clean(result)
    assert result.clears == [] and result.marks_received  # marks, but no clear
    heard = result.heard_pcm()
    _, lo, hi = heard_of(heard, "book_reply", audio)
    assert audio.heard_share(heard, "hours_reply") > 0.9

    call = await record(stack, result.call_sid)
    [cut] = [t for t in call.turns if t.interrupted]
    [event] = [e for e in call.events if e.kind == "interrupted"]
    assert "heard" not in event.data and not cut.heard_estimated  # the marks confirm it
    # the queue kept playing after the barge-in, and nothing more of the reply was sent:
    # the caller heard what had been queued, which is what the record says was heard
    assert event.data["plays_for_ms"] > 300, event.data
    assert lo - BOUND_MS <= event.data["heard_ms"] <= hi + BOUND_MS, (event.data, lo, hi)
    assert lo - BOUND_MS <= cut.end_ms - cut.start_ms <= hi + BOUND_MS
    assert cut.barge_in_stop_ms is not None and cut.barge_in_stop_ms >= event.data["plays_for_ms"]


@pytest.mark.timeout(60)
async def test_end_call_without_marks_waits_for_the_estimated_end_of_the_goodbye(
    limited_stack, call_over, audio, tmp_path
) -> None:
    profiles = tmp_path / "profiles.yaml"
    profile = {"name": "agent", "default": True, "system_prompt": "A.", "tools": ["end_call"]}
    profiles.write_text(yaml.safe_dump({"profiles": [profile]}))
    hang_up = ToolCallFault(
        after_caller_turn=1, name="end_call", args={"reason": "done"}, say_first="goodbye"
    )
    scenario = Scenario(seed=9, greeting=None, pause_prob=0.0, tool_calls=[hang_up])
    stack = await limited_stack(NO_MARKS, scenario, profiles_file=profiles)
    result = await ring(stack, NO_MARKS, [say("hours")], seed=9, on_script_end="wait").run()
    await call_over(stack)

    assert result.ended_by == "server", result.timeline
    assert result.marks_received == []
    # the line stayed open until the goodbye had played out, by pacing alone
    heard = result.heard_pcm()
    start, _, hi = heard_of(heard, "goodbye", audio)
    assert hi == len(audio.phone_ref("goodbye")) / 8.0  # no voiced frame of it went unheard
    assert audio.at(result, result.ended) >= start + len(audio.phone_ref("goodbye")) - 800
    call = await record(stack, result.call_sid)
    assert call is not None and call.end_reason == "agent_hangup", call
