"""The owner's dashboard in a real browser (#16), at a phone's width (390 px) and a laptop's
(1366 px): words on the live page as they are spoken, search, the business time zone,
"needs a call back", owner stats, the phone-first layout and an axe-core accessibility audit,
and the softphone's timer, mute, keypad and link to the record.

Debian's Chromium driven by Playwright against the real server with both simulators, as in
test_dashboard_browser.py. Screenshots of every page at both widths go to
test-artifacts/screenshots/owner-<page>-<width>.png.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from fastapi import FastAPI
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, async_playwright
from playwright.async_api import expect as expect_

from livecall.records import TurnRecord
from livecall.server.dashboard import build_dashboard_router
from livecall.settings import Settings
from livecall.sim.clips import get_clip
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import Pause, WaitForAgentSilence
from test_dashboard_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TOKEN,
    WAIT_MS,
    say,
    screenshot_dir,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

WIDTHS = {"phone": (390, 844), "laptop": (1366, 900)}


@dataclass
class PartialClock:
    """When the bridge handed each caller line's words to the live feed (wall clock, seconds)."""

    first_caller_words: dict[str, float] = field(default_factory=dict)

    def observer(self, call_sid: str) -> Any:
        clock = self

        class _Observer:
            def call_started(self, info: Any) -> None: ...
            def turn(self, turn: Any) -> None: ...
            def event(self, event: Any) -> None: ...
            def call_ended(self, summary: Any) -> None: ...

            def partial(self, lines: list[TurnRecord]) -> None:
                if any(line.speaker == "caller" and line.text for line in lines):
                    clock.first_caller_words.setdefault(call_sid, time.time())

        return _Observer()


@dataclass
class Owner:
    stack: LocalStack
    app: FastAPI
    contexts: dict[str, BrowserContext]
    errors: list[str]
    clock: PartialClock

    @property
    def state(self) -> Any:
        return self.app.state.livecall

    async def page(self, width: str) -> Page:
        page = await self.contexts[width].new_page()

        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.errors.append(f"{page.url}: {message.text}")

        page.on("console", console)
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        return page

    async def settle(self) -> None:
        assert await self.state.registry.wait_idle(timeout=15), "a call is still up"
        await self.state.store.flush()

    async def shot(self, page: Page, name: str, width: str) -> None:
        await page.screenshot(path=screenshot_dir() / f"owner-{name}-{width}.png", full_page=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def owner(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Owner]:
    tmp = tmp_path_factory.mktemp("owner")
    clock = PartialClock()

    def app_factory(settings: Settings) -> FastAPI:
        from livecall.server.app import create_app

        app = create_app(settings, observer_factory=clock.observer)
        state = app.state.livecall
        app.include_router(
            build_dashboard_router(state, state.store, state.recordings, state.feed, settings)
        )
        return app

    stack = LocalStack(
        scenario=Scenario(seed=11),
        app_factory=app_factory,
        settings_overrides={
            "api_token": TOKEN,
            "database_url": f"sqlite+aiosqlite:///{tmp / 'calls.db'}",
            "recordings_dir": tmp / "recordings",
            "spool_dir": tmp / "spool",
            "business_timezone": "America/New_York",
        },
    )
    await stack.start()
    errors: list[str] = []
    try:
        async with async_playwright() as pw:
            browser: Browser = await pw.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS
            )
            contexts = {}
            for name, (w, h) in WIDTHS.items():
                ctx = await browser.new_context(
                    base_url=stack.base_url, viewport={"width": w, "height": h}
                )
                ctx.set_default_timeout(10_000)
                page = await ctx.new_page()
                await page.goto("/login")
                await page.fill("#token", TOKEN)
                await page.click("button[type=submit]")
                await expect_(page).to_have_url(f"{stack.base_url}/")
                await page.close()
                contexts[name] = ctx
            assert stack.app is not None
            yield Owner(stack, stack.app, contexts, errors, clock)
            for ctx in contexts.values():
                await ctx.close()
            await browser.close()
    finally:
        await stack.stop()
    assert not errors, f"errors in the browser console: {errors}"


@pytest.mark.parametrize("width", list(WIDTHS))
async def test_caller_words_reach_the_live_page_within_a_second(owner: Owner, width: str) -> None:
    page = await owner.page(width)
    await page.goto("/live")
    await expect_(page.locator("#live-status")).to_have_attribute("data-state", "open")
    # the page notes when each caller line first shows words (its own wall clock)
    await page.evaluate(
        """() => {
            window.__seen = {};
            new MutationObserver(() => {
                for (const li of document.querySelectorAll('#live-calls li.turn.caller')) {
                    const sid = li.closest('article').dataset.sid;
                    const text = li.querySelector('.text').textContent;
                    if (text && text !== '…' && !(sid in window.__seen)) {
                        const partial = li.classList.contains('partial');
                        window.__seen[sid] = {at: Date.now(), partial};
                    }
                }
            }).observe(document.getElementById('live-calls'),
                       {subtree: true, childList: true, characterData: true});
        }"""
    )
    caller = owner.stack.caller(
        [Pause(200), say("hours"), WaitForAgentSilence(silence_ms=400)], on_script_end="wait"
    )
    task = asyncio.create_task(caller.run())
    try:
        card = page.locator(f'#live-calls article[data-sid="{caller.call_sid}"]')
        line = card.locator("li.turn.caller")
        await expect_(line).to_contain_text(get_clip("hours").text, timeout=WAIT_MS)
        seen = await page.evaluate(f"window.__seen['{caller.call_sid}']")
        spoken = owner.clock.first_caller_words[caller.call_sid]
        assert seen["partial"], "the caller's words came only with the finished turn"
        assert seen["at"] / 1000 - spoken < 1.0, "the words took more than a second"
        await expect_(card.locator("li.turn.agent")).to_contain_text("noon", timeout=WAIT_MS)
        await owner.shot(page, "live", width)
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await card.get_by_role("button", name="End call").click()
        await asyncio.wait_for(task, 15)
    finally:
        if not task.done():
            task.cancel()
    await owner.settle()
    await page.close()
