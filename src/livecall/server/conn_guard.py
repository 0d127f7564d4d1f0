"""A connection must say what it wants within a deadline, or it is closed.

uvicorn starts its keep-alive timer only after a response, so a client that opens a socket
and sends nothing (or half an HTTP request, or half a WebSocket upgrade) is held for ever: a
cheap way to exhaust a phone server's file descriptors. This protocol arms a timer when the
connection is made and closes it if no request has been fully received by then. A socket that
upgraded to a WebSocket belongs to the WebSocket protocol from then on and is left alone (the
stream handler has its own first-message timeout).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["guarded_http_protocol"]


def guarded_http_protocol(timeout_s: float) -> type[HttpToolsProtocol]:
    class GuardedHttpProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._first_request_timer: asyncio.TimerHandle | None = self.loop.call_later(
                timeout_s, self._no_request_in_time
            )

        def on_headers_complete(self) -> None:
            timer = self._first_request_timer
            if timer is not None:
                timer.cancel()
                self._first_request_timer = None
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_first_request_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _no_request_in_time(self) -> None:
            self._first_request_timer = None
            transport: Any = self.transport
            if transport.is_closing() or transport.get_protocol() is not self:
                return
            if self.cycle is None:
                transport.close()

    return GuardedHttpProtocol
