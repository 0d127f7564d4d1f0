"""The dashboard over ASGI: sign-in and its cookie, what needs a session, CSRF on the end-call
button, and each page rendered from a seeded call store (the browser tests drive the same
pages in Chromium: tests/test_dashboard_browser.py)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import yaml
from fastapi import FastAPI
from pydantic import SecretStr
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from livecall.agent.profiles import ProfileRegistry
from livecall.audio.recording import StereoRecorder
from livecall.live_feed import LiveFeed
from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.server.api import EventOut
from livecall.server.dashboard import (
    END_REASON,
    SESSION_COOKIE,
    DashboardDisabled,
    LoginThrottle,
    Sessions,
    build_dashboard_router,
    live_events,
)
from livecall.server.dashboard.core import COUNT_TIMEOUT_S, event_summary
from livecall.server.registry import ActiveCall, CallRegistry
from livecall.server.state import AppState
from livecall.settings import Settings
from livecall.store.recordings import LocalRecordingStore
from livecall.store.writer import CallStore

TOKEN = "dash-token-7c1e-0123456789"
BASE = "http://testserver"
TODAY = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
SID = "CA" + "1" * 32  # the call with everything: tool call, interruption, recording
PAGES = ["/", f"/calls/{SID}", "/live", "/stats", "/softphone"]


def make_settings(tmp_path: Path, token: str | None = TOKEN, local_only: bool = False) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'dash.db'}",
        spool_dir=tmp_path / "spool",
        recordings_dir=tmp_path / "recordings",
        api_token=SecretStr(token) if token else None,
        api_local_only=local_only,
    )


def seed_call(
    store: CallStore,
    sid: str,
    started: datetime,
    from_number: str,
    *,
    status: str = "completed",
    latency_ms: float = 640.0,
    recording: str | None = None,
) -> None:
    """A short call as the bridge records it: greeting, question, a tool call, a cut reply."""
    obs = store.observer(sid)
    obs.call_started(
        CallInfo(
            sid,
            "MZ" + sid[2:],
            started,
            from_number=from_number,
            to_number="+18005550100",
            profile="front-desk",
            model="gemini-live-test",
        )
    )
    obs.turn(TurnRecord(sid, 0, "agent", "Bella Vista, how can I help?", 300, 2100))
    obs.turn(TurnRecord(sid, 1, "caller", "Are you open on Sundays?", 2600, 4200))
    obs.event(CallEventRecord(sid, 4400, "tool_call", {"name": "lookup_hours", "duration_ms": 85}))
    obs.turn(
        TurnRecord(
            sid,
            2,
            "agent",
            "On Sundays we open at noon, and the kitchen closes at ten.",
            4200 + round(latency_ms),
            7900,
            interrupted=True,
            heard_text="On Sundays we open at noon,",
            first_audio_latency_ms=latency_ms,
            barge_in_stop_ms=3.5,
        )
    )
    obs.turn(TurnRecord(sid, 3, "caller", "Great, thanks!", 6900, 7800))
    obs.event(CallEventRecord(sid, 8000, "dtmf", {"digit": "5"}))
    summary = CallSummary(sid, started + timedelta(seconds=9), 9.0, "caller_stop", status=status)  # type: ignore[arg-type]
    summary.recording_path = recording
    obs.call_ended(summary)


@dataclass
class FakeBridge:
    """Stands for a `CallBridge`: the dashboard only ever calls `end(reason)`."""

    ended: list[str] = field(default_factory=list)

    def end(self, reason: str) -> None:
        self.ended.append(reason)


@dataclass
class Env:
    app: FastAPI
    store: CallStore
    state: AppState
    feed: LiveFeed
    settings: Settings


def make_app(store: CallStore, settings: Settings, feed: LiveFeed, state: AppState) -> FastAPI:
    app = FastAPI()
    recordings = LocalRecordingStore(settings.recordings_dir)
    app.include_router(build_dashboard_router(state, store, recordings, feed, settings))
    return app


PROFILES = {
    "profiles": [
        {"name": "front-desk", "default": True, "system_prompt": "You are the front desk."},
        {"name": "after-hours", "system_prompt": "You take messages after hours."},
    ]
}


def make_state(settings: Settings, store: CallStore) -> AppState:
    """The app's own state, with two agent profiles to pick from on the softphone."""
    profiles_file = settings.recordings_dir.parent / "profiles.yaml"
    profiles_file.write_text(yaml.safe_dump(PROFILES, sort_keys=False))
    return AppState(
        settings=settings,
        registry=CallRegistry(10),
        signature=None,
        store=store,
        recordings=LocalRecordingStore(settings.recordings_dir),
        profiles=ProfileRegistry(profiles_file, settings),
        stream_secret=b"dashboard-test-stream-secret-0123456789",
    )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    settings = make_settings(tmp_path)
    store = CallStore(settings)
    await store.start()
    rec = StereoRecorder()
    rec.add_caller(0, np.full(8000, 800, dtype=np.int16))
    rec.add_agent(0, np.full(8000, -800, dtype=np.int16))
    recordings = LocalRecordingStore(settings.recordings_dir)
    path = await rec.finish_async(recordings.path_for(SID, "wav"), "wav")
    key = await recordings.put(SID, path)
    seed_call(store, SID, TODAY - timedelta(hours=1), "+15550001111", recording=key)
    for i in range(7):
        seed_call(
            store,
            f"CA{i:032d}",
            TODAY - timedelta(days=i % 3, minutes=i),
            f"+1555000{i % 2}222",
            status="failed" if i == 3 else "completed",
            latency_ms=500.0 + 200 * i,
        )
    assert await store.flush()
    feed = LiveFeed()
    state = make_state(settings, store)
    yield Env(make_app(store, settings, feed, state), store, state, feed, settings)
    await store.close()


