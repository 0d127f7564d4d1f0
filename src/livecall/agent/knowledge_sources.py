"""Where the `lookup` tool's answers come from: the local index, Vertex AI Search, or both.

A profile picks a backend. A remote backend is slow sometimes and down sometimes, and a
caller waiting on the phone cannot wait for it: every search is bounded in time, a failure
falls back to the local index when the profile has one, and after a few failures in a row
the remote backend is skipped for a while instead of making every caller wait out its
timeout. What the model gets back always says which backend answered, and each passage
carries its source so the agent (and the call's events) can cite it.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from livecall.agent.knowledge import KnowledgeBase, Passage
from livecall.log import get_logger

__all__ = [
    "FallbackSource",
    "KnowledgeSource",
    "LocalSource",
    "LookupOutcome",
    "SearchUnavailable",
    "VertexSearch",
    "VertexSearchTarget",
]

log = get_logger("livecall.knowledge")

_TAG = re.compile(r"<[^>]{0,64}>")
_SPACE = re.compile(r"\s+")
_MAX_PASSAGE_CHARS = 1200


class SearchUnavailable(Exception):
    """A backend could not answer (timeout, refused, error); the message is safe to log."""


class KnowledgeSource(Protocol):
    """Anything the lookup tool can search: k passages for a query, best first."""

    name: str

    async def asearch(self, query: str, k: int) -> list[Passage]: ...


class LocalSource:
    """The offline index of the profile's `knowledge_dir` (see `KnowledgeBase`)."""

    name = "local"

    def __init__(self, index: KnowledgeBase) -> None:
        self.index = index

    async def asearch(self, query: str, k: int) -> list[Passage]:
        return await self.index.asearch(query, k=k)


@dataclass(frozen=True, slots=True)
class VertexSearchTarget:
    """Which Vertex AI Search app or data store to ask, and through which endpoint."""

    project: str
    location: str = "global"
    data_store: str | None = None
    engine: str | None = None
    serving_config: str = "default_search"
    collection: str = "default_collection"
    endpoint: str | None = None  # None: Google's regional endpoint for `location`

    @property
    def serving_config_path(self) -> str:
        base = f"projects/{self.project}/locations/{self.location}/collections/{self.collection}"
        if self.engine:
            return f"{base}/engines/{self.engine}/servingConfigs/{self.serving_config}"
        return f"{base}/dataStores/{self.data_store}/servingConfigs/{self.serving_config}"

    def host_and_scheme(self) -> tuple[str, str]:
        """(host[:port], scheme). http is only for a simulator on this machine."""
        if self.endpoint:
            parts = urlsplit(
                self.endpoint if "://" in self.endpoint else f"https://{self.endpoint}"
            )
            return parts.netloc, parts.scheme
        if self.location == "global":
            return "discoveryengine.googleapis.com", "https"
        return f"{self.location}-discoveryengine.googleapis.com", "https"


def _clean(text: str) -> str:
    """Search snippets come as HTML fragments (<b>…</b>, &quot;): plain text for speech."""
    text = _TAG.sub("", text)
    text = (
        text.replace("&quot;", '"')
        .replace("&#39;", "'")
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", " ")
    )
    return _SPACE.sub(" ", text).strip()[:_MAX_PASSAGE_CHARS]


def passages_from_results(results: list[dict[str, Any]]) -> list[Passage]:
    """Vertex AI Search results (as plain dicts) -> passages: extractive answer, else snippet.

    Search results carry no comparable relevance score, so the rank stands in for it
    (1.0 for the first, then less).
    """
    passages: list[Passage] = []
    for rank, result in enumerate(results):
        document = result.get("document") or {}
        data = document.get("derived_struct_data") or document.get("struct_data") or {}
        pieces: list[str] = []
        for key in ("extractive_answers", "extractive_segments"):
            for item in data.get(key) or []:
                if isinstance(item, dict) and item.get("content"):
                    pieces.append(str(item["content"]))
        if not pieces:
            for item in data.get("snippets") or []:
                if isinstance(item, dict) and item.get("snippet"):
                    pieces.append(str(item["snippet"]))
        text = _clean(" ".join(pieces[:2]))
        if not text:
            continue
        source = str(data.get("title") or data.get("link") or document.get("id") or "search")
        passages.append(Passage(text=text, source=_clean(source)[:200], score=1.0 / (rank + 1)))
    return passages


