"""The livecall web application: Twilio's webhook and stream socket, health, and the API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import FastAPI

from livecall import __version__
from livecall.agent.gemini import LiveOptions, live_options
from livecall.audio.recording import StereoRecorder
from livecall.call.bridge import CallOptions
from livecall.live_feed import FanOut, LiveFeed
from livecall.records import CallObserver
from livecall.server.api import ApiDisabled, build_api_router
from livecall.server.registry import CallRegistry
from livecall.server.twilio_routes import build_twilio_router
from livecall.settings import Settings
from livecall.store.recordings import LocalRecordingStore, RecordingStore, run_retention
from livecall.store.writer import CallStore
from livecall.telephony.twilio import TwilioSignature

log = structlog.get_logger("livecall.server")

DEFAULT_BUSY_MESSAGE = (
    "Sorry, all our lines are busy right now. Please call again in a few minutes."
)


@dataclass
class AppState:
    """What the routes share: settings, the live calls, and how a call is set up."""

    settings: Settings
    registry: CallRegistry
    signature: TwilioSignature | None
    store: CallStore
    recordings: RecordingStore
    feed: LiveFeed = field(default_factory=LiveFeed)
    observer_factory: Callable[[str], CallObserver] | None = None
    busy_message: str = DEFAULT_BUSY_MESSAGE
    busy_reject: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def observer_for(self, call_sid: str) -> CallObserver:
        observers: list[CallObserver] = [
            self.store.observer(call_sid),
            self.feed.observer(call_sid),
        ]
        if self.observer_factory is not None:
            observers.append(self.observer_factory(call_sid))
        return FanOut(*observers)

    async def save_recording(self, call_sid: str, recorder: StereoRecorder, end_ms: float) -> str:
        """Writes the call's stereo recording and hands it to the recording store."""
        fmt = self.settings.recording_format
        if isinstance(self.recordings, LocalRecordingStore):
            target = self.recordings.path_for(call_sid, fmt)
        else:
            target = self.settings.spool_dir / f"{call_sid}.{fmt}"
        path = await recorder.finish_async(target, fmt, end_ms=end_ms)
        return await self.recordings.put(call_sid, path)

    def call_setup(self, params: dict[str, str]) -> tuple[CallOptions, LiveOptions]:
        """The per-call options for a stream's `<Parameter>`s."""
        s = self.settings
        options = CallOptions(
            greeting=s.greeting,
            max_duration_s=s.max_call_duration_s,
            connect_timeout_s=s.gemini_connect_timeout_s,
            direction=params.get("direction", "inbound").split("-")[0] or "inbound",
            profile=params.get("profile") or None,
            from_number=params.get("from") or None,
            to_number=params.get("to") or None,
            recording_sink=self.save_recording if s.recording_enabled else None,
        )
        return options, live_options(s)


def create_app(
    settings: Settings,
    *,
    observer_factory: Callable[[str], CallObserver] | None = None,
) -> FastAPI:
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    state = AppState(
        settings=settings,
        registry=CallRegistry(settings.max_concurrent_calls),
        signature=TwilioSignature(token) if token else None,
        store=CallStore(settings),
        recordings=LocalRecordingStore(settings.recordings_dir),
        observer_factory=observer_factory,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.signature is None:
            log.warning(
                "twilio.signatures_off",
                hint="TWILIO_AUTH_TOKEN is not set: webhook and stream requests are not verified",
            )
        await state.store.start()
        background: list[asyncio.Task[Any]] = []
        if settings.retention_days:
            background.append(
                asyncio.create_task(
                    run_retention(state.recordings, settings.retention_days, state.store.repo)
                )
            )
        try:
            yield
        finally:
            for call in list(state.registry.active.values()):
                if call.bridge is not None:
                    call.bridge.end("shutdown")
            await state.registry.wait_idle(timeout=10)
            for task in background:
                task.cancel()
            await state.store.close()

    app = FastAPI(title="livecall", version=__version__, lifespan=lifespan)
    app.state.livecall = state

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, Any]:
        return {
            "status": "draining" if state.registry.draining else "ok",
            "version": __version__,
            "active_calls": len(state.registry.active),
        }

    app.include_router(build_twilio_router(state))
    try:
        app.include_router(build_api_router(state.store, state.recordings, settings))
    except ApiDisabled as exc:
        log.warning("api.disabled", reason=str(exc))
    return app
