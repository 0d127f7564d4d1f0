"""The web dashboard and the browser softphone, served by the same app at `/`.

People would rather look than read logs: the call list, a call's transcript beside its stereo
recording, live calls with an end-call button, statistics as charts, and a softphone that
calls an agent from a laptop. Pages are server-rendered Jinja2 templates with a small script
layer (static/js); the one chart library is vendored under static/vendor (see frontend/), so
nothing is fetched from a CDN and the dashboard works offline.

Security: one login with `LIVECALL_API_TOKEN` gives an HMAC-signed session cookie (HttpOnly,
SameSite=Strict, Secure over https) that never contains the token. State-changing requests
also need a CSRF token bound to the session and a same-origin `Origin`. Pages without a
session redirect to /login; data endpoints answer 401. The softphone socket checks the
cookie and the origin before accepting, and its `start` must carry a one-minute stream token
that `POST /softphone/token` minted for this session and a server-chosen CallSid (never the
API token in the page); then it runs exactly the Twilio bridge path.

Modules: `auth` (sessions, CSRF, login throttle), `login` (login/logout), `core` (the shared context
and checks), `words` (the owner's words and clock), `pages` (calls, search, a call, stats),
`callbacks` ("needs a call back"), `live` (the live page and its event stream), `softphone`
(its page and socket). Handlers are module-level functions; this
module builds the router that binds them to one `Dashboard`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends
from starlette.requests import HTTPConnection
from starlette.templating import Jinja2Templates

from livecall.live_feed import LiveFeed
from livecall.server.dashboard import callbacks, live, login, pages, softphone
from livecall.server.dashboard.auth import (
    DEFAULT_SESSION_TTL_S,
    SESSION_COOKIE,
    LoginThrottle,
    Sessions,
)
from livecall.server.dashboard.core import (
    END_REASON,
    STATIC_DIR,
    TEMPLATE_DIR,
    Dashboard,
    DashboardDisabled,
    event_summary,
    fmt_duration,
    fmt_ms,
    fmt_offset,
    latency_class,
)
from livecall.server.dashboard.live import live_events, live_snapshot
from livecall.server.dashboard.words import end_reason_words, fmt_when, outcome_words
from livecall.settings import Settings
from livecall.store.recordings import RecordingStore
from livecall.store.writer import CallStore

if TYPE_CHECKING:
    from livecall.server.state import AppState

__all__ = [
    "END_REASON",
    "SESSION_COOKIE",
    "STATIC_DIR",
    "TEMPLATE_DIR",
    "Dashboard",
    "DashboardDisabled",
    "LoginThrottle",
    "Sessions",
    "build_dashboard_router",
    "live_events",
    "live_snapshot",
]


def build_dashboard_router(
    state: AppState,
    store: CallStore,
    recordings: RecordingStore,
    feed: LiveFeed | None,
    settings: Settings,
    *,
    session_ttl_s: float = DEFAULT_SESSION_TTL_S,
) -> APIRouter:
    """Pages, the live event stream, the end-call action, the softphone socket and /static.

    `state` is the app's `AppState` (its registry is read at request time). Raises
    `DashboardDisabled` without an API token unless `api_local_only` (then only loopback
    clients may sign in, without a token).
    """
    token = settings.api_token.get_secret_value() if settings.api_token is not None else ""
    if not token and not settings.api_local_only:
        raise DashboardDisabled(
            "LIVECALL_API_TOKEN is not set: the dashboard is off (set a token, or "
            "LIVECALL_API_LOCAL_ONLY=true to serve loopback clients only)"
        )
    zone = ZoneInfo(settings.business_timezone)
    templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
    templates.env.filters.update(
        duration=fmt_duration,
        offset=fmt_offset,
        ms=fmt_ms,
        latency_class=latency_class,
        when=lambda value: fmt_when(value, zone),
        when_s=lambda value: fmt_when(value, zone, seconds=True),
        event_summary=event_summary,
        outcome_words=outcome_words,
        end_reason_words=end_reason_words,
    )
    dash = Dashboard(
        state=state,
        store=store,
        recordings=recordings,
        feed=feed,
        settings=settings,
        token=token,
        sessions=Sessions.for_token(token or None, session_ttl_s),
        templates=templates,
        softphone_tokens=softphone.softphone_tokens(state.stream_secret),
    )

    def bind(conn: HTTPConnection) -> None:
        conn.state.livecall_dashboard = dash

    router = APIRouter(include_in_schema=False, dependencies=[Depends(bind)])
    get, post = ["GET"], ["POST"]
    router.add_api_route("/login", login.login_page, methods=get)
    router.add_api_route("/login", login.login, methods=post)
    router.add_api_route("/logout", login.logout, methods=post)
    router.add_api_route("/", pages.calls_page, methods=get)
    router.add_api_route("/calls/{sid}", pages.call_page, methods=get)
    router.add_api_route("/calls/{sid}/webhook/retry", pages.retry_webhook, methods=post)
    router.add_api_route("/calls/{sid}/recording", pages.call_recording, methods=get)
    router.add_api_route("/callers/{number}/memory/delete", pages.forget_caller, methods=post)
    router.add_api_route("/stats", pages.stats_page, methods=get)
    router.add_api_route("/callbacks", callbacks.callbacks_page, methods=get)
    router.add_api_route("/callbacks/{sid}/handled", callbacks.mark_handled, methods=post)
    router.add_api_route("/live", live.live_page, methods=get)
    router.add_api_route("/live/events", live.live_stream, methods=get)
    router.add_api_route("/live/{sid}/end", live.end_call, methods=post)
    router.add_api_route("/softphone", softphone.softphone_page, methods=get)
    router.add_api_route("/softphone/token", softphone.softphone_token, methods=post)
    router.add_api_websocket_route("/ws/softphone", softphone.softphone_socket)
    router.add_api_route("/static/{path:path}", pages.static, methods=get)
    return router
