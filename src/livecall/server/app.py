"""The livecall web application: builds the shared `AppState` and mounts every route over it
(Twilio's and the other carriers' doors, the dashboard, the APIs, health and drain)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from pydantic import SecretStr

from livecall import __version__
from livecall.agent.gemini import SessionCounter, client_for
from livecall.agent.http_tools import HttpToolRunner
from livecall.agent.profiles import ProfileRegistry, ProfileSet
from livecall.cluster import ClusterRegistry, create_cluster
from livecall.log import register_secret
from livecall.metrics import Metrics, build_metrics_router
from livecall.outcomes.analysis import AnalysisWorker, sdk_generate
from livecall.outcomes.webhooks import WebhookService, link_key
from livecall.records import CallObserver
from livecall.server.api import build_api_router
from livecall.server.auth import ApiDisabled, HostPolicy
from livecall.server.carrier_route import CarrierRoute
from livecall.server.carrier_routes import build_carrier_router
from livecall.server.carrier_setup import configured_routes
from livecall.server.dashboard import DashboardDisabled, build_dashboard_router
from livecall.server.docs import build_openapi_router, docs_urls
from livecall.server.drain import Drain
from livecall.server.forwarded import TrustedProxies
from livecall.server.limits import EdgeLimits, EdgeMiddleware
from livecall.server.ops import build_live_api_router, build_ops_router
from livecall.server.outbound import build_amd_router, build_outbound_api_router
from livecall.server.registry import CallRegistry
from livecall.server.state import AppState
from livecall.server.twilio_routes import app_stream_secret, build_twilio_router
from livecall.server.webhook_routes import build_recording_link_router, build_webhook_api_router
from livecall.settings import Settings
from livecall.store.claims_db import SharedClaims
from livecall.store.recordings import LocalRecordingStore, run_retention
from livecall.store.writer import CallStore
from livecall.telephony.twilio import TwilioSignature
from livecall.telephony.twilio_rest import TwilioCallControl
from livecall.tracing import configure_tracing, shutdown_tracing

log = structlog.get_logger("livecall.server")


def create_app(
    settings: Settings,
    *,
    observer_factory: Callable[[str], CallObserver] | None = None,
    extra_carriers: Sequence[CarrierRoute] = (),
) -> FastAPI:
    """The app: Twilio's doors, the dashboard, the APIs, `/metrics`, health and drain.

    `extra_carriers` are served beside the configured ones through the same generic routes
    (a carrier built in code, e.g. a test's variant without marks or clear).
    """
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
    store = CallStore(settings, metrics=metrics)
    # single-use tokens and replay ids, shared by every worker and instance on the database
    claims = SharedClaims(store.repo.sessions, on_fallback=lambda: metrics.error("claims_fallback"))
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
        store=store,
        claims=claims,
        # one-shot documents: Redis when configured, else the database every worker shares
        stash=cluster if isinstance(cluster, ClusterRegistry) else claims,
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
                    run_retention(state.recordings, settings.retention_days, state.store.repo),
                    name="retention",
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
            # in this order: calls end, then what writes after them (analysis, webhooks: their
            # claims handed back), then the store. A step that fails is logged and the rest
            # still run: above all the store's close (records written or spooled, spool
            # files released for any instance to replay).
            for call in list(state.registry.active.values()):
                if call.bridge is not None:
                    call.bridge.end("shutdown")
            with _step("calls"):
                await state.registry.wait_idle(timeout=10)
            with _step("carrier clients"):
                await state.close_clients()  # the carriers' REST clients, once no call needs them
            with _step("cluster"):
                await cluster.stop()
            with _step("drain"):
                await drain.stop()
            for task in background:
                task.cancel()
            if background:  # they finish their last writes (claims handed back) first
                await asyncio.wait(background, timeout=5)
            with _step("http tools"):
                await state.http_tools.aclose()
            for kb in state.knowledge.values():
                with _step("knowledge"):
                    kb.close()
            if state.webhooks is not None:
                with _step("webhooks"):
                    await state.webhooks.stop()
            await state.store.close()
            if tracing_here:
                shutdown_tracing()

    app = FastAPI(title="livecall", version=__version__, lifespan=lifespan, **docs_urls(settings))
    app.state.livecall = state
    app.state.edge = edge  # `serving.uvicorn_config` notes the limits its server enforces itself
    app.add_middleware(EdgeMiddleware, limits=edge)

    app.include_router(build_ops_router(state))  # /health, /ready, /admin/drain
    app.include_router(build_twilio_router(state))
    routes = [*configured_routes(settings), *extra_carriers]
    app.include_router(build_carrier_router(state, routes))  # Telnyx, Plivo…
    app.include_router(build_amd_router(state))
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


@contextmanager
def _step(name: str) -> Iterator[None]:
    """One shutdown step: its failure is logged, and the steps after it still run."""
    try:
        yield
    except Exception as exc:
        log.error("shutdown.step_failed", step=name, error=repr(exc))


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
