"""A fake Vertex AI Search (Discovery Engine `servingConfigs.search`), for offline tests.

Google's official client (`google-cloud-discoveryengine`, REST transport) talks to it as to
the real service: the same paths (data stores or engines, with or without a collection),
the same JSON shapes (`results[].document.derivedStructData` with `title`, `link`,
`snippets` and `extractive_answers`, snippets as HTML with `<b>` around matched words) and
the same error envelope (`{"error": {"code", "message", "status"}}`). It is strict where the
service is: an unknown serving config is 404 NOT_FOUND, an empty query 400
INVALID_ARGUMENT. It can also be slow or fail on command, which is what the fallback tests
need.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from livecall.sim.stack import free_socket

__all__ = ["SimDocument", "VertexSearchSim", "serve_vertex_search"]

_WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_SERVING_CONFIG = re.compile(
    r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"(?:/collections/(?P<collection>[^/]+))?"
    r"/(?P<kind>dataStores|engines)/(?P<name>[^/]+)/servingConfigs/(?P<config>[^/:]+)$"
)
_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}
_STATUS |= {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


@dataclass(frozen=True)
class SimDocument:
    id: str
    title: str
    content: str
    link: str = ""


@dataclass
class VertexSearchSim:
    """The fake's state: its documents, what it was asked, and how it should misbehave."""

    project: str = "sim-project"
    location: str = "global"
    data_store: str = "sim-store"
    documents: list[SimDocument] = field(default_factory=list)
    fail_status: int | None = None  # answer every search with this HTTP error
    delay_s: float = 0.0  # answer this much later
    queries: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    closing: asyncio.Event = field(default_factory=asyncio.Event)  # ends delays at shutdown

    def knows(self, match: re.Match[str]) -> bool:
        return (
            match["project"] == self.project
            and match["location"] == self.location
            and match["kind"] == "dataStores"
            and match["name"] == self.data_store
        )

    def search(self, query: str, page_size: int) -> list[dict[str, Any]]:
        terms = {w.lower() for w in _WORD.findall(query) if len(w) > 2}
        scored: list[tuple[int, SimDocument, str]] = []
        for doc in self.documents:
            best, best_hits = "", 0
            for sentence in _SENTENCE.split(doc.content):
                hits = len(terms & {w.lower() for w in _WORD.findall(sentence)})
                if hits > best_hits:
                    best, best_hits = sentence, hits
            if best_hits:
                scored.append((best_hits, doc, best))
        scored.sort(key=lambda item: -item[0])
        return [_result(doc, sentence, terms) for _, doc, sentence in scored[: max(1, page_size)]]


def _bold(sentence: str, terms: set[str]) -> str:
    def mark(m: re.Match[str]) -> str:
        word = m.group(0)
        return f"<b>{word}</b>" if word.lower() in terms else word

    return _WORD.sub(mark, html.escape(sentence, quote=True))


def _result(doc: SimDocument, sentence: str, terms: set[str]) -> dict[str, Any]:
    return {
        "id": doc.id,
        "document": {
            "name": f"projects/sim/locations/global/dataStores/sim/branches/0/documents/{doc.id}",
            "id": doc.id,
            "derivedStructData": {
                "title": doc.title,
                "link": doc.link,
                "snippets": [{"snippet": _bold(sentence, terms), "snippet_status": "SUCCESS"}],
                "extractive_answers": [{"pageNumber": "1", "content": sentence}],
            },
        },
    }


def _error(code: int, message: str) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "status": _STATUS.get(code, "UNKNOWN")}}
    return JSONResponse(body, status_code=code)


def build_vertex_search_app(sim: VertexSearchSim) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/v1/{serving_config:path}")
    async def search(serving_config: str, request: Request) -> JSONResponse:
        path, _, method = serving_config.rpartition(":")
        match = _SERVING_CONFIG.match(path)
        if method != "search" or match is None or not sim.knows(match):
            return _error(404, f"ServingConfig {path} not found.")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Invalid JSON payload received.")
        if not isinstance(body, dict):
            return _error(400, "Invalid JSON payload received.")
        sim.requests.append(body)
        query = str(body.get("query") or "")
        if not query.strip():
            return _error(400, "Query cannot be empty.")
        sim.queries.append(query)
        if sim.delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sim.closing.wait(), sim.delay_s)
        if sim.fail_status is not None:
            return _error(sim.fail_status, "The service is currently unavailable.")
        page_size = int(body.get("pageSize") or body.get("page_size") or 10)
        results = sim.search(query, page_size)
        return JSONResponse({"results": results, "totalSize": len(results)})

    return app


@contextlib.asynccontextmanager
async def serve_vertex_search(sim: VertexSearchSim) -> AsyncIterator[str]:
    """Serve the fake on a free loopback port; yields its endpoint (``http://127.0.0.1:N``)."""
    import uvicorn

    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_vertex_search_app(sim),
        log_level="warning",
        lifespan="off",
        access_log=False,
        log_config=None,  # a simulator must not reconfigure the process's uvicorn loggers
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        sim.closing.set()  # a delayed search must not hold the shutdown up
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()
