"""A request must arrive whole (headers and body) within a deadline, or it is cut.

uvicorn starts its keep-alive timer only after a response, and has no timer at all while a
request is coming in, so a client that opens a socket and sends nothing (or half an HTTP
request, or half a WebSocket upgrade, or a body at one byte every few seconds) is held for
ever: a cheap way to exhaust a phone server's file descriptors. This protocol arms a timer
when the connection is made (and when a later request on a kept-alive connection begins) and
cancels it once the request, body included, has been received. If it fires first, the client
gets 408 (unless a response has started) and the connection is closed. A socket that upgraded
to a WebSocket belongs to the WebSocket protocol from then on and is left alone (the stream
handler has its own first-message timeout).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["guarded_http_protocol"]

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\n"
    b"connection: close\r\n\r\n"
    b"request too slow"
)


def guarded_http_protocol(timeout_s: float) -> type[HttpToolsProtocol]:
    class GuardedHttpProtocol(HttpToolsProtocol):
        _request_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._request_timer is None:
                self._request_timer = self.loop.call_later(timeout_s, self._request_too_slow)

        def _disarm(self) -> None:
            timer = self._request_timer
            if timer is not None:
                timer.cancel()
                self._request_timer = None

        # uvicorn's own connection_made takes asyncio.Transport, narrower than asyncio's
        # BaseTransport (uvicorn ignores the same override error): we keep its signature.
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # a later request on a kept-alive connection: its own deadline

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self.parser.should_upgrade() and self._should_upgrade():
                self._disarm()  # the WebSocket protocol takes over

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _request_too_slow(self) -> None:
            self._request_timer = None
            transport: Any = self.transport
            if transport.is_closing() or transport.get_protocol() is not self:
                return
            cycle = self.cycle
            if cycle is None or cycle.response_complete or not cycle.response_started:
                transport.write(_TIMEOUT_RESPONSE)
            transport.close()

    return GuardedHttpProtocol
