"""The livecall web application: Twilio's webhook and stream socket, health, and the API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import FastAPI

from livecall import __version__
from livecall.agent.gemini import LiveOptions, SessionCounter
from livecall.agent.http_tools import HttpToolRunner
from livecall.agent.knowledge import KnowledgeBase
from livecall.agent.profiles import AgentProfile, ProfileRegistry
from livecall.agent.tools import function_declarations
from livecall.assets import apology_ulaw
from livecall.audio.recording import StereoRecorder
from livecall.call.bridge import CallOptions
from livecall.cluster import LiveCalls, LocalRegistry, create_cluster
from livecall.live_feed import FanOut, LiveFeed
from livecall.log import register_secret
from livecall.metrics import Metrics, build_metrics_router
from livecall.records import CallObserver
from livecall.server.api import ApiDisabled, build_api_router
from livecall.server.ops import build_live_api_router, build_ops_router
from livecall.server.outbound import build_amd_router, build_outbound_api_router
from livecall.server.registry import CallRegistry
from livecall.server.twilio_routes import build_twilio_router
from livecall.settings import Settings
from livecall.store.recordings import LocalRecordingStore, RecordingStore, run_retention
from livecall.store.writer import CallStore
from livecall.telephony.twilio import TwilioSignature
from livecall.telephony.twilio_rest import TwilioCallControl
from livecall.tracing import configure_tracing, shutdown_tracing, traced

log = structlog.get_logger("livecall.server")


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
    extras: dict[str, Any] = field(default_factory=dict)
    # agents: who answers, what they may do (see `call_setup`)
    profiles: ProfileRegistry | None = None
    call_control: TwilioCallControl | None = None  # None: no Twilio REST credentials
    http_tools: HttpToolRunner = field(default_factory=HttpToolRunner)
    knowledge: dict[str, KnowledgeBase] = field(default_factory=dict)
    # operations: Prometheus metrics, the live calls of every instance, a drain in progress
    metrics: Metrics = field(default_factory=Metrics)
    cluster: LiveCalls = field(default_factory=LocalRegistry)
    drain_task: asyncio.Task[None] | None = None

    def knowledge_for(self, profile: AgentProfile) -> KnowledgeBase | None:
        """One index per documents folder, shared by every call (and profile) that uses it."""
        if profile.knowledge_dir is None:
            return None
        key = str(profile.knowledge_dir.resolve())
        kb = self.knowledge.get(key)
        if kb is None:
            kb = self.knowledge[key] = KnowledgeBase(profile.knowledge_dir)
        return kb

    def non_blocking_tools(self) -> bool:
        """NON_BLOCKING tool declarations and response `scheduling`, on both APIs.

        Vertex AI takes both like the Developer API (the SDK sends `behavior` to either),
        and 3.8 models treat tools as non-blocking anyway: without `scheduling` the server
        applies WHEN_IDLE and the model speaks again after `end_call`/`transfer_call`.
        """
        configured = self.settings.gemini_non_blocking_tools
        return True if configured is None else configured

    def match_profile(self, params: dict[str, str]) -> AgentProfile:
        """The profile for a call: its `profile` parameter, else our number, else the default.

        Our number is the called one (`to`) on inbound calls, the caller ID (`from`) on
        outbound ones, where `to` is the person being called.
        """
        if self.profiles is None:
            self.profiles = ProfileRegistry(None, self.settings)
        outbound = params.get("direction", "inbound").startswith("outbound")
        ours = params.get("from") if outbound else params.get("to")
        return self.profiles.current.match(ours or None, params.get("profile") or None)

    def observer_for(self, call_sid: str) -> CallObserver:
        """Where a call's records go: the store, the live feed, metrics and (when on) traces."""
        observers: list[CallObserver] = [
            self.store.observer(call_sid),
            self.feed.observer(call_sid),
        ]
        if self.observer_factory is not None:
            observers.append(self.observer_factory(call_sid))
        return traced(self.metrics.observer(FanOut(*observers)))

    async def on_control(self, call_sid: str, action: str, args: dict[str, Any]) -> bool:
        """A control request for a call this process holds, from the API of any instance."""
        call = self.registry.active.get(call_sid)
        if call is None or call.bridge is None:
            return False
        if action == "end":
            reason = str(args.get("reason") or "operator")[:64]
            log.info("call.ended_by_request", call_sid=call_sid, reason=reason)
            call.bridge.end(reason)
            return True
        if action == "transfer":
            actions = call.info.get("actions")
            target = str(args.get("target") or "")
            number = actions.profile.transfer_targets.get(target) if actions else None
            if actions is None or actions.control is None or number is None:
                log.info("call.transfer_refused", call_sid=call_sid, target=target[:64])
                return False
            # BridgeActions.transfer first lets the caller hear the agent out (seconds):
            # it runs beside the call, and the request is answered now.
            actions.spawn(actions.transfer(target, number), "transfer")
            return True
        return False

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
        """The per-call options for a stream's `<Parameter>`s, from the matched profile.

        The profile itself rides along in ``options.extra["agent_profile"]`` for the tools.
        An outbound call with answering-machine detection (``amd`` parameter) greets only
        once Twilio says a person answered, so a voicemail greeting is not talked over.
        """
        s = self.settings
        profile = self.match_profile(params)
        amd = params.get("amd") == "1"
        options = CallOptions(
            greeting=None if amd else profile.greeting,
            max_duration_s=profile.max_call_duration_s,
            connect_timeout_s=s.gemini_connect_timeout_s,
            direction=params.get("direction", "inbound").split("-")[0] or "inbound",
            profile=profile.name,
            from_number=params.get("from") or None,
            to_number=params.get("to") or None,
            recording_sink=self.save_recording if profile.recording else None,
            apology_ulaw=apology_ulaw(),
            reconnect_attempts=s.gemini_reconnect_attempts,
            stall_timeout_s=s.gemini_stall_timeout_s,
            rotation_overlap=s.gemini_rotation_overlap,
            metrics=self.metrics,
            non_blocking_tools=self.non_blocking_tools(),
        )
        options.extra["agent_profile"] = profile
        if amd:
            options.extra["deferred_greeting"] = profile.greeting
        vad = profile.vad
        live = LiveOptions(
            model=profile.model,
            system_prompt=profile.system_prompt,
            voice=profile.voice,
            language=profile.language,
            function_declarations=function_declarations(
                profile, non_blocking=self.non_blocking_tools()
            ),
            vad_start_sensitivity=vad.start_sensitivity,
            vad_end_sensitivity=vad.end_sensitivity,
            vad_prefix_padding_ms=vad.prefix_padding_ms,
            vad_silence_duration_ms=vad.silence_duration_ms,
        )
        return options, live