@pytest.fixture
async def client(env: Env) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=env.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield client


async def sign_in(client: httpx.AsyncClient) -> str:
    """Signs in; returns the page's CSRF token."""
    response = await client.post("/login", data={"token": TOKEN, "next": "/"})
    assert response.status_code == 303, response.text
    page = await client.get("/live")
    assert page.status_code == 200
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert match, "pages carry the CSRF token"
    return match.group(1)


def json_island(html: str, element_id: str) -> Any:
    """The data a page hands its script in `<script type="application/json" id=…>`."""
    match = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', html)
    assert match, element_id
    return orjson.loads(match.group(1))


def set_cookie_header(response: httpx.Response) -> SimpleCookie:
    cookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie


# --- turning it on ---------------------------------------------------------------------------


async def test_no_token_means_no_dashboard(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, token=None)
    store = CallStore(settings)
    with pytest.raises(DashboardDisabled, match="LIVECALL_API_TOKEN"):
        make_app(store, settings, LiveFeed(), make_state(settings, store))
    await store.close()


async def test_local_only_signs_in_loopback_clients_without_a_token(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, token=None, local_only=True)
    store = CallStore(settings)
    app = make_app(store, settings, LiveFeed(), make_state(settings, store))
    for host, base, allowed in (
        ("127.0.0.1", "http://localhost:8080", True),
        ("203.0.113.9", "http://localhost:8080", False),
        ("127.0.0.1", "http://evil.example:8080", False),  # DNS rebinding: not our Host
    ):
        transport = httpx.ASGITransport(app=app, client=(host, 5000))
        async with httpx.AsyncClient(transport=transport, base_url=base) as client:
            response = await client.post("/login", data={"next": "/live"})
            assert response.status_code == (303 if allowed else 401), (host, base)
            page = await client.get("/live")
            assert page.status_code == (200 if allowed else 303), (host, base)
    await store.close()


