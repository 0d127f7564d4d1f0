"""The uvicorn stack `livecall serve` runs on: the cheaper WebSocket implementation, pinned."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from livecall.server.conn_guard import guarded_http_protocol
from livecall.server.serving import uvicorn_config


async def _app(scope: Any, receive: Any, send: Any) -> None:
    return None


def test_serve_runs_the_sans_io_websocket_protocol_behind_the_guarded_http_one() -> None:
    config: Any = uvicorn_config(_app, "127.0.0.1", 0)
    config.load()
    # not uvicorn's `auto`, which meant the legacy implementation before uvicorn 0.50
    assert config.ws_protocol_class is WebSocketsSansIOProtocol
    assert config.http_protocol_class.__name__ == guarded_http_protocol(1.0).__name__
    assert config.ws_max_size == 1 << 20
