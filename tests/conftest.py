"""Shared fixtures: whole livecall installations on loopback, and a clean per-test deadline.

`make_stack(scenario, **settings)` starts a `LocalStack` (the fake Gemini Live over TLS, the
real app under uvicorn, signatures enforced) whose database, recordings and spool live in
the test's `tmp_path`; every stack a test made is stopped after it. `stack` is one such
stack with the default scenario. `call_over(stack)` waits until the server has let go of
its calls, `leftover_tasks(call_sid)` names a call's tasks still running, and `audio` holds
helpers to compare what a simulated caller heard with the agent clips.

Every coroutine test also runs under an `asyncio.timeout` a little shorter than its
pytest-timeout (`@pytest.mark.timeout(n)`, else the ini value): a hung await is cancelled
inside the event loop, so the failure shows where the test was waiting and fixtures still
tear the servers down, instead of pytest-timeout killing the run from outside.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soxr
from scipy.fft import next_fast_len
from scipy.signal import fftconvolve

from livecall.audio.g711 import ulaw_decode, ulaw_encode
from livecall.records import CallObserver
from livecall.sim.clips import AGENT_CLIPS, load_clip
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import CallResult

# --------------------------------------------------------------------------- per-test deadline

_DEFAULT_TIMEOUT_S = 120.0


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
        if value is not None:
            return float(value)
    try:
        value = item.config.getini("timeout")
    except ValueError:  # pytest-timeout not installed
        value = None
    return float(value) if value else _DEFAULT_TIMEOUT_S


def _with_deadline(func: Callable[..., Awaitable[Any]], seconds: float) -> Callable[..., Any]:
    @functools.wraps(func)
    async def run(*args: Any, **kwargs: Any) -> Any:
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await func(*args, **kwargs)
        except TimeoutError as exc:
            if not deadline.expired():  # the test's own bounded wait ran out: its error stands
                raise
            raise TimeoutError(
                f"test still waiting after {seconds:.0f} s (its event-loop deadline)"
            ) from exc

    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        func = getattr(item, "obj", None)
        if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(func):
            continue
        limit = _timeout_of(item)
        # leave pytest-timeout a margin for fixture setup and teardown
        item.obj = _with_deadline(func, max(1.0, min(limit * 0.85, limit - 5.0)))


# --------------------------------------------------------------------------- stacks

StackFactory = Callable[..., Awaitable[LocalStack]]


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[StackFactory]:
    """`await make_stack(Scenario(...), observer_factory=..., **settings_overrides)`."""
    stacks: list[LocalStack] = []

    async def make(
        scenario: Scenario | None = None,
        *,
        observer_factory: Callable[[str], CallObserver] | None = None,
        **overrides: Any,
    ) -> LocalStack:
        home = tmp_path / f"stack{len(stacks)}"
        home.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{home / 'calls.db'}",
            "recordings_dir": home / "recordings",
            "spool_dir": home / "spool",
        }
        settings.update(overrides)
        stack = LocalStack(
            scenario=scenario if scenario is not None else Scenario(seed=1),
            settings_overrides=settings,
            observer_factory=observer_factory,
        )
        await stack.start()
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in reversed(stacks):
            await stack.stop()


@pytest.fixture
async def stack(make_stack: StackFactory) -> LocalStack:
    """A running stack with the default scenario (seeded)."""
    return await make_stack()


# --------------------------------------------------------------------------- call helpers


def call_tasks(call_sid: str) -> list[str]:
    """Names of the bridge's tasks still alive for a call (`caller:<sid>`, `agent:<sid>`,
    `tool:<name>:<sid>`, and any other task named after it)."""
    return sorted(
        t.get_name()
        for t in asyncio.all_tasks()
        if not t.done() and t.get_name().endswith(":" + call_sid)
    )


async def wait_call_over(stack: LocalStack, timeout: float = 15.0) -> None:  # noqa: ASYNC109
    """Wait until the server has let go of its calls: none left in the registry, every
    Gemini session closed, and their records written to the database.

    A `SimulatedCaller.run()` returns as soon as the caller's side is over; the server may
    still be closing the call then.
    """
    state = stack.app.state.livecall
    assert await state.registry.wait_idle(timeout), (
        f"calls still active after {timeout} s: {sorted(state.registry.active)}"
    )
    assert stack.gemini is not None
    await stack.gemini.wait_for(lambda: all(s.closed for s in stack.gemini.sessions), timeout)
    async with asyncio.timeout(timeout):
        assert await state.store.flush(), "call records not written"


@pytest.fixture(scope="session")
def call_over() -> Callable[..., Awaitable[None]]:
    """`await call_over(stack, timeout=15)`: see `wait_call_over`."""
    return wait_call_over


@pytest.fixture(scope="session")
def leftover_tasks() -> Callable[[str], list[str]]:
    """`leftover_tasks(call_sid)`: the call's bridge tasks still running (should be none)."""
    return call_tasks


# --------------------------------------------------------------------------- what was heard


