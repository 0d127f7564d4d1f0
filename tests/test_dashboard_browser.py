"""The dashboard and softphone in a real browser: Debian's Chromium driven by Playwright,
against the real server with both simulators (fake Gemini Live, simulated Twilio caller).

Covers what only a browser shows: the list has a call the simulator made, the call page
renders its transcript and the player loads the recording (and follows it), the live page
shows a call in progress and its end-call button ends it, and the softphone places a call
from Chromium's fake microphone through the same Media Streams path and shows the agent's
reply. Each page is screenshotted into test-artifacts/screenshots/.

Needs `/usr/bin/chromium` and the `playwright` package (scripts/install_browser_deps.sh);
without them the module is skipped, except under CI=true where that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import re
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import soxr
from fastapi import FastAPI

from livecall.audio import g711
from livecall.server.dashboard import END_REASON, build_dashboard_router
from livecall.settings import Settings
from livecall.sim.clips import get_clip, load_clip
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import HangUp, Pause, WaitForAgentAudio, WaitForAgentSilence
from support import eventually, say, service_missing

CHROMIUM = os.environ.get("LIVECALL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]
TOKEN = "browser-test-token-5b7d0c"
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
MIC_RATE = 48_000
WAIT_MS = 30_000  # for what depends on a call's progress; everything else is quick


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return (
            f"no Chromium at {CHROMIUM} (apt-get install chromium; scripts/install_browser_deps.sh)"
        )
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (scripts/install_browser_deps.sh)"
    return None


_why = _missing()
if _why is not None:
    service_missing(f"browser tests cannot run: {_why}", module=True)

from playwright.async_api import (  # noqa: E402
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    async_playwright,
)
from playwright.async_api import expect as expect_  # noqa: E402

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]


def fake_microphone(path: Path) -> Path:
    """What Chromium's fake microphone plays, once (`%noloop`), when the softphone opens it:
    a caller asking to book a table, then, while the long answer plays, cutting in with the
    time (a barge-in), then silence. A 48 kHz WAV made from the 8 kHz caller clips."""

    def clip(name: str) -> npt.NDArray[np.float32]:
        samples, rate = load_clip(name)
        return soxr.resample(samples.astype(np.float32) / 32768, rate, MIC_RATE)

    def silence(seconds: float) -> npt.NDArray[np.float32]:
        return np.zeros(round(seconds * MIC_RATE), dtype=np.float32)

    pcm = np.concatenate([silence(1.0), clip("book"), silence(3.5), clip("time"), silence(8)])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(MIC_RATE)
        out.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@dataclass
class Site:
    stack: LocalStack
    app: FastAPI
    context: BrowserContext
    errors: list[str]

    @property
    def state(self) -> Any:
        return self.app.state.livecall

    async def page(self) -> Page:
        page = await self.context.new_page()

        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.errors.append(f"{page.url}: {message.text}")

        page.on("console", console)
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        return page

    async def records(self, call_sid: str) -> Any:
        """The call as stored, once it is over and the store has written what it left behind."""
        assert await self.state.registry.wait_idle(timeout=15), "a call is still up"
        await self.state.store.flush()
        return await self.state.store.repo.get_call(call_sid)


def screenshot_dir() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ignore = SCREENSHOTS.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# written by the browser tests\n*\n")
    return SCREENSHOTS


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    tmp = tmp_path_factory.mktemp("browser")
    mic = fake_microphone(tmp / "microphone.wav")

    def app_factory(settings: Settings) -> FastAPI:
        """The app as the lead's factory builds it, with the dashboard mounted."""
        from livecall.server.app import create_app

        app = create_app(settings)
        state = app.state.livecall
        app.include_router(
            build_dashboard_router(state, state.store, state.recordings, state.feed, settings)
        )
        return app

    stack = LocalStack(
        scenario=Scenario(seed=7),
        app_factory=app_factory,
        settings_overrides={
            "api_token": TOKEN,
            "database_url": f"sqlite+aiosqlite:///{tmp / 'calls.db'}",
            "recordings_dir": tmp / "recordings",
            "spool_dir": tmp / "spool",
        },
    )
    await stack.start()
    errors: list[str] = []
    try:
        async with async_playwright() as pw:
            browser: Browser = await pw.chromium.launch(
                executable_path=CHROMIUM,
                args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={mic}%noloop"],
            )
            context = await browser.new_context(
                base_url=stack.base_url, viewport={"width": 1360, "height": 900}
            )
            context.set_default_timeout(10_000)
            assert stack.app is not None
            site = Site(stack, stack.app, context, errors)
            page = await site.page()
            await page.goto("/live")  # not signed in: the login page, then back
            await expect_(page).to_have_url(f"{stack.base_url}/login?next=/live")
            await page.fill("#token", TOKEN)
            await page.screenshot(path=screenshot_dir() / "login.png")
            await page.click("button[type=submit]")
            await expect_(page).to_have_url(f"{stack.base_url}/live")
            await page.close()
            yield site
            await context.close()  # closes the live pages' event streams before the server stops
            await browser.close()
    finally:
        await stack.stop()
    assert not errors, f"errors in the browser console: {errors}"


