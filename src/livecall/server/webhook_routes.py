"""The routes of end-of-call webhooks: a call's deliveries and a manual retry under `/api`
(the API's bearer auth), and the expiring recording links the webhooks carry (signed, no
other credential). The service itself is `livecall.outcomes.webhooks`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError

from livecall.outcomes.webhook_payload import verify_link
from livecall.outcomes.webhooks import DeliveryOut, WebhookService
from livecall.server.api import Sid
from livecall.server.auth import bearer_auth
from livecall.settings import Settings
from livecall.store.recordings import RecordingStore

__all__ = ["RetryOut", "build_recording_link_router", "build_webhook_api_router"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class RetryOut(BaseModel):
    call_sid: str
    queued: int
    deliveries: list[DeliveryOut]


def build_webhook_api_router(service: WebhookService, settings: Settings) -> APIRouter:
    """``GET /api/calls/{sid}/webhooks`` and ``POST /api/calls/{sid}/webhook/retry``
    (bearer auth like the rest of /api; raises `ApiDisabled` the same way)."""
    router = APIRouter(
        prefix="/api", tags=["webhooks"], dependencies=[Depends(bearer_auth(settings))]
    )

    @router.get(
        "/calls/{sid}/webhooks",
        response_model=list[DeliveryOut],
        summary="A call's webhook deliveries",
    )
    async def deliveries(sid: Sid) -> list[DeliveryOut]:
        try:
            rows = await service.outbox.for_call(sid)
        except (SQLAlchemyError, OSError) as error:
            raise HTTPException(503, "call records database unavailable") from error
        return [DeliveryOut.of(r) for r in rows]

    @router.post(
        "/calls/{sid}/webhook/retry",
        status_code=202,
        response_model=RetryOut,
        summary="Send a call's webhook again now (same delivery id)",
    )
    async def retry(sid: Sid) -> RetryOut:
        try:
            outcome = await service.retry(sid)
            rows = await service.outbox.for_call(sid)
        except (SQLAlchemyError, OSError, TimeoutError) as error:
            raise HTTPException(503, "call records database unavailable") from error
        if outcome.problem is not None:
            raise HTTPException(outcome.status_code, outcome.problem)
        return RetryOut(
            call_sid=sid, queued=outcome.queued, deliveries=[DeliveryOut.of(r) for r in rows]
        )

    return router


def build_recording_link_router(
    recordings: RecordingStore, key: bytes, clock: Callable[[], datetime] = _utcnow
) -> APIRouter:
    """``GET /recordings/{sid}?exp=&sig=``: the expiring link a webhook carries.

    The signature is the only credential: 403 when it is wrong, 410 once expired.
    """
    router = APIRouter(include_in_schema=False)

    @router.get("/recordings/{sid}")
    async def signed_recording(
        sid: Sid,
        exp: Annotated[str | None, Query(max_length=16)] = None,
        sig: Annotated[str | None, Query(max_length=128)] = None,
    ) -> Response:
        check = verify_link(key, sid, exp, sig, clock())
        if check == "expired":
            raise HTTPException(410, "this recording link has expired")
        if check != "ok":
            raise HTTPException(403, "invalid recording link")
        recording = await recordings.open(sid)
        if recording is None:
            raise HTTPException(404, "no recording for this call")
        filename = f"{sid}.{recording.media_type.rsplit('/', 1)[-1]}"
        headers = {"Cache-Control": "private, no-store", "Referrer-Policy": "no-referrer"}
        if recording.path is not None:
            return FileResponse(
                recording.path, media_type=recording.media_type, filename=filename, headers=headers
            )
        stream = recording.stream
        assert stream is not None
        return StreamingResponse(
            iter(lambda: stream.read(65536), b""),
            media_type=recording.media_type,
            headers={**headers, "Content-Disposition": f'attachment; filename="{filename}"'},
        )

    return router