class CallAudio:
    """Comparing 8 kHz phone audio (`CallResult.heard_pcm()`, a recording's channel) with
    the simulator's clips. Every helper is pure; `audio` is this class."""

    RATE = 8000
    FRAME = 160  # one 20 ms frame
    LOUD = 300  # |sample| counted as audible, as the simulated caller counts it

    @staticmethod
    @functools.cache
    def phone_ref(clip: str) -> npt.NDArray[np.float64]:
        """A clip as a caller hears it: 8 kHz through μ-law. (livecall's streaming resampler
        starts a little differently: skip a clip's first 100 ms when matching a prefix.)"""
        pcm, rate = load_clip(clip)
        pcm8 = soxr.resample(pcm, rate, CallAudio.RATE).astype(np.int16)
        return ulaw_decode(ulaw_encode(pcm8).tobytes()).astype(np.float64)

    @staticmethod
    def loud_frames(pcm: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """Per 20 ms frame: does it hold audible audio?"""
        f = CallAudio.FRAME
        n = len(pcm) // f
        frames = np.abs(np.asarray(pcm[: n * f], dtype=np.int32)).reshape(n, f)
        return (frames >= CallAudio.LOUD).sum(axis=1) >= 4

    @staticmethod
    def loud_ms(pcm: npt.NDArray[Any]) -> float:
        """Audible span from the first to the last loud frame, in ms (pauses inside count)."""
        idx = np.flatnonzero(CallAudio.loud_frames(pcm))
        return 0.0 if idx.size == 0 else (idx[-1] - idx[0] + 1) * 20.0

    @staticmethod
    def match(signal: npt.NDArray[Any], ref: npt.NDArray[Any]) -> tuple[float, int]:
        """Best normalized cross-correlation of `ref` inside `signal`: (score, offset).

        1.0 is the same audio; different speech scores well under 0.5; silence scores 0.
        """
        x = np.asarray(signal, dtype=np.float64)
        r = np.asarray(ref, dtype=np.float64)
        if len(x) < len(r):
            x = np.concatenate((x, np.zeros(len(r) - len(x))))
        num = fftconvolve(x, r[::-1], mode="valid")
        energy = np.concatenate(([0.0], np.cumsum(x * x)))
        window = energy[len(r) :] - energy[: len(energy) - len(r)]
        score = num / (np.sqrt(np.maximum(window, 1e-9)) * np.linalg.norm(r))
        score[window < 1e-3 * float(r @ r)] = 0.0  # silence matches nothing
        best = int(np.argmax(score))
        return float(score[best]), best

    @staticmethod
    def identify(heard: npt.NDArray[Any]) -> tuple[str, float, dict[str, float]]:
        """Which agent clip is in `heard`? (best name, its score, every clip's score).

        A clip heard with a gap (the caller's playout ran dry) scores lower but still far
        above every other clip, so compare with the runner-up rather than with 1.0.
        """
        scores = {n: CallAudio.match(heard, CallAudio.phone_ref(n))[0] for n in AGENT_CLIPS}
        best = max(scores, key=scores.__getitem__)
        return best, scores[best], scores

    @staticmethod
    def pieces_in(
        heard: npt.NDArray[Any], clip: str, piece_ms: int = 200
    ) -> list[tuple[int, int | None]]:
        """Where each audible 200 ms piece of a clip is in `heard`: (sample in the clip,
        sample in `heard` or None when not there). Finds a clip heard with gaps in it."""
        ref = CallAudio.phone_ref(clip)
        n = piece_ms * CallAudio.RATE // 1000
        starts = [
            i
            for i in range(CallAudio.RATE // 10, len(ref) - n + 1, n)
            if CallAudio.loud_frames(ref[i : i + n]).sum() >= 2
        ]
        x = np.asarray(heard, dtype=np.float64)
        if len(x) < n:
            return [(i, None) for i in starts]
        size = next_fast_len(len(x) + n)
        spectrum = np.fft.rfft(x, size)
        energy = np.concatenate(([0.0], np.cumsum(x * x)))
        window = np.sqrt(np.maximum(energy[n:] - energy[:-n], 1e-9))
        found: list[tuple[int, int | None]] = []
        for i in starts:
            piece = ref[i : i + n]
            corr = np.fft.irfft(spectrum * np.conj(np.fft.rfft(piece, size)), size)
            score = corr[: len(window)] / (window * np.linalg.norm(piece))
            best = int(np.argmax(score))
            found.append((i, best if score[best] > 0.9 else None))
        return found

    @staticmethod
    def heard_share(heard: npt.NDArray[Any], clip: str) -> float:
        """Share of a clip's audible pieces in `heard`: 1.0 when the whole clip was heard,
        even split by gaps (a playout that ran dry); near 0 for other speech."""
        found = CallAudio.pieces_in(heard, clip)
        return sum(at is not None for _, at in found) / max(1, len(found))

    @staticmethod
    def span_of(heard: npt.NDArray[Any], clip: str) -> tuple[int, int]:
        """[start, end) samples of `heard` the clip was heard in (gaps inside included)."""
        found = [(i, at) for i, at in CallAudio.pieces_in(heard, clip) if at is not None]
        assert found, f"{clip} is not in the audio"
        first_i, first_at = found[0]
        last_i, last_at = found[-1]
        n = len(CallAudio.phone_ref(clip))
        return first_at - first_i, last_at + (n - last_i)

    @staticmethod
    def at(result: CallResult, t: float) -> int:
        """Sample index in `result.heard` of loop time `t` (a frame is played per 20 ms tick,
        from `stream_started` on)."""
        assert result.stream_started is not None
        return max(0, round((t - result.stream_started) * CallAudio.RATE))


@pytest.fixture(scope="session")
def audio() -> type[CallAudio]:
    return CallAudio
