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
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from fastapi import FastAPI

from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.server.dashboard import build_dashboard_router
from livecall.settings import Settings
from livecall.sim.clips import get_clip
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import Pause, WaitForAgentSilence

# first: that module skips (or, under CI=true, fails) without Chromium and playwright
from test_dashboard_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TOKEN,
    WAIT_MS,
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    async_playwright,
    expect_,
    say,
    screenshot_dir,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

WIDTHS = {"phone": (390, 844), "laptop": (1366, 900)}
AXE = Path(__file__).with_name("vendor") / "axe.min.js"
# what axe checks: WCAG 2.0, 2.1 and 2.2 at levels A and AA
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]


async def audit(page: Page) -> list[str]:
    """axe-core run in the page: the serious and critical violations, one line each."""
    if not await page.evaluate("typeof window.axe !== 'undefined'"):
        # evaluated, not a <script>: the dashboard's CSP (rightly) refuses inline scripts
        await page.evaluate(AXE.read_text() + "\n;true")
    result = await page.evaluate(
        """async (tags) => {
            const r = await axe.run(document, {runOnly: {type: 'tag', values: tags}});
            return {passes: r.passes.length, bad: r.violations
                .filter(v => ['serious', 'critical'].includes(v.impact))
                .map(v => v.id + ': '
                     + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(' | '))};
        }""",
        AXE_TAGS,
    )
    assert result["passes"] > 10, "axe-core did not run its checks"
    return list(result["bad"])


async def fits(page: Page) -> None:
    """Nothing wider than the window: no sideways scrolling, the header's last item on screen."""
    width = await page.evaluate("window.innerWidth")
    scroll = await page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width, f"{page.url}: {scroll} px wide in a {width} px window"
    box = await page.locator(".logout button").bounding_box()
    assert box is not None and box["x"] + box["width"] <= width


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
            # requests the tests cut on purpose (server gone, signed out) are not page errors
            if message.type == "error" and not re.search(
                r"net::ERR_CONNECTION_REFUSED|status of 401|EventSource", message.text
            ):
                self.errors.append(f"{page.url}: {message.text}")

        page.on("console", console)
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        return page

    async def settle(self) -> None:
        assert await self.state.registry.wait_idle(timeout=15), "a call is still up"
        await self.state.store.flush()

    async def shot(self, page: Page, name: str, width: str) -> None:
        await page.screenshot(path=screenshot_dir() / f"owner-{name}-{width}.png", full_page=True)


NY = ZoneInfo("America/New_York")
# 21:30 in New York on Monday 2 March 2026 is 02:30 UTC on Tuesday 3 March
EVENING = datetime(2026, 3, 2, 21, 30, tzinfo=NY)
REGULAR = "+15550104477"
SIDS = {
    "booking": "CA" + "b" * 32,
    "greeting": "CA" + "c" * 32,
    "failed": "CA" + "d" * 32,
    "short": "CA" + "e" * 32,
}


def _record(
    store: Any,
    sid: str,
    started: datetime,
    number: str,
    lines: list[tuple[str, str]],
    *,
    duration_s: float,
    end_reason: str = "caller_stop",
    status: str = "completed",
    events: list[CallEventRecord] = (),  # type: ignore[assignment]
) -> None:
    """A call's records through the store's observer: the same path the bridge reports on."""
    obs = store.observer(sid)
    obs.call_started(
        CallInfo(
            sid, "MZ" + sid[2:], started, from_number=number, to_number="+15550002222",
            profile="bella",
        )
    )  # fmt: skip
    for i, (speaker, words) in enumerate(lines):
        obs.turn(TurnRecord(sid, i, speaker, words, 300 + i * 2500, 2300 + i * 2500))  # type: ignore[arg-type]
    for event in events:
        obs.event(event)
    obs.call_ended(
        CallSummary(sid, started + timedelta(seconds=duration_s), duration_s, end_reason,
                    status=status, turns=len(lines))  # type: ignore[arg-type]
    )  # fmt: skip


