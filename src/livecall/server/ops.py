"""Operating livecall: health and readiness, the drain a platform asks for, and live calls.

- `GET /health` (liveness) answers 200 as long as the process serves requests, draining or
  not: a liveness probe must never restart a process whose calls are still finishing.
- `GET /ready` (readiness) answers 503 while draining, so no new calls are routed here.
- `POST /admin/drain` stops taking calls and lets the live ones finish
  (`livecall.server.drain`); `DELETE /admin/drain` cancels it (calls admitted again, `/ready`
  back to 200). Either needs `Authorization: Bearer $ADMIN_TOKEN`, or arrives over the
  `ADMIN_SOCKET` Unix socket; never from a browser (a request with an `Origin` is refused).
  Being on loopback is not enough: a sidecar, a local proxy or a DNS-rebinding web page is
  on loopback too.
- `GET /api/live` lists the calls in progress on every instance (`livecall.cluster`), and
  `POST /api/live/{sid}/end` / `.../transfer` reach a call whichever instance holds it.
  They share the call records API's bearer auth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import structlog
from fastapi import APIRouter, Body, Depends, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from livecall import __version__
from livecall.server.api import Sid
from livecall.server.auth import admin_auth, bearer_auth
from livecall.server.drain import Drain

if TYPE_CHECKING:
    from livecall.server.state import AppState

__all__ = ["build_live_api_router", "build_ops_router"]

log = structlog.get_logger("livecall.ops")

#: `end_reason` recorded for a call ended through `POST /api/live/{sid}/end`.
API_END_REASON = "api"


class LiveCallOut(BaseModel):
    """A call in progress, on whichever instance holds it."""

    model_config = ConfigDict(extra="allow")

    call_sid: str
    instance: str | None = Field(description="the instance (process) carrying the call")
    announced_at: str | None = Field(description="when that instance registered the call")
    direction: str | None = None
    profile: str | None = None
    started_at: str | None = None


class LiveCallsOut(BaseModel):
    instance: str = Field(description="the instance that answered this request")
    cluster: bool = Field(description="calls of every instance (Redis reachable), or only ours")
    calls: list[LiveCallOut]


class ControlOut(BaseModel):
    call_sid: str
    action: str
    accepted: bool


class TransferIn(BaseModel):
    target: str = Field(
        min_length=1, max_length=64, description="a transfer target of the call's agent profile"
    )


def cluster_health(state: AppState) -> dict[str, Any]:
    cluster = state.cluster
    if state.settings.redis_url is None:
        redis = "off"
    else:
        redis = "ok" if cluster.connected else "unavailable"
    return {"instance": cluster.instance_id, "redis": redis}


def build_ops_router(state: AppState) -> APIRouter:
    """`/health`, `/ready` and `/admin/drain`: always mounted, whatever the API settings."""
    router = APIRouter(tags=["ops"])
    registry = state.registry

    def status() -> dict[str, Any]:
        return {
            "status": "draining" if registry.draining else "ok",
            "version": __version__,
            "active_calls": len(registry.active),
            "cluster": cluster_health(state),
        }

    @router.get("/health")
    async def health() -> JSONResponse:
        """Liveness: 200 while the process answers, draining included."""
        return JSONResponse(status())

    @router.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 503 while draining, or while new calls' records could not be kept
        (schema not ready, spool full with the database away), so calls go elsewhere."""
        unrecordable = state.store.can_record()
        body = {**status(), "records": unrecordable or "ok"}
        return JSONResponse(body, status_code=503 if registry.draining or unrecordable else 200)

    if state.drain is None:
        state.drain = Drain(registry, state.settings.drain_timeout_s)
    drain = state.drain
    admin = admin_auth(state.settings)

    @router.post("/admin/drain", include_in_schema=False, dependencies=[Depends(admin)])
    async def admin_drain() -> JSONResponse:
        """Stop taking calls and let live ones finish (idempotent)."""
        if not drain.active:
            log.info("admin.drain", active_calls=len(registry.active))
        drain.start("admin")
        return JSONResponse(status(), status_code=202)

    @router.delete("/admin/drain", include_in_schema=False, dependencies=[Depends(admin)])
    async def admin_drain_cancel() -> JSONResponse:
        """Cancel an operator's drain: calls are admitted again (not a SIGTERM's drain)."""
        if not await drain.cancel():
            raise HTTPException(409, "the process is shutting down (SIGTERM): not cancelled")
        log.info("admin.drain_cancelled", active_calls=len(registry.active))
        return JSONResponse(status())

    return router


def build_live_api_router(state: AppState) -> APIRouter:
    """`/api/live…`: raises `ApiDisabled` like the records API when no auth is configured."""
    authorize = bearer_auth(state.settings)
    router = APIRouter(prefix="/api/live", tags=["live calls"], dependencies=[Depends(authorize)])
    cluster = state.cluster

    @router.get("", response_model=LiveCallsOut)
    async def live_calls() -> LiveCallsOut:
        """Calls in progress on every instance (only this one's while Redis is unreachable)."""
        calls = await cluster.list_calls()
        return LiveCallsOut(
            instance=cluster.instance_id,
            cluster=state.settings.redis_url is not None and cluster.connected,
            calls=[LiveCallOut.model_validate(c) for c in calls],
        )

    @router.post(
        "/{sid}/end",
        status_code=202,
        response_model=ControlOut,
        responses={404: {"description": "no instance holds this call"}},
    )
    async def end_call(sid: Sid) -> ControlOut:
        """Ends the call on whichever instance holds it (recorded as `end_reason=api`)."""
        if not await cluster.request(sid, "end", reason=API_END_REASON):
            raise HTTPException(404, "no call in progress with this SID")
        log.info("api.end_call", call_sid=sid)
        return ControlOut(call_sid=sid, action="end", accepted=True)

    @router.post(
        "/{sid}/transfer",
        status_code=202,
        response_model=ControlOut,
        responses={
            404: {"description": "no instance holds this call"},
            409: {"description": "the holder could not transfer it (unknown target, no REST)"},
        },
    )
    async def transfer_call(sid: Sid, body: Annotated[TransferIn, Body()]) -> ControlOut:
        """Transfers the call to one of its profile's `transfer_targets`, once the caller
        has heard what the agent is saying (the transfer itself runs in the background)."""
        if await cluster.locate(sid) is None:
            raise HTTPException(404, "no call in progress with this SID")
        if not await cluster.request(sid, "transfer", target=body.target):
            raise HTTPException(
                409,
                "the call could not be transferred (unknown target, no Twilio REST "
                "credentials, or it ended)",
            )
        log.info("api.transfer_call", call_sid=sid, target=body.target)
        return ControlOut(call_sid=sid, action="transfer", accepted=True)

    return router