class VertexSearch:
    """Vertex AI Search through Google's official client (REST transport), off the event loop.

    The client is made on first use (it reads Application Default Credentials); a simulator
    endpoint over plain http gets anonymous credentials instead, since it checks none.
    """

    name = "vertex_search"

    def __init__(self, target: VertexSearchTarget, *, timeout_s: float = 3.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._client: Any = None

    def _make_client(self) -> Any:
        from google.cloud import discoveryengine_v1 as de
        from google.cloud.discoveryengine_v1.services.search_service.transports.rest import (
            SearchServiceRestTransport,
        )

        host, scheme = self.target.host_and_scheme()
        credentials = None
        if scheme == "http":
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()
        transport = SearchServiceRestTransport(
            host=host, credentials=credentials, url_scheme=scheme
        )
        return de.SearchServiceClient(transport=transport)

    def _search(self, query: str, k: int) -> list[Passage]:
        from google.api_core import exceptions as gexc
        from google.cloud import discoveryengine_v1 as de

        if self._client is None:
            self._client = self._make_client()
        spec = de.SearchRequest.ContentSearchSpec(
            snippet_spec=de.SearchRequest.ContentSearchSpec.SnippetSpec(return_snippet=True),
            extractive_content_spec=de.SearchRequest.ContentSearchSpec.ExtractiveContentSpec(
                max_extractive_answer_count=1
            ),
        )
        request = de.SearchRequest(
            serving_config=self.target.serving_config_path,
            query=query,
            page_size=k,
            content_search_spec=spec,
        )
        try:
            pager = self._client.search(request=request, timeout=self.timeout_s)
            results = [type(r).to_dict(r) for r in list(pager.results)[:k]]
        except gexc.GoogleAPICallError as exc:
            raise SearchUnavailable(f"{type(exc).__name__} ({exc.code})") from None
        except gexc.RetryError:
            raise SearchUnavailable("deadline exceeded") from None
        except Exception as exc:  # transport errors: refused, reset, TLS
            raise SearchUnavailable(type(exc).__name__) from None
        return passages_from_results(results)

    async def asearch(self, query: str, k: int) -> list[Passage]:
        try:
            async with asyncio.timeout(self.timeout_s + 0.5):
                return await asyncio.to_thread(self._search, query, k)
        except TimeoutError:
            raise SearchUnavailable(f"no answer within {self.timeout_s:g} s") from None


@dataclass(slots=True)
class LookupOutcome:
    passages: list[Passage]
    backend: str | None  # who answered; None when nobody could
    degraded: str | None = None  # why the preferred backend was not used


class _Breaker:
    """After `threshold` failures in a row, skip the backend for `cooldown_s` seconds."""

    def __init__(self, threshold: int = 3, cooldown_s: float = 30.0) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.open_until = 0.0

    def allows(self) -> bool:
        return time.monotonic() >= self.open_until

    def failed(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown_s

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = 0.0


class FallbackSource:
    """A preferred backend, and what to use when it cannot answer in time."""

    def __init__(
        self,
        primary: KnowledgeSource,
        fallback: KnowledgeSource | None = None,
        *,
        breaker: _Breaker | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.breaker = breaker or _Breaker()

    @property
    def name(self) -> str:
        return self.primary.name

    async def lookup(self, query: str, k: int) -> LookupOutcome:
        why: str
        if self.breaker.allows():
            try:
                passages = await self.primary.asearch(query, k)
            except SearchUnavailable as exc:
                self.breaker.failed()
                why = f"{self.primary.name} unavailable: {exc}"
                log.warning("knowledge.backend_failed", backend=self.primary.name, error=str(exc))
            else:
                self.breaker.succeeded()
                return LookupOutcome(passages, self.primary.name)
        else:
            why = f"{self.primary.name} skipped after repeated failures"
        if self.fallback is None:
            return LookupOutcome([], None, why)
        try:
            passages = await self.fallback.asearch(query, k)
        except Exception as exc:
            log.warning("knowledge.fallback_failed", backend=self.fallback.name, error=str(exc))
            return LookupOutcome([], None, why)
        return LookupOutcome(passages, self.fallback.name, why)