async def seed(site: Owner) -> None:
    """An evening's calls at a restaurant, on the business's clock (New York)."""
    store = site.state.store
    _record(
        store, SIDS["booking"], EVENING.astimezone(UTC), REGULAR,
        [("agent", "Bella's, how can I help?"),
         ("caller", "A table for four tomorrow at eight, under the name Okonkwo."),
         ("agent", "Done: four people at eight, under Okonkwo.")],
        duration_s=48.0,
    )  # fmt: skip
    _record(
        store, SIDS["greeting"], (EVENING + timedelta(minutes=5)).astimezone(UTC), "+15550109911",
        [("agent", "Bella's, how can")], duration_s=0.6,
    )  # fmt: skip
    _record(
        store, SIDS["failed"], (EVENING + timedelta(minutes=9)).astimezone(UTC), "+15550107733",
        [("caller", "Hello? Is anyone there?")], duration_s=14.0, end_reason="gemini_failed",
        status="failed",
        events=[CallEventRecord(SIDS["failed"], 900, "error", {"where": "gemini"})],
    )  # fmt: skip
    _record(
        store, SIDS["short"], (EVENING + timedelta(minutes=20)).astimezone(UTC), REGULAR,
        [("caller", "Sorry, wrong number")], duration_s=7.0,
    )  # fmt: skip
    await store.flush()


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
            site = Owner(stack, stack.app, contexts, errors, clock)
            await seed(site)
            yield site
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
        assert await audit(page) == []  # with a call on it
        await fits(page)
        await owner.shot(page, "live-call", width)
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await card.get_by_role("button", name="End call").click()
        await asyncio.wait_for(task, 15)
    finally:
        if not task.done():
            task.cancel()
    await owner.settle()
    await page.close()


@pytest.mark.parametrize("width", list(WIDTHS))
async def test_search_finds_a_name_said_and_a_number_by_its_tail(owner: Owner, width: str) -> None:
    page = await owner.page(width)
    await page.goto("/")
    await page.fill("#q", "okonkwo")
    await page.get_by_role("button", name="Search").click()
    row = page.locator(f'tr.call-row[data-sid="{SIDS["booking"]}"]')
    await expect_(row).to_be_visible()
    match = page.locator(f'tr.match-row[data-sid="{SIDS["booking"]}"]')
    await expect_(match).to_contain_text("under the name Okonkwo")
    await expect_(match.locator("mark")).to_have_text("Okonkwo")
    await expect_(page.locator("#calls-total")).to_have_text("1 call found")
    await owner.shot(page, "search", width)
    await fits(page)
    # the last digits of a number, written the way people write them
    await page.fill("#q", "(010) 4477")
    await page.get_by_role("button", name="Search").click()
    rows = page.locator("tr.call-row")
    await expect_(rows).to_have_count(2)  # the regular called twice
    await expect_(rows.first).to_contain_text(REGULAR)
    await page.close()


@pytest.mark.parametrize("width", list(WIDTHS))
async def test_days_and_times_are_the_business_s(owner: Owner, width: str) -> None:
    page = await owner.page(width)
    # 21:30 on 2 March in New York: 3 March in UTC, listed and filtered as 2 March
    await page.goto("/?since=2026-03-02&until=2026-03-02")
    row = page.locator(f'tr.call-row[data-sid="{SIDS["booking"]}"]')
    await expect_(row).to_contain_text("Mon 2 Mar 2026, 21:30")
    await expect_(page.locator("tr.call-row")).to_have_count(4)
    await page.goto("/?since=2026-03-03&until=2026-03-03")
    await expect_(page.locator("tr.call-row")).to_have_count(0)
    # the missed ones, by outcome
    await page.goto("/?since=2026-03-02&until=2026-03-02")
    await page.select_option("select[name=outcome]", "abandoned")
    await page.get_by_role("button", name="Search").click()
    await expect_(page.locator("tr.call-row")).to_have_count(1)
    await expect_(page.locator("tr.call-row")).to_contain_text("+15550109911")
    await page.goto("/stats?since=2026-03-01&until=2026-03-03")
    table = page.locator("#chart-calls-title + .chart-box + details table")
    await expect_(table.locator("tr", has_text="Mon 2 Mar")).to_contain_text("4")
    await expect_(table.locator("tr", has_text="Tue 3 Mar")).to_contain_text("0")
    await page.close()


