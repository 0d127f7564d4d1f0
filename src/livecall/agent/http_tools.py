"""Calling a business's webhook for the agent, and turning whatever happens into a result.

The model reads the result aloud in its own words, so every outcome (an answer, a timeout, a
503, a missing credential) must come back as a small, clear JSON object and never as an
exception. Header secrets come from the environment at call time and are scrubbed from
everything returned or logged: a server that echoes its Authorization header back in an
error page must not make the agent read a token to a caller.

Each request carries the call it is made for (`CallContext`: call SID, the caller's number,
the profile) in ``X-Livecall-*`` headers, signed with HMAC-SHA256 when a secret is set (the
tool's `signing_secret`, else `HTTP_TOOLS_SECRET`), so the business backend can authorise per
caller: see `signature_base` for exactly what is signed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx

from livecall.agent.profiles import ENV_REF, HttpToolSpec
from livecall.log import REDACTED, get_logger, register_secret

__all__ = [
    "CONTEXT_HEADERS",
    "CallContext",
    "CallToolRunner",
    "HttpToolRunner",
    "MissingEnvVar",
    "sign_tool_request",
    "signature_base",
]

log = get_logger("livecall.http_tools")

MAX_RESPONSE_BYTES = 64 * 1024
MAX_TEXT_CHARS = 4000
MAX_ERROR_BODY_CHARS = 500


SIGNATURE_HEADER = "X-Livecall-Signature"
TIMESTAMP_HEADER = "X-Livecall-Timestamp"
#: The call-context headers, in the order they are signed.
CONTEXT_HEADERS = ("X-Livecall-Call-Sid", "X-Livecall-Caller", "X-Livecall-Profile")
_UNSAFE = re.compile(r"[^\x21-\x7e]")


@dataclass(frozen=True, slots=True)
class CallContext:
    """The call an HTTP tool runs for: the backend authorises (or not) on these.

    `caller` is the other party's number: who called on an inbound call, who was called on
    an outbound one.
    """

    call_sid: str
    caller: str | None
    profile: str | None

    def headers(self) -> dict[str, str]:
        """The context headers (values stripped to printable ASCII without spaces)."""
        values = (self.call_sid, self.caller or "", self.profile or "")
        return {
            name: _UNSAFE.sub("", v)[:128] for name, v in zip(CONTEXT_HEADERS, values, strict=True)
        }


def signature_base(
    timestamp: str, method: str, target: str, context: dict[str, str], body: bytes
) -> bytes:
    """What ``X-Livecall-Signature`` signs, one field per line::

    v1
    <X-Livecall-Timestamp>        unix seconds
    <METHOD>                      GET, POST, ...
    <path?query>                  the request target as sent (GET arguments are in it)
    <X-Livecall-Call-Sid>
    <X-Livecall-Caller>           empty when unknown
    <X-Livecall-Profile>
    <body>                        raw bytes (empty for GET/DELETE)
    """
    fields = [timestamp, method.upper(), target, *(context.get(h, "") for h in CONTEXT_HEADERS)]
    return ("v1\n" + "".join(f"{f}\n" for f in fields)).encode() + body


def sign_tool_request(
    secret: str, timestamp: str, method: str, target: str, context: dict[str, str], body: bytes
) -> str:
    """The ``X-Livecall-Signature`` value: ``sha256=`` and the hex HMAC-SHA256."""
    base = signature_base(timestamp, method, target, context, body)
    return "sha256=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


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
        signing_secret: str | None = None,
    ) -> None:
        self._client = client
        self._owns_client = client is None
        self.max_response_bytes = max_response_bytes
        self.max_text_chars = max_text_chars
        self.signing_secret = signing_secret or None
        if self.signing_secret:
            register_secret(self.signing_secret)

    def for_call(self, context: CallContext) -> CallToolRunner:
        """This runner bound to one call: every request carries its signed context."""
        return CallToolRunner(self, context)

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

    async def call(
        self, spec: HttpToolSpec, args: dict[str, Any], context: CallContext | None = None
    ) -> dict[str, Any]:
        """Call `spec.url` with `args`; always returns ``{"result": …}`` or ``{"error": …}``."""
        try:
            headers, secrets = _resolve_headers(spec)
            signing = self._signing_secret(spec)
        except MissingEnvVar as exc:
            log.error("http_tool.missing_env", tool=spec.name, variable=exc.name)
            return {
                "error": f"{spec.name} is not configured: environment variable {exc.name} "
                "is not set"
            }
        if signing:
            secrets.append(signing)
        started = time.perf_counter()
        raw = await self._request(spec, args, headers, context, signing)
        result: dict[str, Any] = _scrub(raw, secrets)
        status = result.pop("_status", None)
        log.info(
            "http_tool.called",
            tool=spec.name,
            method=spec.method,
            status=status,
            ok="error" not in result,
            signed=bool(signing and context),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return result

    def _signing_secret(self, spec: HttpToolSpec) -> str | None:
        """The tool's own secret (an environment reference) or the global one."""
        if spec.signing_secret is None:
            return self.signing_secret
        name = ENV_REF.fullmatch(spec.signing_secret)
        assert name is not None  # the profile validator allows only ${NAME}
        value = os.environ.get(name.group(1))
        if not value:
            raise MissingEnvVar(name.group(1))
        register_secret(value)
        return value

    async def _request(
        self,
        spec: HttpToolSpec,
        args: dict[str, Any],
        headers: dict[str, str],
        context: CallContext | None = None,
        signing: str | None = None,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": {"Accept": "application/json", **headers}}
        if spec.method in ("GET", "DELETE"):
            kwargs["params"] = _query_params(args)
        else:
            kwargs["json"] = args
        timeout_msg = {"error": f"timeout after {spec.timeout_s:.1f} s calling {spec.name}"}
        client = self._get_client()
        request = client.build_request(
            spec.method, spec.url, timeout=httpx.Timeout(spec.timeout_s), **kwargs
        )
        if context is not None:
            self._add_context(request, context, signing)
        try:
            # httpx's timeout is per read/connect; the outer bound caps a slow trickle too.
            async with asyncio.timeout(spec.timeout_s):
                response = await client.send(request, stream=True)
                try:
                    body, complete = await self._read_bounded(response)
                finally:
                    await response.aclose()
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

    @staticmethod
    def _add_context(request: httpx.Request, context: CallContext, signing: str | None) -> None:
        """The call's context headers, a timestamp, and (with a secret) their signature."""
        values = context.headers()
        timestamp = str(int(time.time()))
        request.headers.update(values)
        request.headers[TIMESTAMP_HEADER] = timestamp
        if signing:
            target = request.url.raw_path.decode("ascii")
            body = request.content  # built from JSON or empty: already in memory
            request.headers[SIGNATURE_HEADER] = sign_tool_request(
                signing, timestamp, request.method, target, values, body
            )

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


class CallToolRunner:
    """An `HttpToolRunner` bound to one call (what `ToolRunner` holds as its `http`)."""

    __slots__ = ("context", "runner")

    def __init__(self, runner: HttpToolRunner, context: CallContext) -> None:
        self.runner = runner
        self.context = context

    async def call(self, spec: HttpToolSpec, args: dict[str, Any]) -> dict[str, Any]:
        return await self.runner.call(spec, args, self.context)
