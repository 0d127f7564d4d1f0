"""A whole livecall installation on loopback: the real server plus both simulated ends.

The demo, the end-to-end tests and the benchmarks all stand on this: a fake Gemini Live
server over TLS (the real SDK talks to it), the real livecall app served by uvicorn on a
free port, and simulated Twilio callers that ring the webhook and stream audio like Twilio.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from livecall.records import CallObserver
from livecall.settings import Settings
from livecall.sim.gemini import FakeGeminiServer, Scenario
from livecall.sim.twilio import SimulatedCaller

__all__ = ["LocalStack", "free_socket"]

TEST_AUTH_TOKEN = "sim-twilio-auth-token-0123456789"
TEST_API_KEY = "sim-gemini-api-key-0123456789"


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@dataclass
class LocalStack:
    """`async with LocalStack() as stack: await stack.caller(script).run()`."""

    scenario: Scenario | None = None
    settings_overrides: dict[str, Any] = field(default_factory=dict)
    observer_factory: Callable[[str], CallObserver] | None = None
    app_factory: Callable[[Settings], FastAPI] | None = None
    gemini: FakeGeminiServer | None = None
    settings: Settings | None = None
    app: FastAPI | None = None
    base_url: str = ""
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None
    _own_gemini: bool = False
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def _workdir(self) -> Path:
        """Where this stack keeps its database, recordings and spool (removed at stop)."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="livecall-stack-")
        return Path(self._tmp.name)

    async def __aenter__(self) -> LocalStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self.gemini is None:
            self.gemini = FakeGeminiServer(scenario=self.scenario or Scenario())
            self._own_gemini = True
            await self.gemini.start()
        sock = free_socket()
        port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        values: dict[str, Any] = {
            "gemini_api_key": TEST_API_KEY,
            "gemini_base_url": self.gemini.base_url,
            "gemini_ca_file": self.gemini.ca_file,
            "twilio_auth_token": TEST_AUTH_TOKEN,
            "public_url": self.base_url,
            # a file database: aiosqlite's :memory: shares one connection and loses writes
            "database_url": f"sqlite+aiosqlite:///{self._workdir()}/calls.db",
            "recordings_dir": self._workdir() / "recordings",
            "spool_dir": self._workdir() / "spool",
        }
        values.update(self.settings_overrides)
        self.settings = Settings(**values)
        if self.app_factory is not None:
            self.app = self.app_factory(self.settings)
        else:
            from livecall.server.app import create_app

            self.app = create_app(self.settings, observer_factory=self.observer_factory)
        from livecall.cli import uvicorn_config

        config = uvicorn_config(  # as `livecall serve` builds it
            self.app,
            "127.0.0.1",
            port,
            request_timeout_s=self.settings.request_timeout_s,
            ws_max_size=self.settings.ws_max_size,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("livecall server did not start")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 15)
        if self.gemini is not None and self._own_gemini:
            await self.gemini.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def caller(self, script: list[Any], **kwargs: Any) -> SimulatedCaller:
        kwargs.setdefault("auth_token", TEST_AUTH_TOKEN)
        if self.settings is not None and self.settings.twilio_account_sid:
            kwargs.setdefault("account_sid", self.settings.twilio_account_sid)  # its Twilio
        return SimulatedCaller(base_url=self.base_url, script=script, **kwargs)

    def stream_token(self, call_sid: str, account_sid: str) -> str:
        """The token this server's TwiML would give a stream of that call (for raw streams)."""
        import time

        from livecall.server.twilio_routes import twilio_stream_tokens

        assert self.app is not None
        tokens = twilio_stream_tokens(self.app.state.livecall.stream_secret)
        return tokens.for_call(call_sid, account_sid, time.time())

    @property
    def registry(self) -> Any:
        assert self.app is not None
        return self.app.state.livecall.registry