@pytest.mark.parametrize("width", list(WIDTHS))
async def test_the_call_page_speaks_the_owner_s_language(owner: Owner, width: str) -> None:
    page = await owner.page(width)
    await page.goto(f"/calls/{SIDS['greeting']}")
    await expect_(page.locator("h1")).to_contain_text("+15550109911")
    await expect_(page.locator(".badge.outcome")).to_have_text("Abandoned")
    await expect_(page.locator("#ended-words")).to_have_text(
        "The caller hung up during the greeting"
    )
    technical = page.locator("details#technical")
    await expect_(technical).not_to_have_attribute("open", "")
    await expect_(technical.locator("dd.sid")).to_be_hidden()  # collapsed
    await technical.locator("summary").click()
    await expect_(technical.locator("dd.sid")).to_have_text(SIDS["greeting"])
    await owner.shot(page, "call", width)
    await fits(page)
    await page.goto(f"/calls/{SIDS['failed']}")
    await expect_(page.locator(".badge.outcome")).to_have_text("Failed")
    await expect_(page.locator("#ended-words")).to_contain_text("heard an apology")
    await page.close()


async def test_needs_a_call_back_lists_marks_and_counts(owner: Owner) -> None:
    page = await owner.page("phone")
    await page.goto("/callbacks")
    items = page.locator("#callbacks li.callback")
    for key in ("greeting", "failed", "short"):
        await expect_(page.locator(f'li[data-sid="{SIDS[key]}"]')).to_be_visible()
    await expect_(page.locator(f'li[data-sid="{SIDS["booking"]}"]')).to_have_count(0)
    greeting = page.locator(f'li[data-sid="{SIDS["greeting"]}"]')
    await expect_(greeting).to_contain_text("Hung up during the greeting")
    await expect_(greeting).to_contain_text("Bella's, how can")  # what they heard
    await expect_(greeting.get_by_role("link", name=re.compile("^Call "))).to_have_attribute(
        "href", "tel:+15550109911"
    )
    failed = page.locator(f'li[data-sid="{SIDS["failed"]}"]')
    await expect_(failed).to_contain_text("apology")
    await expect_(failed).to_contain_text("Is anyone there?")
    waiting = await items.count()
    badge = page.locator("#callback-count")
    await expect_(badge).to_contain_text(str(waiting))
    await owner.shot(page, "callbacks", "phone")
    for width in WIDTHS:
        other = await owner.page(width)
        await other.goto("/callbacks")
        assert await audit(other) == []
        await owner.shot(other, "callbacks", width)
        await other.close()

    await greeting.get_by_role("button", name="Mark handled").click()
    await expect_(greeting).to_have_count(0)
    await expect_(badge).to_contain_text(str(waiting - 1))
    await expect_(page.locator("#callbacks-announce")).to_contain_text("marked handled")
    await page.reload()  # kept in the database
    await expect_(page.locator(f'li[data-sid="{SIDS["greeting"]}"]')).to_have_count(0)
    await page.goto("/callbacks?show=handled")
    back = page.locator(f'li[data-sid="{SIDS["greeting"]}"]')
    await back.get_by_role("button", name="Put back on the list").click()
    await expect_(back).to_have_count(0)
    await page.goto("/callbacks")
    await expect_(page.locator(f'li[data-sid="{SIDS["greeting"]}"]')).to_be_visible()
    await page.close()


@pytest.mark.parametrize("width", list(WIDTHS))
async def test_owner_stats(owner: Owner, width: str) -> None:
    page = await owner.page(width)
    await page.goto("/stats?since=2026-03-01&until=2026-03-07")
    for chart in ("chart-calls", "chart-hours", "chart-weekdays", "chart-outcomes"):
        await expect_(page.locator(f"#{chart}")).to_have_attribute("data-ready", "1")
    await expect_(page.locator("#stat-calls")).to_have_text("4")
    await expect_(page.locator("#stat-answered")).to_have_text("2")
    await expect_(page.locator("#stat-missed")).to_have_text("2")
    await expect_(page.locator("#stat-repeat")).to_have_text("1")
    await expect_(page.locator("#busiest li").first).to_contain_text("Mondays around 21:00")
    await expect_(page.locator("#repeat-callers")).to_contain_text(REGULAR)
    hours = page.locator("details.chart-table", has_text="by hour")
    await hours.locator("summary").click()
    await expect_(hours.locator("tr", has_text="21:00")).to_contain_text("4")
    await expect_(page.locator("#stats-range")).to_contain_text("America/New_York")
    await owner.shot(page, "stats", width)
    await fits(page)
    # a chart shrinks with the window
    box = await page.locator("#chart-hours").bounding_box()
    assert box is not None and box["width"] <= WIDTHS[width][0]
    await page.goto("/stats?since=2001-01-01&until=2001-01-31")
    await expect_(page.locator("#stats-empty")).to_contain_text("No calls between")
    await page.goto("/stats?since=2025-01-01&until=2026-03-07")
    await expect_(page.locator("#range-cut")).to_contain_text("showing the last 92")
    await page.close()


