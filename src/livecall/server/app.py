"""The livecall web application: Twilio's webhook and stream socket, health, and the API."""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import FastAPI
from pydantic import SecretStr

from livecall import __version__
from livecall.agent.gemini import LiveOptions, SessionCounter, client_for
from livecall.agent.http_tools import HttpToolRunner
from livecall.agent.knowledge import KnowledgeBase
from livecall.agent.knowledge_sources import (
    FallbackSource,
    LocalSource,
    VertexSearch,
    VertexSearchTarget,
)
from livecall.agent.profiles import AgentProfile, ProfileRegistry, ProfileSet
from livecall.agent.tools import function_declarations
from livecall.assets import apology_ulaw
from livecall.audio.recording import StereoRecorder
from livecall.call.bridge import CallOptions
from livecall.cluster import ClusterRegistry, LiveCalls, LocalRegistry, create_cluster
from livecall.live_feed import FanOut, LiveFeed
from livecall.log import register_secret
from livecall.metrics import Metrics, build_metrics_router
from livecall.outcomes import memory
from livecall.outcomes.analysis import AnalysisWorker, EndNotifier, sdk_generate
from livecall.outcomes.webhooks import (
    WebhookService,
    build_recording_link_router,
    build_webhook_api_router,
    link_key,
)
from livecall.records import CallObserver
from livecall.server.access import HostPolicy
from livecall.server.api import ApiDisabled, build_api_router
from livecall.server.carrier_routes import build_carrier_router, carrier_routes
from livecall.server.docs import build_openapi_router, docs_urls
from livecall.server.drain import Drain
from livecall.server.forwarded import TrustedProxies
from livecall.server.limits import EdgeLimits, EdgeMiddleware
from livecall.server.ops import build_live_api_router, build_ops_router
from livecall.server.outbound import build_amd_router, build_outbound_api_router
from livecall.server.registry import CallRegistry
from livecall.server.twilio_routes import app_stream_secret, build_twilio_router
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
    # answering-machine verdicts that came before their call's stream, oldest first
    answered_by: OrderedDict[str, str] = field(default_factory=OrderedDict)
    # agents: who answers, what they may do (see `call_setup`)
    profiles: ProfileRegistry | None = None
    call_control: TwilioCallControl | None = None  # None: no Twilio REST credentials
    http_tools: HttpToolRunner = field(default_factory=HttpToolRunner)
    knowledge: dict[str, KnowledgeBase] = field(default_factory=dict)
    knowledge_sources: dict[tuple[Any, Any], FallbackSource] = field(default_factory=dict)
    # operations: Prometheus metrics, the live calls of every instance, a drain in progress
    metrics: Metrics = field(default_factory=Metrics)
    cluster: LiveCalls = field(default_factory=LocalRegistry)
    webhooks: WebhookService | None = None  # end-of-call webhooks (livecall.outcomes)
    drain: Drain | None = None  # set by create_app: SIGTERM and /admin/drain share it
    # key material of the per-call stream tokens (Twilio streams, the softphone)
    stream_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    # after the call: post-call analysis (and the caller memory built from it)
    analysis: AnalysisWorker | None = None

    def knowledge_for(self, profile: AgentProfile) -> FallbackSource | None:
        """What the profile's `lookup` searches, shared by every call that searches the same.

        One local index per documents folder; one Vertex AI Search client (and its failure
        breaker) per search target, with the local index as its fallback when configured.
        """
        config = profile.knowledge
        local: LocalSource | None = None
        if profile.knowledge_dir is not None:
            folder = str(profile.knowledge_dir.resolve())
            kb = self.knowledge.get(folder)
            if kb is None:
                kb = self.knowledge[folder] = KnowledgeBase(profile.knowledge_dir)
            local = LocalSource(kb)
        if config.backend == "local" or config.vertex_search is None:
            return FallbackSource(local) if local is not None else None
        key = (config, str(local.index.folder) if local is not None else None)
        source = self.knowledge_sources.get(key)
        if source is None:
            v = config.vertex_search
            target = VertexSearchTarget(
                project=v.project,
                location=v.location,
                data_store=v.data_store,
                engine=v.engine,
                serving_config=v.serving_config,
                collection=v.collection,
                endpoint=v.endpoint,
            )
            fallback = local if config.fallback == "local" else None
            source = FallbackSource(VertexSearch(target, timeout_s=config.timeout_s), fallback)
            self.knowledge_sources[key] = source
        return source

    def non_blocking_tools(self) -> bool:
        """NON_BLOCKING tool declarations and response `scheduling`, on both APIs.

        Vertex AI takes both like the Developer API (the SDK sends `behavior` to either),
        and 3.8 models treat tools as non-blocking anyway: without `scheduling` the server
        applies WHEN_IDLE and the model speaks again after `end_call`/`transfer_call`.
        """
        configured = self.settings.gemini_non_blocking_tools
        return True if configured is None else configured

    def match_profile(self, params: Mapping[str, str]) -> AgentProfile:
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
        if self.webhooks is not None:  # after the store's writer: its op follows the call's end
            observers.append(self.webhooks.observer(call_sid))
        if self.analysis is not None:
            observers.append(EndNotifier(self.analysis))
        return traced(self.metrics.observer(FanOut(*observers)))

    async def call_is_live(self, call_sid: str) -> bool:
        """A call in progress here or (Redis reachable) on another instance."""
        return call_sid in self.registry.active or await self.cluster.locate(call_sid) is not None

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
            actions = call.bridge.options.context.actions
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

    async def caller_memory(self, profile: AgentProfile, options: CallOptions) -> str:
        """What the agent remembers of this caller (profile memory on), for its instruction.

        Time-boxed by MEMORY_TIMEOUT: a slow or dead database costs the call at most that,
        then it starts without. Never for anonymous, withheld or non-E.164 numbers.
        """
        raw = memory.remote_number(options.direction, options.from_number, options.to_number)
        number = memory.normalize_number(raw)
        if not profile.memory.enabled or number is None:
            return ""
        try:
            async with asyncio.timeout(self.settings.memory_timeout_s):
                entries = await memory.recall(
                    self.store.repo.sessions,
                    number,
                    profile.name,
                    max_calls=profile.memory.max_calls,
                    max_age_days=profile.memory.max_age_days,
                    retention_days=self.settings.retention_days,
                )
        except TimeoutError:
            log.warning("memory.timeout", timeout_s=self.settings.memory_timeout_s)
            return ""
        except Exception as exc:
            log.warning("memory.unavailable", error=type(exc).__name__)
            return ""
        if entries:
            log.info("memory.recalled", calls=len(entries), profile=profile.name)
        return memory.memory_instruction(entries)

    async def call_setup(self, params: Mapping[str, str]) -> tuple[CallOptions, LiveOptions]:
        """The per-call options for a stream's `<Parameter>`s, from the matched profile.

        The profile itself rides along in ``options.context.agent_profile`` for the tools.
        An outbound call with answering-machine detection (``amd`` parameter) greets only
        once Twilio says a person answered, so a voicemail greeting is not talked over.
        A returning caller's memory (when the profile keeps one) joins the system prompt.
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
        options.context.agent_profile = profile
        options.context.log_dtmf = s.log_dtmf
        options.context.log_transcripts = s.log_transcripts
        if amd:
            options.context.deferred_greeting = profile.greeting
        vad = profile.vad
        remembered = await self.caller_memory(profile, options)
        live = LiveOptions(
            model=profile.model,
            system_prompt=(
                f"{profile.system_prompt}\n\n{remembered}" if remembered else profile.system_prompt
            ),
            voice=profile.voice,
            language=profile.language,
            function_declarations=function_declarations(
                profile, non_blocking=self.non_blocking_tools()
            ),
            vad_start_sensitivity=vad.start_sensitivity,
            vad_end_sensitivity=vad.end_sensitivity,
            vad_prefix_padding_ms=vad.prefix_padding_ms,
            vad_silence_duration_ms=vad.silence_duration_ms,
            google_search=profile.google_search,
        )
        return options, live


def create_app(
    settings: Settings,
    *,
    observer_factory: Callable[[str], CallObserver] | None = None,
) -> FastAPI:
    """The app: Twilio's doors, the dashboard, the APIs, `/metrics`, health and drain."""
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    for secret in settings.secret_values():
        register_secret(secret)  # whoever configured logging
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    cluster = create_cluster(
        redis_url,
        settings.instance_id,
        ttl_s=settings.cluster_ttl_s,
        heartbeat_s=settings.cluster_heartbeat_s,
        prefix=settings.cluster_prefix,
        instance_info={"version": __version__, "max_calls": settings.max_concurrent_calls},
    )
    metrics = Metrics()
    state = AppState(
        settings=settings,
        metrics=metrics,
        registry=CallRegistry(
            settings.max_concurrent_calls,
            gemini_sessions=SessionCounter(settings.max_gemini_sessions),
        ),
        signature=TwilioSignature(token, _secret(settings.twilio_webhook_shared_key))
        if token
        else None,
        stream_secret=app_stream_secret(settings),
        store=CallStore(settings, metrics=metrics),
        recordings=LocalRecordingStore(settings.recordings_dir),
        observer_factory=observer_factory,
        # a broken profiles file stops the server here, with every problem listed
        profiles=ProfileRegistry(
            settings.profiles_file, settings, poll_interval_s=settings.profiles_reload_interval_s
        ),
        call_control=_call_control(settings),
        cluster=cluster,
        http_tools=HttpToolRunner(
            signing_secret=settings.http_tools_secret.get_secret_value()
            if settings.http_tools_secret
            else None
        ),
    )
    cluster.on_control = state.on_control
    if isinstance(cluster, ClusterRegistry):  # every instance's live page shows every call
        state.feed.relay = cluster.publish_live
        cluster.on_live = state.feed.receive
    state.analysis = AnalysisWorker(
        state.store.repo.sessions,
        settings,
        lambda: state.profiles.current if state.profiles is not None else _no_profiles(settings),
        sdk_generate(lambda: client_for(settings)),
        written=state.store.drained,
    )
    state.webhooks = WebhookService(
        settings,
        state.store,
        profile_lookup=lambda name: (
            state.profiles.current.get(name) if name and state.profiles is not None else None
        ),
        metrics=state.metrics,
    )
    # a call's webhook waits for its analysis, and goes out with it once it is final (done,
    # failed or skipped: the payload's `analysis.status` says which)
    webhooks = state.webhooks
    state.analysis.on_settled.append(webhooks.analysis_settled)
    drain = state.drain = Drain(state.registry, settings.drain_timeout_s)
    trusted = TrustedProxies(settings.trusted_proxies)
    edge = EdgeLimits(
        hosts=HostPolicy(
            settings.public_url,
            settings.allowed_hosts,
            trusted,
            str(settings.admin_socket) if settings.admin_socket else None,
        ),
        trusted=trusted,
        max_body_bytes=settings.max_body_bytes,
        request_timeout_s=settings.request_timeout_s,
        ws_max_size=settings.ws_max_size,
        max_pending_per_client=settings.max_pending_per_client,
        on_refused=state.metrics.error,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.signature is None:
            log.warning(
                "twilio.signatures_off",
                hint="TWILIO_AUTH_TOKEN is not set: Twilio's webhooks and streams are "
                + (
                    "NOT verified (LIVECALL_INSECURE_DEV)"
                    if settings.insecure_dev
                    else "refused until it is set"
                ),
            )
        if not edge.hosts.active:
            log.warning(
                "edge.host_check_off",
                hint="set PUBLIC_URL or ALLOWED_HOSTS: requests for any Host are served",
            )
        # tracing: only when the environment asks for it; whoever configured it shuts it down
        tracing_here = configure_tracing("livecall", instance_id=cluster.instance_id)
        await state.store.start()
        if state.webhooks is not None:
            await state.webhooks.start()
        if settings.has_gemini_credentials():
            # the SDK client (TLS contexts, HTTP clients) made now, not by the first call
            try:
                client_for(settings)
            except Exception as exc:  # the first call reports it, as before
                log.warning("gemini.client_not_ready", error=type(exc).__name__)
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
        if state.analysis is not None:  # post-call work: beside the calls, never on their path
            background.append(asyncio.create_task(state.analysis.run(), name="analysis"))
        try:
            yield
        finally:
            for call in list(state.registry.active.values()):
                if call.bridge is not None:
                    call.bridge.end("shutdown")
            await state.registry.wait_idle(timeout=10)
            await cluster.stop()
            await drain.stop()
            for task in background:
                task.cancel()
            await state.http_tools.aclose()
            for kb in state.knowledge.values():
                kb.close()
            if state.webhooks is not None:
                await state.webhooks.stop()
            await state.store.close()
            if tracing_here:
                shutdown_tracing()

    app = FastAPI(title="livecall", version=__version__, lifespan=lifespan, **docs_urls(settings))
    app.state.livecall = state
    app.state.edge = edge  # `cli.uvicorn_config` notes the limits its server enforces itself
    app.add_middleware(EdgeMiddleware, limits=edge)

    app.include_router(build_ops_router(state))  # /health, /ready, /admin/drain
    app.include_router(build_twilio_router(state))
    app.include_router(build_carrier_router(state, carrier_routes(settings)))  # Telnyx, Plivo…
    app.include_router(build_amd_router(state))
    from livecall.server.dashboard import DashboardDisabled, build_dashboard_router

    metrics_token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    app.include_router(build_metrics_router(state.metrics, bearer_token=metrics_token or None))
    app.include_router(build_outbound_api_router(state))  # its own token: LIVECALL_CALLS_TOKEN
    recording_key = link_key(settings)
    if recording_key is not None:  # the expiring recording links webhooks carry
        app.include_router(build_recording_link_router(state.recordings, recording_key))
    try:
        app.include_router(
            build_dashboard_router(state, state.store, state.recordings, state.feed, settings)
        )
    except DashboardDisabled as exc:
        log.warning("dashboard.disabled", reason=str(exc))
    try:
        app.include_router(
            build_api_router(state.store, state.recordings, settings, is_live=state.call_is_live)
        )
        app.include_router(build_live_api_router(state))
        app.include_router(build_openapi_router(app, settings))
        app.include_router(build_webhook_api_router(state.webhooks, settings))
    except ApiDisabled as exc:
        log.warning("api.disabled", reason=str(exc))
    return app


def app_from_env() -> FastAPI:
    """The app from the environment, logging configured: for `uvicorn --factory` and
    gunicorn workers (`livecall serve` is the one-process way, with its SIGTERM drain)."""
    from livecall.log import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    return create_app(settings)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() or None if value is not None else None


def _no_profiles(settings: Settings) -> ProfileSet:
    return ProfileSet.default_from_settings(settings)


def _call_control(settings: Settings) -> TwilioCallControl | None:
    """REST call control (hang up, transfer, outbound) when the account is configured."""
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else ""
    if not settings.twilio_account_sid or not token:
        return None
    return TwilioCallControl(
        settings.twilio_account_sid, token, settings.twilio_api_base_url or None
    )
