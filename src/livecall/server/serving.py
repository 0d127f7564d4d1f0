"""The uvicorn server livecall runs on, one definition for `livecall serve`, its workers and
the simulated stacks of the demo, tests and benchmarks (so they all run what production runs).
"""

from __future__ import annotations

from typing import Any

import uvicorn
from starlette.types import ASGIApp

from livecall.server.conn_guard import guarded_http_protocol

__all__ = ["uvicorn_config"]


def uvicorn_config(
    app_obj: ASGIApp,
    host: str,
    port: int,
    *,
    request_timeout_s: float = 10.0,
    ws_max_size: int = 1 << 20,
    **kw: Any,
) -> uvicorn.Config:
    """The uvicorn server livecall runs on: whole-request deadline at the protocol level,
    WebSocket messages capped by uvicorn itself (frames above MAX_MESSAGE_BYTES but under
    this are read, logged and ignored), and forwarded headers left to livecall, which
    believes them only from TRUSTED_PROXIES (uvicorn's own would trust 127.0.0.1)."""
    edge = getattr(getattr(app_obj, "state", None), "edge", None)
    if edge is not None:
        edge.server_ws_max_size = ws_max_size  # the app need not check each message again
    return uvicorn.Config(
        app_obj,
        host=host,
        port=port,
        http=guarded_http_protocol(request_timeout_s),
        # uvicorn's sans-I/O websockets protocol: 23 % less CPU than the legacy `websockets`
        # one on the null bridge (docs/benchmarks.md); `auto` picks it since uvicorn 0.50 only
        ws="websockets-sansio",
        ws_max_size=ws_max_size,
        ws_ping_interval=20.0,
        ws_ping_timeout=60.0,
        log_config=None,
        access_log=False,
        # X-Forwarded-* are believed from TRUSTED_PROXIES only (server/forwarded.py); uvicorn's
        # own default would rewrite scheme and client address for any loopback peer first
        proxy_headers=False,
        lifespan="on",
        **kw,
    )