# --- sessions --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
async def test_pages_redirect_to_login_without_a_session(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == f"/login?next={path}"
    assert "Bella Vista" not in response.text


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/live/events"), ("GET", f"/calls/{SID}/recording"), ("POST", f"/live/{SID}/end")],
)
async def test_data_endpoints_answer_401_without_a_session(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")


async def test_sign_in_sets_a_signed_cookie_that_is_not_the_token(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/login?next=/stats")
    assert page.status_code == 200
    assert 'type="password"' in page.text and 'value="/stats"' in page.text

    response = await client.post("/login", data={"token": TOKEN, "next": "/stats"})
    assert response.status_code == 303
    assert response.headers["location"] == "/stats"
    morsel = set_cookie_header(response)[SESSION_COOKIE]
    assert TOKEN not in response.headers["set-cookie"]
    assert morsel["httponly"] and morsel["samesite"] == "strict" and morsel["path"] == "/"
    assert not morsel["secure"]  # plain http (tests); https below
    assert int(morsel["max-age"]) > 0
    assert (await client.get("/stats")).status_code == 200
    # signed in: the login page sends you on
    assert (await client.get("/login?next=/live")).headers["location"] == "/live"

    behind_tls = await client.post(
        "/login", data={"token": TOKEN}, headers={"x-forwarded-proto": "https"}
    )
    assert set_cookie_header(behind_tls)[SESSION_COOKIE]["secure"]


async def test_a_wrong_token_or_forged_cookie_gets_nothing(client: httpx.AsyncClient) -> None:
    response = await client.post("/login", data={"token": TOKEN + "x"})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "not right" in response.text
    for forged in ("", "1.2.3", f"{int(time.time())}.abc.def", TOKEN):
        client.cookies.set(SESSION_COOKIE, forged)
        assert (await client.get("/")).status_code == 303
    assert (await client.get("/live/events")).status_code == 401


async def test_next_never_leaves_the_site(client: httpx.AsyncClient) -> None:
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "stats"):
        response = await client.post("/login", data={"token": TOKEN, "next": target})
        assert response.headers["location"] == "/"


async def test_logout_revokes_the_session(client: httpx.AsyncClient) -> None:
    csrf = await sign_in(client)
    cookie = client.cookies[SESSION_COOKIE]
    assert (await client.post("/logout", data={"csrf": "wrong"})).status_code == 403
    response = await client.post("/logout", data={"csrf": csrf})
    assert response.status_code == 303 and response.headers["location"] == "/login"
    client.cookies.set(SESSION_COOKIE, cookie)  # replaying the old cookie does not work
    assert (await client.get("/")).status_code == 303


def test_sessions_expire_and_csrf_is_bound_to_the_session() -> None:
    now = [1_000_000.0]
    sessions = Sessions(b"k" * 32, ttl_s=60, clock=lambda: now[0])
    value = sessions.issue()
    session = sessions.check(value)
    assert session is not None
    other = sessions.check(sessions.issue())
    assert other is not None
    assert sessions.check_csrf(session, sessions.csrf_token(session))
    assert not sessions.check_csrf(other, sessions.csrf_token(session))
    assert not sessions.check_csrf(session, None)
    assert Sessions(b"x" * 32, clock=lambda: now[0]).check(value) is None  # another key
    now[0] += 61
    assert sessions.check(value) is None


def test_login_throttle() -> None:
    now = [0.0]
    throttle = LoginThrottle(limit=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert not throttle.blocked("a")
        throttle.failed("a")
    assert throttle.blocked("a") and not throttle.blocked("b")
    now[0] += 61
    assert not throttle.blocked("a")


async def test_too_many_failed_logins_are_refused(client: httpx.AsyncClient) -> None:
    for _ in range(10):
        assert (await client.post("/login", data={"token": "guess"})).status_code == 401
    response = await client.post("/login", data={"token": TOKEN})
    assert response.status_code == 429
    assert "set-cookie" not in response.headers


# --- pages -----------------------------------------------------------------------------------


async def test_pages_send_a_strict_content_security_policy(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    for path in PAGES:
        response = await client.get(path)
        assert response.status_code == 200, path
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-frame-options"] == "DENY"
        # nothing from a CDN, no inline scripts
        assert not re.search(
            r'<script(?![^>]*(src="/static/|type="application/json"))', response.text
        )
        assert not re.search(r'(src|href)="(https?:)?//', response.text)


async def test_calls_list_filters_search_and_pages(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    page = await client.get("/")
    assert page.status_code == 200
    assert page.text.count('<tr data-href="/calls/') == 8
    assert f'href="/calls/{SID}"' in page.text
    assert "front-desk" in page.text and "The caller hung up" in page.text

    by_number = await client.get("/", params={"q": "+1 555-000-1222"})  # punctuation ignored
    assert by_number.text.count("<tr data-href=") == 3  # i = 1, 3, 5
    by_tail = await client.get("/", params={"q": "1222"})  # the last digits are enough
    assert by_tail.text.count("<tr data-href=") == 3
    failed = await client.get("/", params={"status": "failed"})
    assert failed.text.count("<tr data-href=") == 1
    today = TODAY.date().isoformat()
    by_day = await client.get("/", params={"since": today, "until": today})
    assert by_day.text.count("<tr data-href=") == 4  # SID + i = 0, 3, 6
    nothing = await client.get("/", params={"q": "+19999999999"})
    assert "No calls match these filters" in nothing.text

    jump = await client.get("/", params={"q": SID})
    assert jump.status_code == 303 and jump.headers["location"] == f"/calls/{SID}"

    stale = await client.get("/", params={"cursor": "not-a-cursor"})
    assert stale.status_code == 200 and "no longer valid" in stale.text


async def test_call_page_shows_transcript_events_and_player(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    page = await client.get(f"/calls/{SID}")
    assert page.status_code == 200
    html = page.text
    assert html.count('<li class="turn ') == 4
    assert '<li class="turn agent interrupted" id="turn-2"' in html
    assert 'data-start-ms="4840"' in html  # 4200 + 640
    # what the caller heard, and what was cut off
    assert "On Sundays we open at noon," in html
    assert '<span class="unheard"' in html and "and the kitchen closes at ten." in html
    assert "kind-tool_call" in html and "lookup_hours" in html
    assert "kind-dtmf" in html and "pressed 5" in html
    assert "640 ms" in html  # latency badge
    assert f'<audio id="player" controls preload="auto" src="/calls/{SID}/recording">' in html
    data = json_island(html, "call-data")
    assert data["call_sid"] == SID and data["has_recording"]
    assert [t["first_audio_latency_ms"] for t in data["turns"]] == [None, None, 640.0, None]

    missing = await client.get("/calls/CA" + "9" * 32)
    assert missing.status_code == 404 and "No call" in missing.text
    assert (await client.get("/calls/..%2Fetc")).status_code == 404


async def test_recording_streams_with_ranges(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    full = await client.get(f"/calls/{SID}/recording")
    assert full.status_code == 200
    assert full.headers["content-type"] == "audio/wav"
    assert full.content[:4] == b"RIFF"
    part = await client.get(f"/calls/{SID}/recording", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100
    download = await client.get(f"/calls/{SID}/recording?download=1")
    assert download.headers["content-disposition"].startswith("attachment")
    assert (await client.get(f"/calls/CA{0:032d}/recording")).status_code == 404


async def test_stats_page_has_per_day_data_for_the_charts(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    today = TODAY.date()
    since = (today - timedelta(days=6)).isoformat()
    page = await client.get("/stats", params={"since": since, "until": today.isoformat()})
    assert page.status_code == 200
    assert '<span class="value" id="stat-calls">8</span>' in page.text
    data = json_island(page.text, "stats-data")
    assert [d["day"] for d in data["days"]][-1] == today.isoformat()
    assert len(data["days"]) == 7
    assert sum(d["calls"] for d in data["days"]) == 8
    assert data["overall"]["first_audio_latency_ms"]["count"] == 8
    assert len(data["durations"]) == 8
    assert sum(data["hours"]) == 8 and sum(data["weekdays"]) == 8
    assert sum(data["outcomes"].values()) == 8
    assert "vendor/chart.umd.min.js" in page.text
    assert 'id="range-cut"' not in page.text and "at most 92 days" in page.text
    # a huge range is cut to the last 92 days, and the page says so
    wide = await client.get("/stats", params={"since": "2000-01-01"})
    assert len(json_island(wide.text, "stats-data")["days"]) == 92
    assert 'id="range-cut"' in wide.text and "showing the last 92" in wide.text
    # an empty range says so instead of drawing empty charts
    empty = await client.get("/stats", params={"since": "2001-01-01", "until": "2001-01-07"})
    assert 'id="stats-empty"' in empty.text and 'id="chart-hours"' not in empty.text


async def test_softphone_page_offers_the_profiles(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    page = await client.get("/softphone")
    assert '<option value="front-desk">front-desk</option>' in page.text
    assert 'src="/static/js/softphone.js" type="module"' in page.text


async def test_database_down_is_a_503_page(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    broken = settings.model_copy(  # a database that refuses connections
        update={"database_url": SecretStr("postgresql+asyncpg://postgres@127.0.0.1:1/none")}
    )
    store = CallStore(broken)
    app = make_app(store, settings, LiveFeed(), make_state(settings, store))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        await client.post("/login", data={"token": TOKEN})
        response = await client.get("/")
        assert response.status_code == 503 and "not answering" in response.text
        # pages that need no records still work, without the call-back count
        live = await client.get("/live")
        assert live.status_code == 200 and 'id="callback-count" hidden' in live.text
    await store.close()


async def test_a_hung_database_does_not_hold_the_live_page(tmp_path: Path) -> None:
    """The nav's count waits at most COUNT_TIMEOUT_S for a database that accepts connections
    and never answers; the live page needs no records and comes at once."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = make_settings(tmp_path)
    hung = settings.model_copy(
        update={"database_url": SecretStr(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x")}
    )
    store = CallStore(hung)
    app = make_app(store, settings, LiveFeed(), make_state(settings, store))
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            await client.post("/login", data={"token": TOKEN})
            started = time.monotonic()
            live = await client.get("/live")
            assert live.status_code == 200 and 'id="callback-count" hidden' in live.text
            assert time.monotonic() - started < COUNT_TIMEOUT_S + 1.0
    finally:
        for writer in held:
            writer.close()
        server.close()
        await store.close()


async def test_static_files_and_no_way_out_of_them(client: httpx.AsyncClient) -> None:
    js = await client.get("/static/js/softphone-worklet.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert (await client.get("/static/vendor/chart.umd.min.js")).status_code == 200
    for path in ("/static/../dashboard.py", "/static/%2e%2e/dashboard.py", "/static/nope.js"):
        assert (await client.get(path)).status_code == 404


# --- live calls ------------------------------------------------------------------------------


def put_live_call(env: Env, sid: str) -> FakeBridge:
    bridge = FakeBridge()
    env.state.registry.active[sid] = ActiveCall(sid, "MZ" + sid[2:], time.monotonic() - 42, bridge)
    observer = env.feed.observer(sid)
    observer.call_started(
        CallInfo(sid, "MZ" + sid[2:], datetime.now(UTC), from_number="+15557770000")
    )
    observer.turn(TurnRecord(sid, 0, "caller", "Is anyone there?", 100, 1500))
    return bridge


async def test_live_page_shows_calls_in_progress(env: Env, client: httpx.AsyncClient) -> None:
    await sign_in(client)
    empty = await client.get("/live")
    assert 'id="no-live" >' in empty.text or 'id="no-live">' in empty.text
    put_live_call(env, "CA" + "7" * 32)
    page = await client.get("/live")
    assert f'<article class="live-call card" data-sid="{"CA" + "7" * 32}"' in page.text
    assert "Is anyone there?" in page.text and "+15557770000" in page.text
    assert 'data-elapsed="42' in page.text
    assert re.search(r'id="live-count" >.*calls now: </span>1</span>', page.text)


async def test_end_call_needs_the_csrf_token_and_same_origin(
    env: Env, client: httpx.AsyncClient
) -> None:
    sid = "CA" + "7" * 32
    bridge = put_live_call(env, sid)
    csrf = await sign_in(client)
    assert (await client.post(f"/live/{sid}/end")).status_code == 403
    assert (await client.post(f"/live/{sid}/end", data={"csrf": "forged"})).status_code == 403
    cross = await client.post(
        f"/live/{sid}/end", data={"csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert cross.status_code == 403
    assert bridge.ended == []

    response = await client.post(f"/live/{sid}/end", data={"csrf": csrf}, headers={"Origin": BASE})
    assert response.status_code == 303 and response.headers["location"] == "/live"
    assert bridge.ended == [END_REASON]
    from_js = await client.post(
        f"/live/{sid}/end", headers={"X-CSRF-Token": csrf, "Accept": "application/json"}
    )
    assert from_js.status_code == 202 and from_js.json() == {"call_sid": sid, "ending": True}
    unknown = await client.post("/live/CA" + "8" * 32 + "/end", headers={"X-CSRF-Token": csrf})
    assert unknown.status_code == 404


async def test_live_events_stream_a_snapshot_then_the_feed(env: Env) -> None:
    sid = "CA" + "7" * 32
    put_live_call(env, sid)
    stream = live_events(env.feed, env.state.registry, tick_s=0.01, ping_s=0.0)
    assert await anext(stream) == b"retry: 2000\n\n"
    event, data = parse_sse(await anext(stream))
    assert event == "snapshot"
    (call,) = data["calls"]
    assert call["call_sid"] == sid and call["info"]["from_number"] == "+15557770000"
    assert [t["text"] for t in call["turns"]] == ["Is anyone there?"]
    assert call["elapsed_s"] >= 42

    env.feed.observer(sid).turn(TurnRecord(sid, 1, "agent", "Yes, hello!", 1900, 2800))
    event, data = parse_sse(await next_event(stream))
    assert event == "turn" and data["turn"]["text"] == "Yes, hello!"
    env.feed.publish({"type": "gap", "call_sid": sid})
    event, data = parse_sse(await next_event(stream))
    assert event == "snapshot" and len(data["calls"][0]["turns"]) == 2

    env.state.registry.draining = True  # a draining server ends the stream
    with pytest.raises(StopAsyncIteration):
        while True:
            await anext(stream)
    assert not env.feed._subscribers  # unsubscribed


def parse_sse(chunk: bytes) -> tuple[str, dict[str, Any]]:
    event, data = chunk.decode().strip().split("\n")
    return event.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))


async def next_event(stream: AsyncIterator[bytes]) -> bytes:
    """The next event, skipping keep-alive comments."""
    async with asyncio.timeout(5):
        while (chunk := await anext(stream)).startswith(b":"):
            pass
    return chunk


# --- the softphone socket --------------------------------------------------------------------


def test_softphone_socket_wants_a_session_and_our_origin(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    store = CallStore(settings)  # never started: the socket never reads the records
    app = make_app(store, settings, LiveFeed(), make_state(settings, store))
    with TestClient(app, base_url=BASE) as client:
        with (
            pytest.raises(WebSocketDisconnect) as refused,
            client.websocket_connect("/ws/softphone", headers={"Origin": BASE}),
        ):
            pass
        assert refused.value.code == 1008
        assert (
            client.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303
        )
        for origin in (None, "https://evil.example", "null"):
            headers = {"Origin": origin} if origin else {}
            with (
                pytest.raises(WebSocketDisconnect),
                client.websocket_connect("/ws/softphone", headers=headers),
            ):
                pass
        # signed in and same origin: accepted; a start that is not a softphone's is refused
        with client.websocket_connect("/ws/softphone", headers={"Origin": BASE}) as ws:
            ws.send_text('{"event":"connected","protocol":"Call","version":"1.0.0"}')
            ws.send_text(
                orjson.dumps(
                    {
                        "event": "start",
                        "sequenceNumber": "1",
                        "streamSid": "MZ1",
                        "start": {"streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"]},
                    }
                ).decode()
            )
            with pytest.raises(WebSocketDisconnect) as bad_start:
                ws.receive_text()
            assert bad_start.value.code == 1008


def _softphone_start(call_sid: str, token: str | None) -> str:
    sid = "MZ" + "d" * 32
    params = {"profile": "front-desk"} | ({"lc_token": token} if token is not None else {})
    return orjson.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": sid,
            "start": {
                "streamSid": sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "customParameters": params,
            },
        }
    ).decode()


def test_softphone_calls_need_a_token_minted_for_this_session(tmp_path: Path) -> None:
    """The softphone's own short-lived token: from `POST /softphone/token` (session + CSRF),
    bound to the CallSid the server chose and to the session; a `start` without it, with a
    forged one, another call's or another session's is closed before any call starts."""
    settings = make_settings(tmp_path)
    store = CallStore(settings)  # never started: the socket never reads the records
    state = make_state(settings, store)
    app = make_app(store, settings, LiveFeed(), state)

    def mint(client: TestClient) -> tuple[str, str]:
        page = client.get("/softphone")
        csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
        assert csrf
        assert client.post("/softphone/token", headers={"Origin": BASE}).status_code == 403
        answer = client.post(
            "/softphone/token", headers={"Origin": BASE, "X-CSRF-Token": csrf.group(1)}
        )
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        body = answer.json()
        assert re.fullmatch(r"CA[0-9a-f]{32}", body["callSid"])
        assert TOKEN not in answer.text  # never the API token
        return body["callSid"], body["token"]

    with TestClient(app, base_url=BASE) as client, TestClient(app, base_url=BASE) as other:
        assert client.post("/softphone/token", headers={"Origin": BASE}).status_code == 401
        for c in (client, other):
            assert (
                c.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 303
            )
        call_sid, token = mint(client)
        _, other_token = mint(other)  # the same login in another browser: another session
        for sid, tok in (
            (call_sid, None),
            (call_sid, "v1.9999999999.-.forged"),
            ("CA" + "e" * 32, token),  # another CallSid
            (call_sid, other_token),  # another session's token
        ):
            with client.websocket_connect("/ws/softphone", headers={"Origin": BASE}) as ws:
                ws.send_text(_softphone_start(sid, tok))
                with pytest.raises(WebSocketDisconnect) as refused:
                    ws.receive_text()
                assert refused.value.code == 1008
        assert state.registry.active == {}


# --- the owner's pages (#16) -------------------------------------------------------------------


async def test_search_shows_the_matching_line(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    page = await client.get("/", params={"q": "kitchen closes"})
    assert page.status_code == 200
    assert page.text.count('<tr data-href="/calls/') == 8  # every seeded call said it
    assert "<mark>kitchen</mark> <mark>closes</mark>" in page.text
    assert '<span class="match-source">Agent:</span>' in page.text
    assert "8 calls found" in page.text
    nothing = await client.get("/", params={"q": "pizza"})
    assert "<tr data-href=" not in nothing.text and "0 calls found" in nothing.text
    hostile = await client.get("/", params={"q": '<script>alert(1)</script> " OR NEAR('})
    assert hostile.status_code == 200 and "<script>alert" not in hostile.text


async def test_call_backs_list_and_the_handled_mark(env: Env, client: httpx.AsyncClient) -> None:
    signed_out = await client.get("/callbacks")
    assert signed_out.status_code == 303 and signed_out.headers["location"].startswith("/login")
    assert (await client.post(f"/callbacks/{SID}/handled")).status_code == 401
    csrf = await sign_in(client)
    page = await client.get("/callbacks")
    assert page.status_code == 200
    assert page.text.count('<li class="card callback"') == 8  # all seeded calls last 9 s
    assert 'href="tel:+15550001111"' in page.text
    assert re.search(r'id="callback-count" >.*waiting: </span>8</span>', page.text)

    target = f"/callbacks/{SID}/handled"
    assert (await client.post(target, data={"handled": "1"})).status_code == 403
    cross = await client.post(
        target, data={"csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert cross.status_code == 403
    done = await client.post(target, data={"csrf": csrf, "next": "//evil.example/"})
    assert done.status_code == 303 and done.headers["location"] == "/"  # never off-site
    page = await client.get("/callbacks")
    assert page.text.count('<li class="card callback"') == 7 and SID not in page.text
    handled = await client.get("/callbacks", params={"show": "handled"})
    assert f'data-sid="{SID}"' in handled.text
    undo = await client.post(
        target,
        data={"handled": "0"},
        headers={"X-CSRF-Token": csrf, "Accept": "application/json"},
    )
    assert undo.json() == {"call_sid": SID, "handled": False, "waiting": 8}
    missing = await client.post(
        "/callbacks/CA" + "9" * 32 + "/handled", headers={"X-CSRF-Token": csrf}
    )
    assert missing.status_code == 404


async def test_call_page_heading_is_the_caller(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    html = (await client.get(f"/calls/{SID}")).text
    assert re.search(r'<h1><span class="caller-number">\+15550001111</span>', html)
    assert '<details class="card technical" id="technical">' in html  # collapsed
    assert "The caller hung up" in html and "Needs a call back" in html


def test_an_unanswered_turn_reads_as_what_happened_to_the_caller() -> None:
    def line(data: dict[str, Any]) -> str:
        return event_summary(
            EventOut(seq=0, at_ms=0, kind="turn_failed", name=None, duration_ms=None, data=data)
        )

    first = line({"reason": "MALFORMED_FUNCTION_CALL", "action": "reprompt"})
    assert first == "the agent could not answer (malformed function call): asked again at once"
    again = line({"reason": "RESPONSE_REJECTED", "action": "recovery_line"})
    assert "(response rejected) again" in again and "asked to repeat" in again
    assert "no reason given" in line({})
