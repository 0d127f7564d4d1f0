"""Bounded edges: what any peer may cost us before it has proven who it is.

One pure-ASGI middleware in front of every route, so every way of serving the app (`livecall
serve`, `uvicorn --factory`, gunicorn workers) gets the same limits:

- Host allowlist (`auth.HostPolicy`): a request for a Host we do not serve gets 400.
- Request bodies: `Content-Length` above the route's cap is answered 413 before a byte of
  the body is read (64 KiB for Twilio's form posts, `MAX_BODY_BYTES` elsewhere); a chunked
  body is counted as it streams and cut with 413 at the cap. Either way the connection is
  closed, so the rest is never read.
- A body must arrive within `REQUEST_TIMEOUT` of the request's start (408); `conn_guard`
  also covers the headers, at the protocol level, on the servers `livecall serve` builds.
- WebSocket messages above `WS_MAX_SIZE` close the socket with 1009. uvicorn does it itself
  when configured so (`livecall serve`); otherwise this middleware does.
- Per client address (`forwarded.client_ip`, so through trusted proxies only), at most
  `MAX_PENDING_PER_CLIENT` connections may be pending at once: HTTP requests not yet
  answered, WebSockets until the app calls `authenticated()` (a stream after its checked
  `start`). More get 429 (a WebSocket upgrade too, where the server supports it).

Per request this costs a few header lookups and dict operations; per WebSocket message, one
length check only where the server does not enforce the limit itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from livecall.server.auth import HostPolicy, on_admin_socket, peer_of, unix_socket_of
from livecall.server.forwarded import TrustedProxies, client_ip

__all__ = [
    "TWILIO_MAX_BODY_BYTES",
    "EdgeLimits",
    "EdgeMiddleware",
    "PendingGate",
    "authenticated",
]

log = structlog.get_logger("livecall.edge")

#: Twilio's webhook forms are a few KiB; nothing it posts comes near this.
TWILIO_MAX_BODY_BYTES = 64 * 1024
_TWILIO_PATHS = ("/twiml", "/twilio/")
_PENDING_KEY = "livecall.pending_release"


@dataclass
class EdgeLimits:
    """The limits, from `Settings`; `server_ws_max_size` is set by whoever builds a server
    that enforces the WebSocket message limit itself (`serving.uvicorn_config`)."""

    hosts: HostPolicy
    trusted: TrustedProxies
    max_body_bytes: int = 1 << 20
    twilio_max_body_bytes: int = TWILIO_MAX_BODY_BYTES
    request_timeout_s: float = 10.0
    ws_max_size: int = 1 << 20
    max_pending_per_client: int = 64
    server_ws_max_size: int | None = None
    on_refused: Callable[[str], None] = field(default=lambda reason: None)

    def body_limit(self, path: str) -> int:
        if path == "/twiml" or path.startswith(_TWILIO_PATHS[1]):
            return min(self.twilio_max_body_bytes, self.max_body_bytes)
        return self.max_body_bytes

    @property
    def server_checks_ws_size(self) -> bool:
        return self.server_ws_max_size is not None and self.server_ws_max_size <= self.ws_max_size


class PendingGate:
    """Counts pending connections per client key; a key disappears when its count is 0,
    so memory follows the connections actually open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def enter(self, key: str) -> bool:
        n = self.counts.get(key, 0)
        if n >= self.limit:
            return False
        self.counts[key] = n + 1
        return True

    def leave(self, key: str) -> None:
        n = self.counts.get(key, 0) - 1
        if n > 0:
            self.counts[key] = n
        else:
            self.counts.pop(key, None)


def authenticated(conn: HTTPConnection) -> None:
    """The app vouches for this connection (a stream whose `start` checked out): it no longer
    counts against its client's pending connections. Idempotent."""
    release = conn.scope.pop(_PENDING_KEY, None)
    if release is not None:
        release()


class _BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, "request body too large", headers={"Connection": "close"})


class _BodyTooSlow(HTTPException):
    def __init__(self) -> None:
        super().__init__(408, "request body too slow", headers={"Connection": "close"})


class EdgeMiddleware:
    """See the module doc. `limits` is read at each connection, so a server built later can
    still say it enforces the WebSocket limit."""

    def __init__(self, app: ASGIApp, limits: EdgeLimits) -> None:
        self.app = app
        self.limits = limits
        self.gate = PendingGate(limits.max_pending_per_client)
        self._refusals: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        limits = self.limits
        headers = Headers(scope=scope)
        if on_admin_socket(scope, limits.hosts.admin_socket):  # this machine's own user
            await self._serve(scope, receive, send, headers)
            return
        if not limits.hosts.allows(scope, headers):
            await self._refuse(scope, send, 400, "host", "unknown Host")
            return
        if unix_socket_of(scope) is not None:  # a proxy in front (`uvicorn --uds`): no
            await self._serve(scope, receive, send, headers)  # client address to key on
            return
        key = client_ip(peer_of(scope), headers, limits.trusted)
        if not self.gate.enter(key):
            await self._refuse(scope, send, 429, "pending", "too many pending requests")
            return
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.gate.leave(key)

        scope[_PENDING_KEY] = release
        try:
            await self._serve(scope, receive, send, headers)
        finally:
            release()

    async def _serve(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send, headers)
        elif self.limits.server_checks_ws_size:
            await self.app(scope, receive, send)
        else:
            await self.app(scope, self._ws_receive(receive, send), send)

    # --- HTTP ------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        limits = self.limits
        limit = limits.body_limit(scope["path"])
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            await self._refuse(scope, send, 413, "body_size", "request body too large")
            return
        deadline = asyncio.get_running_loop().time() + limits.request_timeout_s
        received = 0
        body_done = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                self._count("body_time")
                raise _BodyTooSlow from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    self._count("body_size")
                    raise _BodyTooLarge
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                release = scope.pop(_PENDING_KEY, None)
                if release is not None:
                    release()  # answered: no longer pending
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except (_BodyTooLarge, _BodyTooSlow) as exc:
            if not started:
                await _plain(send, exc.status_code, exc.detail)

    # --- WebSocket -------------------------------------------------------------------------

    def _ws_receive(self, receive: Receive, send: Send) -> Receive:
        limit = self.limits.ws_max_size

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "websocket.receive":
                text = message.get("text")
                size = len(message.get("bytes") or b"") if text is None else len(text)
                if size > limit // 4 and text is not None:
                    size = len(text.encode())
                if size > limit:
                    self._count("ws_size")
                    await send({"type": "websocket.close", "code": 1009, "reason": ""})
                    return {"type": "websocket.disconnect", "code": 1009}
            return message

        return limited_receive

    # --- refusing --------------------------------------------------------------------------

    def _count(self, reason: str) -> None:
        n = self._refusals.get(reason, 0) + 1
        self._refusals[reason] = n
        self.limits.on_refused(f"edge_{reason}")
        if n <= 10 or n % 1000 == 0:  # a flood must not flood the log
            log.warning("edge.refused", reason=reason, count=n)

    async def _refuse(self, scope: Scope, send: Send, status: int, reason: str, text: str) -> None:
        self._count(reason)
        if scope["type"] == "http":
            await _plain(send, status, text)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await _plain(send, status, text, prefix="websocket.")
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": ""})


async def _plain(send: Send, status: int, text: str, prefix: str = "") -> None:
    body = text.encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    if not prefix:
        headers.append((b"connection", b"close"))  # the unread rest of the body is not read
    if status == 429:
        headers.append((b"retry-after", b"1"))
    await send({"type": f"{prefix}http.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": body, "more_body": False})