@pytest.mark.parametrize("width", list(WIDTHS))
async def test_every_page_fits_and_passes_an_accessibility_audit(owner: Owner, width: str) -> None:
    pages = {
        "calls": "/",
        "call": f"/calls/{SIDS['booking']}",
        "live": "/live",
        "stats": "/stats?since=2026-03-01&until=2026-03-07",
        "softphone": "/softphone",
    }
    problems: dict[str, list[str]] = {}
    page = await owner.page(width)
    for name, path in pages.items():
        await page.goto(path)
        await fits(page)
        if name == "calls" and width == "phone":  # rows are cards: one under the other
            rows = page.locator("tr.call-row")
            first, second = await rows.nth(0).bounding_box(), await rows.nth(1).bounding_box()
            assert first and second and second["y"] >= first["y"] + first["height"]
        found = await audit(page)
        if found:
            problems[name] = found
        await owner.shot(page, name, width)
    # the keyboard's focus is always visible
    await page.goto("/")
    for _ in range(3):
        await page.keyboard.press("Tab")
        outline = await page.evaluate(
            "() => { const s = getComputedStyle(document.activeElement);"
            " return [s.outlineStyle, parseFloat(s.outlineWidth)]; }"
        )
        assert outline[0] != "none" and outline[1] >= 2, outline
    # and the dark theme keeps its contrast too
    await page.emulate_media(color_scheme="dark")
    for name in ("calls", "call", "stats"):
        await page.goto(pages[name])
        if found := await audit(page):
            problems[f"{name} (dark)"] = found
    await page.emulate_media(color_scheme="light")
    # the login page, signed out
    fresh = await page.context.browser.new_context(  # type: ignore[union-attr]
        base_url=owner.stack.base_url,
        viewport={"width": WIDTHS[width][0], "height": WIDTHS[width][1]},
    )
    login = await fresh.new_page()
    await login.goto("/login")
    if found := await audit(login):
        problems["login"] = found
    await login.screenshot(path=screenshot_dir() / f"owner-login-{width}.png", full_page=True)
    await fresh.close()
    await page.close()
    assert problems == {}, f"serious or critical accessibility problems: {problems}"


async def test_live_page_is_honest_about_the_connection(owner: Owner) -> None:
    """With the event stream gone the timers stop and the page says so; a 401 (signed out
    elsewhere) goes to the login page, which brings the owner back here."""
    page = await owner.page("phone")
    sid = "CA" + "f" * 32
    info = {"from_number": "+15550100000"}
    calls = [{"call_sid": sid, "elapsed_s": 30, "info": info, "turns": []}]
    snapshot = "retry: 200\n\nevent: snapshot\ndata: " + json.dumps({"calls": calls}) + "\n\n"
    served = 0

    async def stream(route: Any) -> None:
        nonlocal served
        served += 1
        if served == 1:  # one snapshot, then the server is gone
            await route.fulfill(status=200, content_type="text/event-stream", body=snapshot)
        else:
            await route.abort("connectionrefused")

    await page.route("**/live/events", stream)
    await page.clock.install()  # the page's timers run when the test says, not by the wall
    await page.goto("/live")
    card = page.locator(f'article[data-sid="{sid}"]')
    await expect_(card).to_be_visible()
    await expect_(page.locator("#live-status")).to_have_attribute("data-state", "reconnecting")
    await expect_(card.locator(".state")).to_have_text("unknown")
    shown = await card.locator(".elapsed").text_content()
    await page.clock.run_for(5000)  # five timer ticks: the call's clock must not move
    assert await card.locator(".elapsed").text_content() == shown
    await owner.shot(page, "live-disconnected", "phone")
    await page.unroute("**/live/events")

    async def signed_out(route: Any) -> None:
        await route.fulfill(status=401, body="sign in to the dashboard first")

    await page.route("**/live/events", signed_out)
    async with page.expect_request(lambda r: "/login?" in r.url) as went:
        await page.goto("/live", wait_until="commit")  # the page leaves for /login at once
    assert (await went.value).url.endswith("/login?next=%2Flive")
    await page.unroute("**/live/events")
    await page.close()


