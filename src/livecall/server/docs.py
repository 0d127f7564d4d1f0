"""The API's own documentation: public only when the operator says so.

The OpenAPI schema lists every route and parameter, a map for whoever probes the server. By
default (`DOCS_PUBLIC=false`) the Swagger UI and ReDoc pages are not served and
`/openapi.json` is served behind the call records API's auth (the `LIVECALL_API_TOKEN`
bearer, or loopback in local-only mode): `curl -H "Authorization: Bearer …"` still gets it
for a client generator. `DOCS_PUBLIC=true` serves all three to anyone, FastAPI's way.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse

from livecall.server.auth import bearer_auth
from livecall.settings import Settings

__all__ = ["OPENAPI_PATH", "build_openapi_router", "docs_urls"]

OPENAPI_PATH = "/openapi.json"


def docs_urls(settings: Settings) -> dict[str, Any]:
    """`FastAPI(...)` keyword arguments: FastAPI's defaults when public, else none at all."""
    if settings.docs_public:
        return {}
    return {"docs_url": None, "redoc_url": None, "openapi_url": None}


def build_openapi_router(app: FastAPI, settings: Settings) -> APIRouter:
    """`GET /openapi.json` behind the API's auth when the docs are not public (raises
    `ApiDisabled` like the API itself: no API, no schema)."""
    router = APIRouter()
    if settings.docs_public:
        return router
    authorize = bearer_auth(settings)

    @router.get(OPENAPI_PATH, include_in_schema=False, dependencies=[Depends(authorize)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    return router