def hours_call() -> list[Any]:
    return [Pause(200), say("hours"), WaitForAgentSilence(silence_ms=400)]


async def test_the_list_shows_a_call_the_simulator_made(site: Site) -> None:
    # a call with a barge-in: the caller cuts the long booking answer short
    script = [
        Pause(200),
        say("book"),
        WaitForAgentAudio(min_heard_ms=1200),
        say("time"),
        WaitForAgentSilence(silence_ms=400),
        HangUp(),
    ]
    result = await site.stack.caller(script).run()
    sid = result.call_sid
    call = await site.records(sid)
    assert call is not None and call.status == "completed" and call.interruptions >= 1

    page = await site.page()
    await page.goto("/")
    row = page.locator(f'tr[data-sid="{sid}"]')
    await expect_(row).to_be_visible()
    await expect_(row).to_contain_text("+15550001111")
    await page.screenshot(path=screenshot_dir() / "calls.png", full_page=True)

    # the call page: transcript, events, latency chart, and the recording in the player
    await row.click()
    await expect_(page).to_have_url(f"{site.stack.base_url}/calls/{sid}")
    caller = page.locator("#transcript li.turn.caller").first
    agent = page.locator("#transcript li.turn.agent").first
    await expect_(caller).to_contain_text(get_clip("book").text)
    await expect_(agent).to_contain_text("happy to help")
    await expect_(agent).to_have_class(re.compile(r"\binterrupted\b"))  # marked as cut
    await expect_(agent.locator(".badge.cut")).to_be_visible()
    await expect_(agent.locator(".badge.latency")).to_have_text(re.compile(r"\d+ ms"))
    last = page.locator("#transcript li.turn.agent").last
    await expect_(last).to_contain_text("seven thirty")
    await page.wait_for_function(
        "() => { const p = document.getElementById('player');"
        " return p && p.readyState >= 1 && p.duration > 1; }"
    )
    duration = await page.evaluate("document.getElementById('player').duration")
    assert abs(duration - call.duration_s) < 1.5
    # one bar per timed agent reply
    await expect_(page.locator("#latency-chart")).to_have_attribute("data-ready", "2")

    # the player's position picks the line being spoken
    agent_start = int(await agent.get_attribute("data-start-ms") or 0)
    await page.evaluate(
        f"document.getElementById('player').currentTime = {agent_start / 1000 + 0.5}"
    )
    await expect_(agent).to_have_class(re.compile(r"\bcurrent\b"))
    await expect_(caller).not_to_have_class(re.compile(r"\bcurrent\b"))
    await caller.locator("button.seek").click()  # clicking a time jumps there
    await expect_(caller).to_have_class(re.compile(r"\bcurrent\b"))
    await page.evaluate("document.getElementById('player').pause()")
    await page.screenshot(path=screenshot_dir() / "call.png", full_page=True)
    await page.close()


async def test_live_page_shows_a_call_in_progress_and_ends_it(site: Site) -> None:
    page = await site.page()
    await page.goto("/live")
    await expect_(page.locator("#live-status")).to_have_attribute("data-state", "open")

    caller = site.stack.caller(hours_call(), on_script_end="wait")
    task = asyncio.create_task(caller.run())
    try:
        card = page.locator(f'#live-calls article[data-sid="{caller.call_sid}"]')
        await expect_(card).to_be_visible()
        await expect_(card.locator("li.turn.agent")).to_contain_text("noon", timeout=WAIT_MS)
        await expect_(card.locator("li.turn.caller")).to_contain_text("Sundays")
        await expect_(page.locator("#live-count")).to_have_text(re.compile(r"\b1\s*$"))
        await page.screenshot(path=screenshot_dir() / "live.png", full_page=True)

        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))  # "End…?"
        await card.get_by_role("button", name="End call").click()
        ended = page.locator(f'#ended-calls article[data-sid="{caller.call_sid}"]')
        await expect_(ended).to_contain_text("Ended from the dashboard", timeout=WAIT_MS)
        result = await asyncio.wait_for(task, 15)
    finally:
        if not task.done():
            task.cancel()
    assert result.call_sid == caller.call_sid

    async def released() -> bool:  # the caller's socket closes before the server's task ends
        return caller.call_sid not in site.state.registry.active

    assert await eventually(released, within=10)
    call = await site.records(caller.call_sid)
    assert call is not None and call.end_reason == END_REASON
    await page.close()


