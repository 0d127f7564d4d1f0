"""What every dashboard page shares: the `Dashboard` context (settings, store, sessions,
templates), the checks each handler makes (signed in, CSRF, same origin), rendering with the
security headers, and the small formatting helpers the templates use.

Handlers are plain module-level functions that take the context as a dependency (`ctx`): the
router binds its own `Dashboard` to each request (`bind`), so several apps (tests) can each
mount one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl, quote
from zoneinfo import ZoneInfo

import orjson
import structlog
from fastapi import Depends, HTTPException, Request, Response, WebSocket
from fastapi.responses import RedirectResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import HTTPConnection
from starlette.templating import Jinja2Templates

from livecall.live_feed import LiveFeed
from livecall.server.api import SID_PATTERN, EventOut, TurnOut
from livecall.server.auth import LocalAccess
from livecall.server.dashboard.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    LoginThrottle,
    Session,
    Sessions,
    same_origin,
)
from livecall.server.forwarded import TrustedProxies
from livecall.settings import Settings
from livecall.store import owner
from livecall.store.recordings import RecordingStore
from livecall.store.repository import Repository
from livecall.store.writer import CallStore
from livecall.telephony.stream_token import StreamTokens

if TYPE_CHECKING:
    from livecall.server.state import AppState

log = structlog.get_logger("livecall.dashboard")

HERE = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

COUNT_TTL_S = 5.0
COUNT_TIMEOUT_S = 1.0
END_REASON = "operator_hangup"  # what a call ended from the live page records as end_reason
MAX_FORM_BYTES = 8192
SID_RE = re.compile(SID_PATTERN)
# Bookkeeping events listed under Events but kept out of the transcript.
QUIET_EVENTS = frozenset({"session_started"})

# Pages may only load what this app serves; `connect-src 'self'` covers the softphone socket.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'; object-src 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class DashboardDisabled(RuntimeError):
    """No `LIVECALL_API_TOKEN` and not local-only: the app should not mount the dashboard."""


def parse_day(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        return None


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_offset(ms: float | None) -> str:
    """Milliseconds since the stream started as m:ss.t, the player's clock."""
    if ms is None:
        return "–"
    minutes, secs = divmod(max(ms, 0) / 1000.0, 60)
    return f"{int(minutes)}:{secs:04.1f}"


def fmt_ms(ms: float | None) -> str:
    return "–" if ms is None else f"{ms:,.0f} ms"


def latency_class(ms: float | None) -> str:
    """Where a first-audio latency sits: fast under 800 ms, slow from 1.5 s."""
    if ms is None:
        return ""
    return "fast" if ms < 800 else "ok" if ms < 1500 else "slow"


def unheard(turn: TurnOut) -> tuple[str, str]:
    """An interrupted agent turn as (what was heard, what was cut off)."""
    heard = turn.heard_text
    if not turn.interrupted or heard is None:
        return turn.text, ""
    if turn.text.startswith(heard):
        return heard, turn.text[len(heard) :]
    return heard, ""


def event_summary(event: EventOut) -> str:
    """An event as one line of the transcript: what a reader needs, not the raw data."""
    data = event.data
    heard = data.get("heard_ms")
    if event.kind == "interrupted" and isinstance(heard, int | float):
        line = f"the caller cut in after {heard / 1000:.1f} s of the reply"
        return line + (" (estimated)" if data.get("heard") == "estimated" else "")
    if event.kind == "dtmf":
        return f"pressed {data.get('digit') or data.get('digits') or '?'}"
    if event.kind.startswith("tool_"):
        return f"⚙ {event.name or data.get('name') or ''}"
    if event.kind == "turn_failed":  # the model ended a turn without answering
        why = str(data.get("reason") or "no reason given").replace("_", " ").lower()
        if data.get("action") == "recovery_line":
            return f"the agent could not answer ({why}) again: the caller was asked to repeat"
        return f"the agent could not answer ({why}): asked again at once"
    for key in ("reason", "error", "message", "target", "name"):
        if data.get(key):
            return str(data[key])
    return ""


def json_bytes(value: Any) -> bytes:
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """A database that is down is a 503 page, not a 500."""
    try:
        yield
    except (SQLAlchemyError, OSError) as error:
        raise Unavailable from error


class Unavailable(Exception):
    pass


async def webhook_deliveries(state: AppState, sid: str) -> list[Any] | None:
    """A call's webhook deliveries for its page ([] when none; None when unreadable)."""
    webhooks = state.webhooks
    if webhooks is None:
        return []
    from livecall.outcomes.webhooks import DeliveryOut

    try:
        return [DeliveryOut.of(row) for row in await webhooks.outbox.for_call(sid)]
    except (SQLAlchemyError, OSError):
        return None


