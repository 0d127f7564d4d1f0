"""A whole livecall installation on loopback: the real server plus both simulated ends.

The demo, the end-to-end tests and the benchmarks all stand on this: a fake Gemini Live
server over TLS (the real SDK talks to it), the real livecall app served by uvicorn on a
free port, and simulated Twilio callers that ring the webhook and stream audio like Twilio.

`carrier_apis` also serves fakes of carriers' REST APIs ("twilio", "telnyx", "plivo",
"vonage", "exotel"), each on its own loopback port with livecall's settings pointed at it
(credentials included; Telnyx, Plivo, Vonage and Exotel calls are switched on too);
`fakes[name]` is each fake's state; the fakes place outbound calls with simulated callees.
Callers made by `caller`, `telnyx_caller`, `plivo_caller` and `vonage_caller` are then known
to their carrier's fake, so a REST hang-up or transfer ends their stream as the carrier would
(a Vonage caller's `region_url` is the fake's region path, so its control goes there).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from livecall.records import CallObserver
from livecall.settings import Settings
from livecall.sim.edge import SimulatedEdge
from livecall.sim.gemini import FakeGeminiServer, Scenario
from livecall.sim.twilio import SimulatedCaller

__all__ = ["LocalStack", "free_socket"]

TEST_AUTH_TOKEN = "sim-twilio-auth-token-0123456789"
TEST_API_KEY = "sim-gemini-api-key-0123456789"
# the accounts `carrier_apis` fakes serve
TWILIO_ACCOUNT_SID = "AC" + "5" * 32
TELNYX_API_KEY = "KEYsim-telnyx-api-key-0123456789"
TELNYX_ACCOUNT_SID = str(uuid.UUID(int=0x5111))
TELNYX_APPLICATION_SID = "1293384261075731499"
PLIVO_AUTH_ID = "MASIMULATED0000000001"
PLIVO_AUTH_TOKEN = "sim-plivo-auth-token-0123456789"
VONAGE_SIGNATURE_SECRET = "sim-vonage-signature-secret-0123456789"
VONAGE_APPLICATION_ID = str(uuid.UUID(int=0x7011))
EXOTEL_URL_SECRET = "sim-exotel-url-secret-0123456789"
EXOTEL_ACCOUNT_SID = "simexotel1"
EXOTEL_API_KEY = "sim-exotel-api-key-0123456789"
EXOTEL_API_TOKEN = "sim-exotel-api-token-0123456789"
CARRIER_APIS = ("twilio", "telnyx", "plivo", "vonage", "exotel")


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
    carrier_apis: tuple[str, ...] = ()
    fakes: dict[str, Any] = field(default_factory=dict)
    _fake_servers: contextlib.AsyncExitStack | None = None
    _telnyx_seed: bytes = b""
    _vonage_region: str = ""

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
        values.update(await self._serve_carrier_apis())
        values.update(self.settings_overrides)
        self.settings = Settings(**values)
        if self.app_factory is not None:
            self.app = self.app_factory(self.settings)
        else:
            from livecall.server.app import create_app

            self.app = create_app(self.settings, observer_factory=self.observer_factory)
        from livecall.server.serving import uvicorn_config

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
        if self._fake_servers is not None:
            await self._fake_servers.aclose()
            self._fake_servers = None
        if self.gemini is not None and self._own_gemini:
            await self.gemini.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def _serve_carrier_apis(self) -> dict[str, Any]:
        """Serve the fakes `carrier_apis` names; the settings that point livecall at them."""
        unknown = set(self.carrier_apis) - set(CARRIER_APIS)
        if unknown:
            raise ValueError(f"no fake carrier API for {sorted(unknown)}: {CARRIER_APIS}")
        if not self.carrier_apis:
            return {}
        from livecall.sim.plivo_rest import build_fake_plivo_rest
        from livecall.sim.serve import serve_app
        from livecall.sim.telnyx_rest import build_fake_telnyx_rest
        from livecall.sim.twilio_rest import build_fake_twilio_rest

        exits = self._fake_servers = contextlib.AsyncExitStack()
        values: dict[str, Any] = {}
        if "twilio" in self.carrier_apis:
            app, twilio = build_fake_twilio_rest(TWILIO_ACCOUNT_SID, TEST_AUTH_TOKEN)
            exits.push_async_callback(twilio.aclose)
            base = await exits.enter_async_context(serve_app(app))
            self.fakes["twilio"] = twilio
            values |= {"twilio_account_sid": TWILIO_ACCOUNT_SID, "twilio_api_base_url": base}
        if "telnyx" in self.carrier_apis:
            from livecall.sim.telnyx import generate_keypair

            self._telnyx_seed, public = generate_keypair()
            app, telnyx = build_fake_telnyx_rest(
                TELNYX_API_KEY,
                TELNYX_ACCOUNT_SID,
                application_sid=TELNYX_APPLICATION_SID,
                signing_key=self._telnyx_seed,  # it signs the fetches of the calls it places
            )
            exits.push_async_callback(telnyx.aclose)
            base = await exits.enter_async_context(serve_app(app))
            self.fakes["telnyx"] = telnyx
            values |= {
                "telnyx_public_key": public,
                "telnyx_api_key": TELNYX_API_KEY,
                "telnyx_account_sid": TELNYX_ACCOUNT_SID,
                "telnyx_application_sid": TELNYX_APPLICATION_SID,
                "telnyx_api_base": base + "/v2",
            }
        if "plivo" in self.carrier_apis:
            app, plivo = build_fake_plivo_rest(PLIVO_AUTH_ID, PLIVO_AUTH_TOKEN)
            exits.push_async_callback(plivo.aclose)
            base = await exits.enter_async_context(serve_app(app))
            self.fakes["plivo"] = plivo
            values |= {
                "plivo_auth_token": PLIVO_AUTH_TOKEN,
                "plivo_auth_id": PLIVO_AUTH_ID,
                "plivo_api_base": base,
            }
        if "vonage" in self.carrier_apis:
            from livecall.sim.vonage_rest import (
                REGION_PATH,
                build_fake_vonage_rest,
                generate_application_keys,
            )

            private, public = generate_application_keys()
            app, vonage = build_fake_vonage_rest(
                VONAGE_APPLICATION_ID,
                public,
                signature_secret=VONAGE_SIGNATURE_SECRET,  # it signs placed calls' webhooks
            )
            self.fakes["vonage"] = vonage
            exits.push_async_callback(vonage.aclose)
            base = await exits.enter_async_context(serve_app(app))
            self._vonage_region = base + REGION_PATH
            values |= {
                "vonage_signature_secret": VONAGE_SIGNATURE_SECRET,
                "vonage_application_id": VONAGE_APPLICATION_ID,
                "vonage_private_key": private,
                "vonage_api_base": base,
            }
        if "exotel" in self.carrier_apis:
            from livecall.sim.exotel import build_fake_exotel_rest

            app, exotel = build_fake_exotel_rest(
                EXOTEL_ACCOUNT_SID, EXOTEL_API_KEY, EXOTEL_API_TOKEN
            )
            exits.push_async_callback(exotel.aclose)
            base = await exits.enter_async_context(serve_app(app))
            self.fakes["exotel"] = exotel
            values |= {
                "exotel_url_secret": EXOTEL_URL_SECRET,
                "exotel_account_sid": EXOTEL_ACCOUNT_SID,
                "exotel_api_key": EXOTEL_API_KEY,
                "exotel_api_token": EXOTEL_API_TOKEN,
                "exotel_api_base": base,
            }
        return values

    def _fake_for(self, carrier: str, method: str) -> Any:
        """The carrier's fake REST API, which `method`'s callers are attached to."""
        if carrier not in self.fakes:
            raise RuntimeError(f'{method} needs LocalStack(carrier_apis=("{carrier}", …))')
        return self.fakes[carrier]

    def caller(self, script: list[Any], **kwargs: Any) -> SimulatedCaller:
        kwargs.setdefault("auth_token", TEST_AUTH_TOKEN)
        if self.settings is not None and self.settings.twilio_account_sid:
            kwargs.setdefault("account_sid", self.settings.twilio_account_sid)  # its Twilio
        caller = SimulatedCaller(base_url=self.base_url, script=script, **kwargs)
        if "twilio" in self.fakes:
            self.fakes["twilio"].attach(caller)
        return caller

    def telnyx_caller(self, script: list[Any], **kwargs: Any) -> SimulatedCaller:
        """A caller through Telnyx (needs "telnyx" in `carrier_apis`), known to its fake."""
        from livecall.sim.telnyx import TelnyxSimulatedCaller

        fake = self._fake_for("telnyx", "telnyx_caller")
        kwargs.setdefault("account_sid", TELNYX_ACCOUNT_SID)
        kwargs.setdefault("webhook_path", "/telnyx/texml")
        caller = TelnyxSimulatedCaller(
            self.base_url,
            private_key=self._telnyx_seed,
            script=script,
            **kwargs,
        )
        fake.attach(caller)
        return caller

    def plivo_caller(self, script: list[Any], **kwargs: Any) -> SimulatedEdge:
        """A caller through Plivo (needs "plivo" in `carrier_apis`), known to its fake."""
        from livecall.sim.plivo import PlivoSimulatedCaller

        fake = self._fake_for("plivo", "plivo_caller")
        kwargs.setdefault("auth_id", PLIVO_AUTH_ID)
        caller = PlivoSimulatedCaller(
            self.base_url, auth_token=PLIVO_AUTH_TOKEN, script=script, **kwargs
        )
        fake.attach(caller)
        return caller

    def vonage_caller(self, script: list[Any], **kwargs: Any) -> SimulatedEdge:
        """A caller through Vonage (needs "vonage" in `carrier_apis`), known to its fake; its
        answer webhook names the fake's region as the call's `region_url`. `base_url`: where
        its answer webhook goes, when not to this stack (another server on its database)."""
        from livecall.sim.vonage import SimulatedVonageCaller

        fake = self._fake_for("vonage", "vonage_caller")
        kwargs.setdefault("application_id", VONAGE_APPLICATION_ID)
        kwargs.setdefault("region_url", self._vonage_region)
        kwargs.setdefault("signature_secret", VONAGE_SIGNATURE_SECRET)
        base_url = kwargs.pop("base_url", self.base_url)
        caller = SimulatedVonageCaller(base_url, script=script, **kwargs)
        fake.attach(caller)
        return caller

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