def create_app(
    settings: Settings,
    *,
    observer_factory: Callable[[str], CallObserver] | None = None,
) -> FastAPI:
    """The app: Twilio's doors, the dashboard, the APIs, `/metrics`, health and drain."""
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    for secret in (settings.gemini_api_key, settings.twilio_auth_token, settings.api_token):
        if secret is not None:
            register_secret(secret.get_secret_value())  # whoever configured logging
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    if redis_url:
        register_secret(redis_url)
    cluster = create_cluster(
        redis_url,
        settings.instance_id,
        ttl_s=settings.cluster_ttl_s,
        heartbeat_s=settings.cluster_heartbeat_s,
        prefix=settings.cluster_prefix,
        instance_info={"version": __version__, "max_calls": settings.max_concurrent_calls},
    )
    state = AppState(
        settings=settings,
        registry=CallRegistry(
            settings.max_concurrent_calls,
            gemini_sessions=SessionCounter(settings.max_gemini_sessions),
        ),
        signature=TwilioSignature(token) if token else None,
        store=CallStore(settings),
        recordings=LocalRecordingStore(settings.recordings_dir),
        observer_factory=observer_factory,
        # a broken profiles file stops the server here, with every problem listed
        profiles=ProfileRegistry(
            settings.profiles_file, settings, poll_interval_s=settings.profiles_reload_interval_s
        ),
        call_control=_call_control(settings),
        cluster=cluster,
    )
    cluster.on_control = state.on_control

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.signature is None:
            log.warning(
                "twilio.signatures_off",
                hint="TWILIO_AUTH_TOKEN is not set: webhook and stream requests are not verified",
            )
        # tracing: only when the environment asks for it; whoever configured it shuts it down
        tracing_here = configure_tracing("livecall", instance_id=cluster.instance_id)
        await state.store.start()
        await cluster.start()  # never fails for an unreachable Redis: calls go on without it
        background: list[asyncio.Task[Any]] = []
        if settings.retention_days:
            background.append(
                asyncio.create_task(
                    run_retention(state.recordings, settings.retention_days, state.store.repo)
                )
            )
        # agents: profiles reloaded on edit; shared HTTP client and document indexes
        if state.profiles is not None:
            background.append(asyncio.create_task(state.profiles.run(), name="profiles"))
        try:
            yield
        finally:
            for call in list(state.registry.active.values()):
                if call.bridge is not None:
                    call.bridge.end("shutdown")
            await state.registry.wait_idle(timeout=10)
            await cluster.stop()
            if state.drain_task is not None and not state.drain_task.done():
                state.drain_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await state.drain_task
            for task in background:
                task.cancel()
            await state.http_tools.aclose()
            for kb in state.knowledge.values():
                kb.close()
            await state.store.close()
            if tracing_here:
                shutdown_tracing()

    app = FastAPI(title="livecall", version=__version__, lifespan=lifespan)
    app.state.livecall = state

    app.include_router(build_ops_router(state))  # /health, /ready, /admin/drain
    app.include_router(build_twilio_router(state))
    app.include_router(build_amd_router(state))
    from livecall.server.dashboard import DashboardDisabled, build_dashboard_router

    app.include_router(build_metrics_router(state.metrics))
    try:
        app.include_router(
            build_dashboard_router(state, state.store, state.recordings, state.feed, settings)
        )
    except DashboardDisabled as exc:
        log.warning("dashboard.disabled", reason=str(exc))
    try:
        app.include_router(build_api_router(state.store, state.recordings, settings))
        app.include_router(build_outbound_api_router(state))
        app.include_router(build_live_api_router(state))
    except ApiDisabled as exc:
        log.warning("api.disabled", reason=str(exc))
    return app


def app_from_env() -> FastAPI:
    """The app from the environment, logging configured: for `uvicorn --factory` and
    gunicorn workers (`livecall serve` is the one-process way, with its SIGTERM drain)."""
    from livecall.log import configure_logging

    settings = Settings()
    secrets = [
        s.get_secret_value()
        for s in (settings.gemini_api_key, settings.twilio_auth_token, settings.api_token)
        if s is not None
    ]
    configure_logging(settings.log_level, settings.log_format, secrets)
    return create_app(settings)


def _call_control(settings: Settings) -> TwilioCallControl | None:
    """REST call control (hang up, transfer, outbound) when the account is configured."""
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else ""
    if not settings.twilio_account_sid or not token:
        return None
    return TwilioCallControl(
        settings.twilio_account_sid, token, settings.twilio_api_base_url or None
    )
