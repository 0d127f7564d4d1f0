"""Calling a business's webhook for the agent, and turning whatever happens into a result.

The model reads the result aloud in its own words, so every outcome (an answer, a timeout, a
503, a missing credential) must come back as a small, clear JSON object and never as an
exception. Header secrets come from the environment at call time and are scrubbed from
everything returned or logged: a server that echoes its Authorization header back in an
error page must not make the agent read a token to a caller.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import httpx

from livecall.agent.profiles import ENV_REF, HttpToolSpec
from livecall.log import REDACTED, get_logger, register_secret

__all__ = ["HttpToolRunner", "MissingEnvVar"]

log = get_logger("livecall.http_tools")

MAX_RESPONSE_BYTES = 64 * 1024
MAX_TEXT_CHARS = 4000
MAX_ERROR_BODY_CHARS = 500


class MissingEnvVar(LookupError):
    """A header references an environment variable that is not set."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)


def _resolve_headers(spec: HttpToolSpec) -> tuple[dict[str, str], list[str]]:
    """Headers with ``${NAME}`` filled in from the environment, and the secret values used."""
    secrets: list[str] = []

    def substitute(match: Any) -> str:
        name = match.group(1)
        value = os.environ.get(name)
        if value is None:
            raise MissingEnvVar(name)
        secrets.append(value)
        return value

    headers = {name: ENV_REF.sub(substitute, template) for name, template in spec.headers.items()}
    for value in secrets:
        register_secret(value)  # the process-wide log scrubber learns it too
    return headers, [s for s in secrets if s]


def _scrub(value: Any, secrets: list[str]) -> Any:
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {_scrub(k, secrets): _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    return value


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " …[truncated]"


def _query_params(args: dict[str, Any]) -> dict[str, Any]:
    """Arguments as query parameters: lists repeat the key, objects travel as JSON text."""
    params: dict[str, Any] = {}
    for key, value in args.items():
        if value is None:
            continue
        if isinstance(value, bool):
            params[key] = "true" if value else "false"
        elif isinstance(value, dict):
            params[key] = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, list):
            params[key] = [json.dumps(v) if isinstance(v, dict | list) else v for v in value]
        else:
            params[key] = value
    return params


class HttpToolRunner:
    """Runs profile-declared HTTP tools with one shared `httpx.AsyncClient` (pooled connections).

    Pass a client to share one (or to use `httpx.ASGITransport` in tests); otherwise one is
    created on first use and closed by `aclose`.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_text_chars: int = MAX_TEXT_CHARS,
    ) -> None:
        self._client = client
        self._owns_client = client is None
        self.max_response_bytes = max_response_bytes
        self.max_text_chars = max_text_chars

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> HttpToolRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def call(self, spec: HttpToolSpec, args: dict[str, Any]) -> dict[str, Any]:
        """Call `spec.url` with `args`; always returns ``{"result": …}`` or ``{"error": …}``."""
        try:
            headers, secrets = _resolve_headers(spec)
        except MissingEnvVar as exc:
            log.error("http_tool.missing_env", tool=spec.name, variable=exc.name)
            return {
                "error": f"{spec.name} is not configured: environment variable {exc.name} "
                "is not set"
            }
        started = time.perf_counter()
        result = await self._request(spec, args, headers)
        result = _scrub(result, secrets)
        status = result.pop("_status", None)
        log.info(
            "http_tool.called",
            tool=spec.name,
            method=spec.method,
            status=status,
            ok="error" not in result,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return result

    async def _request(
        self, spec: HttpToolSpec, args: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": {"Accept": "application/json", **headers}}
        if spec.method in ("GET", "DELETE"):
            kwargs["params"] = _query_params(args)
        else:
            kwargs["json"] = args
        timeout_msg = {"error": f"timeout after {spec.timeout_s:.1f} s calling {spec.name}"}
        client = self._get_client()
        try:
            # httpx's timeout is per read/connect; the outer bound caps a slow trickle too.
            async with (
                asyncio.timeout(spec.timeout_s),
                client.stream(
                    spec.method, spec.url, timeout=httpx.Timeout(spec.timeout_s), **kwargs
                ) as response,
            ):
                body, complete = await self._read_bounded(response)
                status = response.status_code
                content_type = response.headers.get("content-type", "")
                encoding = response.encoding or "utf-8"
        except (TimeoutError, httpx.TimeoutException):
            return timeout_msg
        except httpx.HTTPError as exc:
            # The exception text may quote the URL, never the headers; say what kind it was.
            return {"error": f"could not reach {spec.name}: {type(exc).__name__}"}

        text = body.decode(encoding, errors="replace")
        if not 200 <= status < 300:
            return {
                "error": f"HTTP {status} from {spec.name}",
                "body": _truncate(text, MAX_ERROR_BODY_CHARS),
                "_status": status,
            }
        looks_json = "json" in content_type or text.lstrip()[:1] in ("{", "[")
        if looks_json and text.strip():
            try:
                return {"result": json.loads(text), "_status": status}
            except ValueError:
                if not complete:
                    return {
                        "error": f"the answer from {spec.name} is larger than "
                        f"{self.max_response_bytes // 1024} KiB",
                        "_status": status,
                    }
                if "json" in content_type:
                    return {
                        "error": f"{spec.name} answered invalid JSON",
                        "body": _truncate(text, MAX_ERROR_BODY_CHARS),
                        "_status": status,
                    }
        return {"result": _truncate(text, self.max_text_chars), "_status": status}

    async def _read_bounded(self, response: httpx.Response) -> tuple[bytes, bool]:
        """At most `max_response_bytes` of the body, and whether that was all of it."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_response_bytes:
                return b"".join(chunks)[: self.max_response_bytes], False
        return b"".join(chunks), True
