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
cookie and the origin before accepting, then runs exactly the Twilio bridge path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlsplit

import orjson
import structlog
from fastapi import APIRouter, HTTPException, Request, Response, WebSocket
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.templating import Jinja2Templates

from livecall.live_feed import LiveFeed
from livecall.server.access import LocalAccess
from livecall.server.api import (
    SID_PATTERN,
    CallDetail,
    CallOut,
    EventOut,
    StatsOut,
    TurnOut,
    _columns,
)
from livecall.server.forwarded import TrustedProxies, client_ip
from livecall.server.registry import CallRegistry
from livecall.server.twilio_routes import _run_call, open_stream
from livecall.server.urls import public_base
from livecall.settings import Settings
from livecall.store.recordings import RecordingStore
from livecall.store.repository import InvalidCursor
from livecall.store.writer import CallStore

if TYPE_CHECKING:
    from livecall.server.app import AppState

__all__ = [
    "SESSION_COOKIE",
    "STATIC_DIR",
    "TEMPLATE_DIR",
    "DashboardDisabled",
    "LoginThrottle",
    "Sessions",
    "build_dashboard_router",
    "live_events",
]

log = structlog.get_logger("livecall.dashboard")

HERE = Path(__file__).parent
TEMPLATE_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

SESSION_COOKIE = "livecall_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
DEFAULT_SESSION_TTL_S = 12 * 3600.0
END_REASON = "operator_hangup"  # what a call ended from the live page records as end_reason
MAX_FORM_BYTES = 8192
MAX_STATS_DAYS = 92
HISTOGRAM_CALLS = 2000  # the duration histogram looks at this many most recent calls at most
_SID_RE = re.compile(SID_PATTERN)
_CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")
_SOFTPHONE_CALL_SID = re.compile(r"^CA[0-9a-f]{32}$")
_SOFTPHONE_STREAM_SID = re.compile(r"^MZ[0-9a-f]{32}$")
_NUMBER_JUNK = re.compile(r"[\s().-]")
# Bookkeeping events listed under Events but kept out of the transcript.
_QUIET_EVENTS = frozenset({"session_started"})

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