def profile_names(state: AppState, settings: Settings) -> list[str]:
    """The agent profiles a softphone call may pick (whatever the app keeps, else the file)."""
    names = state.profiles.current.names if state.profiles is not None else None
    if names is None and settings.profiles_file is not None:
        from livecall.agent.profiles import ProfileError, ProfileSet

        try:
            names = ProfileSet.load(settings.profiles_file, settings).names
        except ProfileError as error:
            log.warning("dashboard.profiles_unreadable", error=str(error))
    return [str(n) for n in names or ()]


@dataclass
class Dashboard:
    """One mounted dashboard: what its handlers need, and the checks they make."""

    state: AppState
    store: CallStore
    recordings: RecordingStore
    feed: LiveFeed | None
    settings: Settings
    token: str
    sessions: Sessions
    templates: Jinja2Templates
    softphone_tokens: StreamTokens
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    trusted: TrustedProxies = field(init=False)
    local: LocalAccess = field(init=False)

    callbacks_waiting: int | None = field(default=None, init=False)  # the nav's count
    _counted_at: float = field(default=-1e9, init=False)

    def __post_init__(self) -> None:
        self.trusted = TrustedProxies(self.settings.trusted_proxies)
        admin_socket = str(self.settings.admin_socket) if self.settings.admin_socket else None
        # local-only: real loopback peer, Host, Origin
        self.local = LocalAccess(self.trusted, admin_socket)

    @property
    def repo(self) -> Repository:
        return self.store.repo

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.settings.business_timezone)

    async def count_callbacks(self, *, fresh: bool = False) -> None:
        """Keeps the nav's "needs a call back" count, asking the database at most every
        `COUNT_TTL_S` (a database that is down leaves the count out, never the page)."""
        now = time.monotonic()
        if not fresh and now - self._counted_at < COUNT_TTL_S:
            return
        self._counted_at = now
        try:  # a slow database must not hold up pages that do not need it (live, softphone)
            self.callbacks_waiting = await asyncio.wait_for(
                owner.callback_count(self.repo.sessions), COUNT_TIMEOUT_S
            )
        except (SQLAlchemyError, OSError, TimeoutError):
            self.callbacks_waiting = None

    def current(self, request: Request | WebSocket) -> Session | None:
        if not self.token and not self.local.is_local(request.scope, request.headers):
            return None
        return self.sessions.check(request.cookies.get(SESSION_COOKIE))

    def login_redirect(self, request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)

    def require(self, request: Request) -> Session:
        """For data endpoints: no session is a 401, never a redirect."""
        session = self.current(request)
        if session is None:
            raise HTTPException(401, "sign in to the dashboard first")
        return session

    async def read_form(self, request: Request) -> dict[str, str]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise HTTPException(413, "form too large")
        if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            return {}
        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))

    def check_post(self, request: Request, session: Session, form: Mapping[str, str]) -> None:
        """CSRF: same-origin request and the session's token (form field or header)."""
        if not same_origin(request.url, request.headers, self.settings.public_url, required=False):
            raise HTTPException(403, "cross-origin request refused")
        given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if not self.sessions.check_csrf(session, given):
            raise HTTPException(403, "missing or stale CSRF token: reload the page")

    def render(
        self,
        request: Request,
        name: str,
        session: Session | None,
        status_code: int = 200,
        **context: Any,
    ) -> Response:
        context.update(
            request=request,
            csrf=self.sessions.csrf_token(session) if session is not None else "",
            signed_in=session is not None,
            live_count=len(self.state.registry.active),
            token_login=bool(self.token),
            callbacks_waiting=self.callbacks_waiting if session is not None else None,
            zone_name=self.settings.business_timezone,
        )
        return self.templates.TemplateResponse(
            request, name, context, status_code=status_code, headers=_PAGE_HEADERS
        )

    def unavailable(self, request: Request, session: Session | None) -> Response:
        return self.render(
            request,
            "error.html",
            session,
            503,
            title="Database unavailable",
            message="The call records database is not answering. Try again in a moment.",
        )

    def not_found(self, request: Request, session: Session | None, what: str) -> Response:
        return self.render(request, "error.html", session, 404, title="Not found", message=what)


async def ctx(conn: HTTPConnection) -> Dashboard:
    """The dependency every handler takes: the dashboard its router bound to the request."""
    dash: Dashboard = conn.state.livecall_dashboard
    if conn.scope["type"] == "http" and conn.scope.get("method") == "GET":
        await dash.count_callbacks()
    return dash


Ctx = Annotated[Dashboard, Depends(ctx)]