async def test_ending_a_call_asks_first(owner: Owner) -> None:
    page = await owner.page("laptop")
    await page.goto("/live")
    await expect_(page.locator("#live-status")).to_have_attribute("data-state", "open")
    caller = owner.stack.caller(
        [Pause(200), say("hours"), WaitForAgentSilence(silence_ms=400)], on_script_end="wait"
    )
    task = asyncio.create_task(caller.run())
    try:
        card = page.locator(f'#live-calls article[data-sid="{caller.call_sid}"]')
        await expect_(card).to_be_visible(timeout=WAIT_MS)
        await expect_(page.locator("#live-announce")).to_contain_text("New call from")
        asked: list[str] = []

        async def decline(dialog: Any) -> None:
            asked.append(dialog.message)
            await dialog.dismiss()

        page.once("dialog", decline)
        await card.get_by_role("button", name="End call").click()
        await expect_(card.locator(".state")).to_have_text("live")
        assert asked and asked[0].startswith("End the call with")
        assert caller.call_sid in owner.state.registry.active  # "Cancel" ends nothing
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await card.get_by_role("button", name="End call").click()
        await asyncio.wait_for(task, 15)
    finally:
        if not task.done():
            task.cancel()
    await owner.settle()
    await page.close()


@pytest.mark.parametrize("width", list(WIDTHS))
async def test_softphone_timer_mute_keypad_and_record(owner: Owner, width: str) -> None:
    page = await owner.page(width)
    await page.goto("/softphone")
    await page.click("#call-button")
    await expect_(page.locator("#phone")).to_have_attribute("data-state", "in-call")
    call_sid = (await page.locator("#call-sid").text_content() or "").strip()
    await expect_(page.locator("#call-timer")).to_have_text(re.compile(r"^0:0[1-9]$"))
    mute = page.locator("#mute-button")
    await mute.click()
    await expect_(mute).to_have_attribute("aria-pressed", "true")
    await mute.click()
    await expect_(mute).to_have_attribute("aria-pressed", "false")
    await page.locator('#keypad button[data-digit="4"]').click()
    await page.locator('#keypad button[data-digit="#"]').click()
    await expect_(page.locator("#wire-log")).to_contain_text("→ dtmf")
    await owner.shot(page, "softphone-call", width)
    await page.click("#hangup-button")
    await expect_(page.locator("#phone")).to_have_attribute("data-state", "idle")
    stopped = await page.locator("#call-timer").text_content()
    link = page.locator("#record-link a")
    await expect_(link).to_have_attribute("href", f"/calls/{call_sid}")
    await owner.settle()
    call = await owner.state.store.repo.get_call(call_sid)
    keys = [e for e in call.events if e.kind == "dtmf"]
    assert len(keys) == 2  # through the Media Streams path, like Twilio's `dtmf`
    assert await page.locator("#call-timer").text_content() == stopped  # the timer stopped
    await link.click()
    await expect_(page).to_have_url(re.compile(f"/calls/{call_sid}$"))
    await expect_(page.locator("h1")).to_contain_text("softphone")
    await page.close()


async def test_softphone_says_plainly_when_the_server_is_down(owner: Owner) -> None:
    page = await owner.page("phone")
    await page.goto("/softphone")
    await page.route("**/softphone", lambda route: route.abort("connectionrefused"))
    await page.route("**/static/js/softphone-worklet.js", lambda r: r.abort("connectionrefused"))
    await page.click("#call-button")
    status = page.locator("#phone-status")
    await expect_(status).to_have_text(re.compile("server cannot be reached"))
    await expect_(page.locator("#phone")).to_have_attribute("data-state", "error")
    assert "worklet" not in (await status.text_content() or "")
    await owner.shot(page, "softphone-down", "phone")
    await page.close()
