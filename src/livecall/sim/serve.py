"""Serving a simulator's ASGI app on a free loopback port, for as long as a test needs it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["serve_app"]


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """``async with serve_app(app) as base_url``: uvicorn on 127.0.0.1, stopped on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    # log_config=None: a simulator must not reconfigure the process's uvicorn loggers
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", access_log=False, log_config=None
    )
    server = uvicorn.Server(config)
    # the socket already listens: clients may connect at once, the kernel queues them
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()