# --- sessions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    """A checked session: its random id (binds the CSRF token) and when it was issued."""

    id: str
    issued: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class Sessions:
    """Stateless signed sessions: `issued.id.signature`, HMAC-SHA256 under a derived key.

    The key is derived from the API token, so sessions survive restarts and work across
    processes, and changing the token signs everyone out. The cookie never holds the token.
    Logout revokes the session id in this process (a stolen cookie still dies at its TTL).
    """

    def __init__(
        self,
        key: bytes,
        ttl_s: float = DEFAULT_SESSION_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self.ttl_s = ttl_s
        self._clock = clock
        self._revoked: dict[str, float] = {}

    @classmethod
    def for_token(cls, token: str | None, ttl_s: float = DEFAULT_SESSION_TTL_S) -> Sessions:
        """Key from the token; without one (local-only), a random key: sessions end at restart."""
        if token:
            key = hmac.new(token.encode(), b"livecall dashboard session key v1", "sha256").digest()
        else:
            key = secrets.token_bytes(32)
        return cls(key, ttl_s)

    def _sign(self, purpose: str, *parts: str) -> str:
        message = "|".join((purpose, *parts)).encode()
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def issue(self) -> str:
        issued = str(int(self._clock()))
        sid = secrets.token_urlsafe(18)
        return f"{issued}.{sid}.{self._sign('session', issued, sid)}"

    def check(self, value: str | None) -> Session | None:
        if not value or len(value) > 200:
            return None
        parts = value.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        issued_s, sid, signature = parts
        if not hmac.compare_digest(
            signature.encode(), self._sign("session", issued_s, sid).encode()
        ):
            return None
        issued, now = int(issued_s), self._clock()
        if issued > now + 60 or now - issued > self.ttl_s or sid in self._revoked:
            return None
        return Session(sid, issued)

    def revoke(self, session: Session) -> None:
        now = self._clock()
        self._revoked = {s: t for s, t in self._revoked.items() if t > now}
        self._revoked[session.id] = session.issued + self.ttl_s

    def csrf_token(self, session: Session) -> str:
        return self._sign("csrf", session.id)

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(
            token.encode(),
            self.csrf_token(session).encode(),  # type: ignore[union-attr]
        )


class LoginThrottle:
    """Slows down token guessing: `limit` failed logins per client within `window_s`.

    Clients are told apart by address as seen through trusted proxies (`client_key`), so one
    guesser neither shares a bucket with everyone behind the same proxy nor escapes by
    sending X-Forwarded-For itself; at most `max_clients` buckets are kept.
    """

    def __init__(
        self,
        limit: int = 10,
        window_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self.max_clients = max_clients
        self._failures: dict[str, list[float]] = {}

    @staticmethod
    def client_key(address: str) -> str:
        """An IPv4 address, or an IPv6 address's /64 (one host commonly holds a whole /64)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address[:64]
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def _recent(self, client: str) -> list[float]:
        cutoff = self._clock() - self.window_s
        recent = [t for t in self._failures.get(client, ()) if t > cutoff]
        if recent:
            self._failures[client] = recent
        else:
            self._failures.pop(client, None)
        return recent

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= self.limit

    def failed(self, client: str) -> None:
        while len(self._failures) >= self.max_clients:  # a flood of sources: forget the oldest
            self._failures.pop(next(iter(self._failures)))
        self._recent(client)
        self._failures.setdefault(client, []).append(self._clock())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


# --- small helpers --------------------------------------------------------------------------


def _client(host: Any) -> str:
    return getattr(host, "host", None) or "unknown"


def _safe_next(target: str | None) -> str:
    """Only a local path: never an open redirect to another site."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def _is_https(url: Any, headers: Mapping[str, str]) -> bool:
    proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return proto == "https" or url.scheme in ("https", "wss")


def _origins(url: Any, headers: Any, public_url: str | None) -> set[str]:
    """The origins this server is reached at: as the request says, and `PUBLIC_URL`."""
    allowed = {public_base(url, headers, None).lower()}
    if public_url:
        allowed.add(public_base(url, headers, public_url).lower())
    return allowed


def _same_origin(url: Any, headers: Any, public_url: str | None, *, required: bool) -> bool:
    """A browser names the page's origin; a cross-site page cannot pretend to be us."""
    origin = headers.get("origin")
    if origin is None or origin == "null":
        return not required and origin is None
    return origin.rstrip("/").lower() in _origins(url, headers, public_url)


def _day(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        return None


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fmt_offset(ms: float | None) -> str:
    """Milliseconds since the stream started as m:ss.t, the player's clock."""
    if ms is None:
        return "–"
    minutes, secs = divmod(max(ms, 0) / 1000.0, 60)
    return f"{int(minutes)}:{secs:04.1f}"


def _fmt_ms(ms: float | None) -> str:
    return "–" if ms is None else f"{ms:,.0f} ms"


def _latency_class(ms: float | None) -> str:
    """Where a first-audio latency sits: fast under 800 ms, slow from 1.5 s."""
    if ms is None:
        return ""
    return "fast" if ms < 800 else "ok" if ms < 1500 else "slow"


def _fmt_time(value: datetime | None) -> str:
    return "–" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _unheard(turn: TurnOut) -> tuple[str, str]:
    """An interrupted agent turn as (what was heard, what was cut off)."""
    heard = turn.heard_text
    if not turn.interrupted or heard is None:
        return turn.text, ""
    if turn.text.startswith(heard):
        return heard, turn.text[len(heard) :]
    return heard, ""


def _event_summary(event: EventOut) -> str:
    """An event as one line of the transcript: what a reader needs, not the raw data."""
    data = event.data
    heard = data.get("heard_ms")
    if event.kind == "interrupted" and isinstance(heard, int | float):
        return f"the caller cut in after {heard / 1000:.1f} s of the reply"
    if event.kind == "dtmf":
        return f"pressed {data.get('digit') or data.get('digits') or '?'}"
    if event.kind.startswith("tool_"):
        return f"⚙ {event.name or data.get('name') or ''}"
    for key in ("reason", "error", "message", "target", "name"):
        if data.get(key):
            return str(data[key])
    return ""


def _json(value: Any) -> bytes:
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)


@contextlib.contextmanager
def _database() -> Iterator[None]:
    """A database that is down is a 503 page, not a 500."""
    try:
        yield
    except (SQLAlchemyError, OSError) as error:
        raise _Unavailable from error


class _Unavailable(Exception):
    pass


async def _webhook_deliveries(state: AppState, sid: str) -> list[Any] | None:
    """A call's webhook deliveries for its page ([] when none; None when unreadable)."""
    webhooks = getattr(state, "webhooks", None)
    if webhooks is None:
        return []
    from livecall.outcomes.webhooks import DeliveryOut

    try:
        return [DeliveryOut.of(row) for row in await webhooks.outbox.for_call(sid)]
    except (SQLAlchemyError, OSError):
        return None


def _profile_names(state: AppState, settings: Settings) -> list[str]:
    """The agent profiles a softphone call may pick (whatever the app keeps, else the file)."""
    source = getattr(state, "profiles", None) or state.extras.get("profiles")
    current = getattr(source, "current", source)
    names = getattr(current, "names", None)
    if names is None and settings.profiles_file is not None:
        from livecall.agent.profiles import ProfileError, ProfileSet

        try:
            names = ProfileSet.load(settings.profiles_file, settings).names
        except ProfileError as error:
            log.warning("dashboard.profiles_unreadable", error=str(error))
    return [str(n) for n in names or ()]


# --- the live feed as server-sent events ----------------------------------------------------


def _with_partials(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A call's finished turns and, after them, the lines still being spoken."""
    done = list(state.get("turns") or ())
    finished = {t.get("index") for t in done}
    partials = [p for i, p in (state.get("partials") or {}).items() if i not in finished]
    return sorted(done + partials, key=lambda t: t.get("index") or 0)


def live_snapshot(feed: LiveFeed | None, registry: CallRegistry) -> list[dict[str, Any]]:
    """Every call in progress: the registry says which, the feed what was said so far."""
    now = time.monotonic()
    known = feed.calls if feed is not None else {}
    calls: list[dict[str, Any]] = []
    for sid, active in list(registry.active.items()):
        state = known.get(sid, {})
        calls.append(
            {
                "call_sid": sid,
                "stream_sid": active.stream_sid,
                "elapsed_s": round(now - active.started, 1),
                "info": state.get("info") or {},
                "turns": _with_partials(state),
            }
        )
    for sid, state in list(known.items()):
        if sid not in registry.active:
            calls.append(
                {
                    "call_sid": sid,
                    "stream_sid": (state.get("info") or {}).get("stream_sid"),
                    "elapsed_s": None,
                    "info": state.get("info") or {},
                    "turns": _with_partials(state),
                }
            )
    return calls


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _json(data) + b"\n\n"


async def live_events(
    feed: LiveFeed | None,
    registry: CallRegistry,
    *,
    ping_s: float = 15.0,
    max_s: float = 600.0,
    tick_s: float = 1.0,
) -> AsyncIterator[bytes]:
    """The live page's event stream: a snapshot, then each feed message as it happens.

    Subscribes before the snapshot so nothing falls between them (the page ignores repeats);
    a `gap` (this browser was too slow) is answered with a fresh snapshot. The stream ends
    after `max_s` (the browser reconnects by itself) or when the server drains, so an open
    page never holds a shutdown.
    """
    loop = asyncio.get_running_loop()
    queue = feed.subscribe() if feed is not None else None
    try:
        yield b"retry: 2000\n\n"
        yield _sse("snapshot", {"calls": live_snapshot(feed, registry)})
        deadline = loop.time() + max_s
        last_sent = loop.time()
        while not registry.draining and loop.time() < deadline:
            message = None
            try:
                if queue is None:
                    await asyncio.sleep(tick_s)
                else:
                    message = await asyncio.wait_for(queue.get(), tick_s)
            except TimeoutError:
                pass
            if message is None:
                if loop.time() - last_sent >= ping_s:
                    last_sent = loop.time()
                    yield b": ping\n\n"
                continue
            last_sent = loop.time()
            if message.get("type") == "gap":
                yield _sse("snapshot", {"calls": live_snapshot(feed, registry)})
            else:
                yield _sse(str(message.get("type", "message")), message)
    finally:
        if queue is not None and feed is not None:
            feed.unsubscribe(queue)


# --- the router -----------------------------------------------------------------------------


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
    sessions = Sessions.for_token(token or None, session_ttl_s)
    throttle = LoginThrottle()
    trusted = TrustedProxies(settings.trusted_proxies)
    admin_socket = str(settings.admin_socket) if settings.admin_socket else None
    local = LocalAccess(trusted, admin_socket)  # local-only: real loopback peer, Host, Origin
    templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
    env = templates.env
    env.filters.update(
        duration=_fmt_duration,
        offset=_fmt_offset,
        ms=_fmt_ms,
        latency_class=_latency_class,
        when=_fmt_time,
        event_summary=_event_summary,
    )
    repo = store.repo
    router = APIRouter(include_in_schema=False)

    # --- auth -------------------------------------------------------------------------------

    def current(request: Request | WebSocket) -> Session | None:
        if not token and not local.is_local(request.scope, request.headers):
            return None
        return sessions.check(request.cookies.get(SESSION_COOKIE))

    def login_redirect(request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)

    def require(request: Request) -> Session:
        """For data endpoints: no session is a 401, never a redirect."""
        session = current(request)
        if session is None:
            raise HTTPException(401, "sign in to the dashboard first")
        return session

    async def read_form(request: Request) -> dict[str, str]:
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

    def check_post(request: Request, session: Session, form: Mapping[str, str]) -> None:
        """CSRF: same-origin request and the session's token (form field or header)."""
        if not _same_origin(request.url, request.headers, settings.public_url, required=False):
            raise HTTPException(403, "cross-origin request refused")
        given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if not sessions.check_csrf(session, given):
            raise HTTPException(403, "missing or stale CSRF token: reload the page")

    def render(
        request: Request,
        name: str,
        session: Session | None,
        status_code: int = 200,
        **context: Any,
    ) -> Response:
        context.update(
            request=request,
            csrf=sessions.csrf_token(session) if session is not None else "",
            signed_in=session is not None,
            live_count=len(state.registry.active),
            token_login=bool(token),
        )
        return templates.TemplateResponse(
            request, name, context, status_code=status_code, headers=_PAGE_HEADERS
        )

    def unavailable(request: Request, session: Session | None) -> Response:
        return render(
            request,
            "error.html",
            session,
            503,
            title="Database unavailable",
            message="The call records database is not answering. Try again in a moment.",
        )

    def not_found(request: Request, session: Session | None, what: str) -> Response:
        return render(request, "error.html", session, 404, title="Not found", message=what)

    # --- login ------------------------------------------------------------------------------

    @router.get("/login")
    async def login_page(request: Request, next: str | None = None) -> Response:
        if current(request) is not None:
            return RedirectResponse(_safe_next(next), status_code=303)
        return render(request, "login.html", None, next=_safe_next(next), error=None)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await read_form(request)
        target = _safe_next(form.get("next"))
        peer = request.client.host if request.client else None
        client = LoginThrottle.client_key(client_ip(peer, request.headers, trusted))
        if not _same_origin(request.url, request.headers, settings.public_url, required=False):
            raise HTTPException(403, "cross-origin request refused")
        if throttle.blocked(client):
            log.warning("dashboard.login_throttled", client=client)
            return render(
                request,
                "login.html",
                None,
                429,
                next=target,
                error="Too many failed attempts. Wait a few minutes and try again.",
            )
        given = form.get("token", "")
        if token:
            ok = hmac.compare_digest(given.encode(), token.encode())
        else:  # local-only: loopback clients only, no token to check
            ok = local.is_local(request.scope, request.headers)
        if not ok:
            throttle.failed(client)
            log.warning("dashboard.login_failed", client=client)
            return render(
                request, "login.html", None, 401, next=target, error="That token is not right."
            )
        throttle.succeeded(client)
        log.info("dashboard.login", client=client)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            sessions.issue(),
            max_age=int(sessions.ttl_s),
            path="/",
            httponly=True,
            secure=_is_https(request.url, request.headers),
            samesite="strict",
        )
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await read_form(request)
        session = current(request)
        if session is not None:
            check_post(request, session, form)
            sessions.revoke(session)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # --- calls ------------------------------------------------------------------------------

    @router.get("/")
    async def calls_page(
        request: Request,
        since: str | None = None,
        until: str | None = None,
        q: str | None = None,
        status: str | None = None,
        cursor: str | None = None,
    ) -> Response:
        session = current(request)
        if session is None:
            return login_redirect(request)
        query = (q or "").strip()[:64]
        if _CALL_SID.match(query):  # a pasted call SID: straight to its page
            return RedirectResponse(f"/calls/{query}", status_code=303)
        number = _NUMBER_JUNK.sub("", query) or None
        start, end = _day(since), _day(until)
        status = status if status in ("in_progress", "completed", "failed") else None
        error = None
        try:
            with _database():
                page = await repo.list_calls(
                    since=_midnight(start) if start else None,
                    until=_midnight(end + timedelta(days=1)) if end else None,
                    number=number,
                    status=status,
                    limit=50,
                    cursor=cursor or None,
                )
        except InvalidCursor:
            error = "That page link is no longer valid; showing the newest calls."
            with _database():
                page = await repo.list_calls(number=number, status=status, limit=50)
        except _Unavailable:
            return unavailable(request, session)
        filters = {
            "since": start.isoformat() if start else "",
            "until": end.isoformat() if end else "",
            "q": query,
            "status": status or "",
        }
        return render(
            request,
            "calls.html",
            session,
            nav="calls",
            calls=[CallOut.of(c) for c in page.items],
            total=page.total,
            next_cursor=page.next_cursor,
            paged=bool(cursor),
            filters=filters,
            filter_query={k: v for k, v in filters.items() if v},
            error=error,
        )

    @router.get("/calls/{sid}")
    async def call_page(request: Request, sid: str) -> Response:
        session = current(request)
        if session is None:
            return login_redirect(request)
        if not _SID_RE.match(sid):
            return not_found(request, session, "No such call.")
        try:
            with _database():
                call = await repo.get_call(sid)
        except _Unavailable:
            return unavailable(request, session)
        if call is None:
            return not_found(request, session, f"No call {sid} in the records.")
        detail = CallDetail.model_validate(
            {
                **_columns(call),
                "has_recording": call.recording_key is not None,
                "custom_parameters": call.custom_parameters or {},
                "turns": [TurnOut.model_validate(t) for t in call.turns],
                "events": [EventOut.model_validate(e) for e in call.events],
            }
        )
        timeline: list[dict[str, Any]] = []
        for turn in detail.turns:
            heard, cut = _unheard(turn)
            timeline.append(
                {"kind": "turn", "at": turn.start_ms, "turn": turn, "heard": heard, "cut": cut}
            )
        for event in detail.events:
            if event.kind not in _QUIET_EVENTS:
                timeline.append({"kind": "event", "at": event.at_ms, "event": event})
        timeline.sort(key=lambda item: (item["at"], item["kind"] == "event"))
        latencies = [
            t.first_audio_latency_ms for t in detail.turns if t.first_audio_latency_ms is not None
        ]
        deliveries = await _webhook_deliveries(state, sid)
        data = {
            "call_sid": detail.call_sid,
            "has_recording": detail.has_recording,
            "duration_s": detail.duration_s,
            "turns": [t.model_dump() for t in detail.turns],
            "events": [e.model_dump() for e in detail.events],
        }
        return render(
            request,
            "call.html",
            session,
            nav="calls",
            call=detail,
            timeline=timeline,
            live=sid in state.registry.active,
            latency_summary={
                "count": len(latencies),
                "mean": sum(latencies) / len(latencies) if latencies else None,
                "max": max(latencies) if latencies else None,
            },
            call_data=data,
            deliveries=deliveries,
            webhooks_on=getattr(state, "webhooks", None) is not None,
        )

    @router.post("/calls/{sid}/webhook/retry")
    async def retry_webhook(request: Request, sid: str) -> Response:
        """Send a call's end-of-call webhook again now (same delivery id)."""
        session = require(request)
        form = await read_form(request)
        check_post(request, session, form)
        webhooks = getattr(state, "webhooks", None)
        if webhooks is None or not _SID_RE.match(sid):
            raise HTTPException(404, "no such call")
        try:
            outcome = await webhooks.retry(sid)
        except (SQLAlchemyError, OSError, TimeoutError) as error:
            raise HTTPException(503, "call records database unavailable") from error
        if outcome.problem is not None:
            raise HTTPException(outcome.status_code, outcome.problem)
        log.info("dashboard.webhook_retry", call_sid=sid, deliveries=outcome.queued)
        if "application/json" in request.headers.get("accept", ""):
            return Response(
                _json({"call_sid": sid, "queued": outcome.queued}),
                202,
                media_type="application/json",
            )
        return RedirectResponse(f"/calls/{sid}#webhooks", status_code=303)

    @router.get("/calls/{sid}/recording")
    async def call_recording(request: Request, sid: str) -> Response:
        """The stereo recording for the page's player (cookie auth; Range requests work)."""
        require(request)
        if not _SID_RE.match(sid):
            raise HTTPException(404, "no recording for this call")
        recording = await recordings.open(sid)
        if recording is None:
            raise HTTPException(404, "no recording for this call")
        filename = f"{sid}.{recording.media_type.rsplit('/', 1)[-1]}"
        disposition = "attachment" if request.query_params.get("download") else "inline"
        if recording.path is not None:
            return FileResponse(
                recording.path,
                media_type=recording.media_type,
                filename=filename,
                content_disposition_type=disposition,
                headers={"Cache-Control": "private, max-age=3600"},
            )
        assert recording.stream is not None
        return StreamingResponse(
            iter(lambda: recording.stream.read(65536), b""),  # type: ignore[union-attr]
            media_type=recording.media_type,
            headers={"Content-Disposition": f'{disposition}; filename="{filename}"'},
        )

    # --- live calls -------------------------------------------------------------------------

    @router.get("/live")
    async def live_page(request: Request) -> Response:
        session = current(request)
        if session is None:
            return login_redirect(request)
        return render(
            request,
            "live.html",
            session,
            nav="live",
            calls=live_snapshot(feed, state.registry),
        )

    @router.get("/live/events")
    async def live_stream(request: Request) -> Response:
        require(request)
        return StreamingResponse(
            live_events(feed, state.registry),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @router.post("/live/{sid}/end")
    async def end_call(request: Request, sid: str) -> Response:
        session = require(request)
        form = await read_form(request)
        check_post(request, session, form)
        active = state.registry.active.get(sid)
        if active is not None and active.bridge is not None:
            active.bridge.end(END_REASON)
        else:
            # held by another instance: asked through the cluster (Redis), as the API does
            cluster = getattr(state, "cluster", None)
            if (
                cluster is None
                or not _SID_RE.match(sid)
                or not await cluster.request(sid, "end", reason=END_REASON)
            ):
                raise HTTPException(404, "no such call in progress")
        log.info("dashboard.end_call", call_sid=sid)
        if "application/json" in request.headers.get("accept", ""):
            return Response(
                _json({"call_sid": sid, "ending": True}), 202, media_type="application/json"
            )
        return RedirectResponse("/live", status_code=303)

    # --- statistics -------------------------------------------------------------------------

    @router.get("/stats")
    async def stats_page(
        request: Request, since: str | None = None, until: str | None = None
    ) -> Response:
        session = current(request)
        if session is None:
            return login_redirect(request)
        today = datetime.now(UTC).date()
        end = _day(until) or today
        start = _day(since) or end - timedelta(days=13)
        if start > end:
            start, end = end, start
        start = max(start, end - timedelta(days=MAX_STATS_DAYS - 1))
        lo, hi = _midnight(start), _midnight(end + timedelta(days=1))
        try:
            with _database():
                overall = StatsOut.of(await repo.stats(since=lo, until=hi))
                days = []
                day = start
                while day <= end:
                    s = StatsOut.of(
                        await repo.stats(since=_midnight(day), until=_midnight(day) + timedelta(1))
                    )
                    days.append({"day": day.isoformat(), **s.model_dump()})
                    day += timedelta(days=1)
                recent = await repo.list_calls(since=lo, until=hi, limit=HISTOGRAM_CALLS)
        except _Unavailable:
            return unavailable(request, session)
        durations = [c.duration_s for c in recent.items if c.duration_s is not None]
        data = {
            "overall": overall.model_dump(),
            "days": days,
            "durations": durations,
            "durations_sampled": recent.total > len(recent.items),
        }
        return render(
            request,
            "stats.html",
            session,
            nav="stats",
            stats=overall,
            since=start.isoformat(),
            until=end.isoformat(),
            stats_data=data,
            sampled=data["durations_sampled"],
            histogram_calls=HISTOGRAM_CALLS,
        )

    # --- softphone --------------------------------------------------------------------------

    @router.get("/softphone")
    async def softphone_page(request: Request) -> Response:
        session = current(request)
        if session is None:
            return login_redirect(request)
        return render(
            request,
            "softphone.html",
            session,
            nav="softphone",
            profiles=_profile_names(state, settings),
        )

    @router.websocket("/ws/softphone")
    async def softphone_socket(ws: WebSocket) -> None:
        """The browser speaks Twilio Media Streams here; the call runs the Twilio bridge."""
        if current(ws) is None or not _same_origin(
            ws.url, ws.headers, settings.public_url, required=True
        ):
            log.warning("dashboard.softphone_refused", client=_client(ws.client))
            await ws.close(code=1008)  # before accept: the upgrade is answered 403
            return
        if state.registry.draining:
            await ws.close(code=1013)
            return
        opened = await open_stream(ws, settings)
        if opened is None:
            return
        carrier, stream, start = opened
        if not (
            _SOFTPHONE_CALL_SID.match(start.call_sid)
            and _SOFTPHONE_STREAM_SID.match(start.stream_sid)
        ):
            log.warning("dashboard.softphone_bad_start", call_sid=start.call_sid[:64])
            await carrier.close(1008)
            return
        if start.call_sid in state.registry.active:  # never take over somebody's call
            log.warning("dashboard.softphone_sid_taken", call_sid=start.call_sid)
            await carrier.close(1008)
            return
        profile = start.custom_parameters.get("profile", "").strip()[:128]
        params = {"from": "softphone", "direction": "inbound"}
        if profile:
            params["profile"] = profile
        start = dataclasses.replace(start, custom_parameters=params)
        log.info("dashboard.softphone_call", call_sid=start.call_sid, profile=profile or None)
        await _run_call(state, carrier, stream, start)

    # --- static files -----------------------------------------------------------------------

    static_root = STATIC_DIR.resolve()

    @router.get("/static/{path:path}")
    async def static(path: str) -> Response:
        """The dashboard's own scripts, styles and vendored library (public, no secrets)."""
        target = (static_root / path).resolve()
        if not target.is_relative_to(static_root) or not target.is_file():
            raise HTTPException(404)
        media_type = "text/javascript" if target.suffix in (".js", ".mjs") else None
        return FileResponse(
            target,
            media_type=media_type,
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    return router