async def test_softphone_calls_the_agent_from_the_microphone(site: Site) -> None:
    page = await site.page()
    await page.goto("/softphone")
    await page.uncheck("#voice-processing")  # the clip as recorded, no echo canceller
    # words show up while they are spoken: a line is seen partial before it is final
    await page.evaluate(
        """() => {
            window.__partial = new Set();
            new MutationObserver(() => {
                for (const li of document.querySelectorAll('#softphone-transcript li.partial')) {
                    window.__partial.add(li.classList.contains('caller') ? 'caller' : 'agent');
                }
            }).observe(document.getElementById('softphone-transcript'),
                       {subtree: true, childList: true, attributes: true});
        }"""
    )
    await page.click("#call-button")
    await expect_(page.locator("#phone")).to_have_attribute("data-state", "in-call")
    call_sid = (await page.locator("#call-sid").text_content() or "").strip()
    assert re.fullmatch(r"CA[0-9a-f]{32}", call_sid)

    turns = page.locator("#softphone-transcript li.turn")
    cut = turns.and_(page.locator(".agent.interrupted"))
    await expect_(cut).to_contain_text("happy to help", timeout=WAIT_MS)  # barged in on
    await expect_(page.locator("#wire-log")).to_contain_text("clear")
    await expect_(turns.last).to_contain_text("seven thirty", timeout=WAIT_MS)
    await expect_(turns.and_(page.locator(".caller")).first).to_contain_text(get_clip("book").text)
    assert await page.evaluate("[...window.__partial].sort()") == ["agent", "caller"]
    await page.screenshot(path=screenshot_dir() / "softphone.png", full_page=True)
    await page.click("#hangup-button")
    await expect_(page.locator("#phone")).to_have_attribute("data-state", "idle")

    call = await site.records(call_sid)
    assert call is not None
    assert call.from_number == "softphone" and call.end_reason == "caller_stop"
    assert call.frames_in > 500  # 20 ms frames for the whole call
    book_reply, time_reply = [t for t in call.turns if t.speaker == "agent"]
    assert time_reply.first_audio_latency_ms is not None
    # the page echoes a mark only once it has played the audio before it, so what the
    # caller "heard" of the cut reply is no more than the time it had been playing
    assert book_reply.interrupted and book_reply.heard_text
    assert get_clip("book_reply").text.startswith(book_reply.heard_text)
    barge_in = next(e for e in call.events if e.kind == "interrupted")
    assert 0 < barge_in.data["heard_ms"] <= barge_in.at_ms - book_reply.start_ms + 100
    await page.close()


async def test_stats_page_draws_its_charts(site: Site) -> None:
    page = await site.page()
    await page.goto("/stats")
    for chart in ("chart-calls", "chart-latency-days", "chart-percentiles", "chart-durations"):
        await expect_(page.locator(f"#{chart}")).to_have_attribute("data-ready", "1")
    calls = int(await page.locator("#stat-calls").text_content() or 0)
    assert calls >= 3
    await page.screenshot(path=screenshot_dir() / "stats.png", full_page=True)
    await page.close()


async def test_the_softphone_codec_and_resampler(site: Site) -> None:
    """The page's μ-law agrees with livecall's own, code for code, and its resampler keeps
    the phone band and keeps what lies above it from folding into it."""
    page = await site.page()
    await page.goto("/softphone")
    decoded, encoded, levels = await page.evaluate(
        """async () => {
            const g = await import('/static/js/g711.js');
            const { Resampler } = await import('/static/js/resampler.js');
            const codes = new Uint8Array(65536);
            for (let s = -32768; s < 32768; s++) codes[s + 32768] = g.encodeSample(s);
            const level = (hz, from, to) => {
                const r = new Resampler(from, to);
                const tone = Float32Array.from(
                    { length: from }, (_, i) => Math.sin(2 * Math.PI * hz * i / from));
                let out = [];
                for (let i = 0; i < tone.length; i += 128) {
                    out.push(...r.push(tone.subarray(i, i + 128)));
                }
                out = out.slice(out.length / 4);  // past the start-up
                return Math.sqrt(out.reduce((a, x) => a + x * x, 0) / out.length) * Math.SQRT2;
            };
            return [Array.from(g.ULAW_TO_INT16), Array.from(codes),
                    [level(1000, 48000, 8000), level(6000, 48000, 8000), level(1000, 8000, 48000),
                     level(1000, 44100, 8000)]];
        }"""
    )
    assert decoded == g711.ULAW_DECODE_TABLE.astype(int).tolist()
    assert encoded == g711.ulaw_encode(np.arange(-32768, 32768, dtype=np.int16)).tolist()
    passband_down, alias, passband_up, odd_rate = levels
    assert 0.97 < passband_down < 1.03 and 0.97 < passband_up < 1.03 and 0.97 < odd_rate < 1.03
    assert alias < 0.01  # a 6 kHz tone would fold to 2 kHz: at least 40 dB down
    await page.close()
