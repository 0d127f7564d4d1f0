"""Business webhooks as agent tools: every outcome becomes a clear result, secrets stay hidden."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from structlog.testing import capture_logs

from livecall.agent.http_tools import HttpToolRunner
from livecall.agent.profiles import HttpToolSpec

SECRET = "tok-9f8e7d6c5b4a"


def make_app() -> tuple[FastAPI, list[dict[str, Any]]]:
    app = FastAPI()
    seen: list[dict[str, Any]] = []
    never = asyncio.Event()

    async def note(request: Request) -> dict[str, Any]:
        entry = {
            "method": request.method,
            "params": list(request.query_params.multi_items()),
            "headers": dict(request.headers),
            "body": (await request.body()).decode(),
        }
        seen.append(entry)
        return entry

    @app.get("/orders/status")
    async def order_status(request: Request) -> dict[str, Any]:
        entry = await note(request)
        return {
            "order": request.query_params.get("order_id"),
            "status": "out for delivery",
            "auth_seen": entry["headers"].get("authorization") is not None,
        }

    @app.post("/bookings")
    async def book(request: Request) -> JSONResponse:
        await note(request)
        return JSONResponse({"booked": await request.json()}, status_code=201)

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await never.wait()  # never answers
        return {}

    @app.get("/down")
    async def down() -> PlainTextResponse:
        return PlainTextResponse("Service Unavailable: " + "x" * 2000, status_code=503)

    @app.get("/echo-auth")
    async def echo_auth(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"denied for {request.headers.get('authorization')}", 401)

    @app.get("/text")
    async def text() -> PlainTextResponse:
        return PlainTextResponse("We are open until 10pm. " * 400)

    @app.get("/big")
    async def big() -> JSONResponse:
        return JSONResponse({"rows": ["y" * 100] * 2000})

    @app.get("/bad-json")
    async def bad_json() -> PlainTextResponse:
        return PlainTextResponse("{not json", media_type="application/json")

    @app.get("/moved")
    async def moved() -> RedirectResponse:
        return RedirectResponse("/orders/status", status_code=302)

    return app, seen


def spec(path: str, method: str = "GET", **kw: Any) -> HttpToolSpec:
    return HttpToolSpec(
        name=kw.pop("name", "shop"),
        description="test tool",
        url=f"http://shop.test{path}",
        method=method,
        **kw,
    )


@pytest.fixture
async def tools():
    app, seen = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        yield HttpToolRunner(client), seen


async def test_get_sends_query_params_and_env_headers(tools, monkeypatch) -> None:
    runner, seen = tools
    monkeypatch.setenv("SHOP_TOKEN", SECRET)
    tool = spec("/orders/status", headers={"Authorization": "Bearer ${SHOP_TOKEN}", "X-App": "lc"})
    result = await runner.call(tool, {"order_id": "A17", "tags": ["a", "b"], "rush": True})
    assert result == {"result": {"order": "A17", "status": "out for delivery", "auth_seen": True}}
    (request,) = seen
    assert request["params"] == [
        ("order_id", "A17"),
        ("tags", "a"),
        ("tags", "b"),
        ("rush", "true"),
    ]
    assert request["headers"]["authorization"] == f"Bearer {SECRET}"
    assert request["headers"]["x-app"] == "lc"
    assert request["headers"]["accept"] == "application/json"


async def test_post_sends_json(tools) -> None:
    runner, seen = tools
    args = {"name": "Ada", "party": 4, "notes": {"high_chair": True}}
    assert await runner.call(spec("/bookings", "POST"), args) == {"result": {"booked": args}}
    assert seen[0]["headers"]["content-type"] == "application/json"


async def test_missing_env_var_is_a_clear_error_and_no_request(tools, monkeypatch) -> None:
    runner, seen = tools
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    tool = spec("/orders/status", headers={"Authorization": "Bearer ${NOT_SET_ANYWHERE}"})
    result = await runner.call(tool, {})
    assert result == {
        "error": "shop is not configured: environment variable NOT_SET_ANYWHERE is not set"
    }
    assert seen == []


async def test_timeout(tools) -> None:
    runner, _ = tools
    result = await runner.call(spec("/slow", name="slow_api", timeout_s=0.2), {})
    assert result == {"error": "timeout after 0.2 s calling slow_api"}


async def test_server_error_with_truncated_body(tools) -> None:
    runner, _ = tools
    result = await runner.call(spec("/down"), {})
    assert result["error"] == "HTTP 503 from shop"
    assert result["body"].startswith("Service Unavailable: xxx")
    assert len(result["body"]) < 600


async def test_redirects_are_not_followed(tools) -> None:
    runner, _ = tools
    assert (await runner.call(spec("/moved"), {}))["error"] == "HTTP 302 from shop"


async def test_non_json_answer_is_text_truncated(tools) -> None:
    runner, _ = tools
    result = await runner.call(spec("/text"), {})
    assert result["result"].startswith("We are open until 10pm.")
    assert result["result"].endswith("[truncated]") and len(result["result"]) < 4100


async def test_response_size_is_bounded(tools) -> None:
    runner, _ = tools
    result = await runner.call(spec("/big"), {})
    assert result == {"error": "the answer from shop is larger than 64 KiB"}


async def test_invalid_json_is_reported(tools) -> None:
    runner, _ = tools
    assert (await runner.call(spec("/bad-json"), {}))["error"] == "shop answered invalid JSON"


async def test_secret_never_in_results_or_logs(tools, monkeypatch) -> None:
    runner, _ = tools
    monkeypatch.setenv("SHOP_TOKEN", SECRET)
    tool = spec("/echo-auth", headers={"Authorization": "Bearer ${SHOP_TOKEN}"})
    with capture_logs() as logs:
        result = await runner.call(tool, {})
    assert result["error"] == "HTTP 401 from shop"
    assert result["body"] == "denied for Bearer [redacted]"
    assert SECRET not in repr(logs) and SECRET not in repr(result)
    assert logs and logs[-1]["event"] == "http_tool.called"


async def test_unreachable_server_and_own_client() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = sock.getsockname()[1]
    try:
        async with HttpToolRunner() as runner:
            tool = HttpToolSpec(
                name="gone", description="d", url=f"http://127.0.0.1:{port}/x", timeout_s=2
            )
            result = await runner.call(tool, {"a": 1})
        assert result == {"error": "could not reach gone: ConnectError"}
    finally:
        sock.close()


# --- the call context, signed ---------------------------------------------------------------

TOOL_SECRET = "tool-signing-secret-5e6f"


def verify_tool_request(secret: str, request: dict[str, Any], target: str) -> bool:
    """What a business backend does: rebuild the signed text, compare in constant time."""
    import hashlib
    import hmac as hmac_

    h = request["headers"]
    base = (
        "v1\n"
        + "".join(
            f"{v}\n"
            for v in (
                h["x-livecall-timestamp"],
                request["method"],
                target,
                h["x-livecall-call-sid"],
                h["x-livecall-caller"],
                h["x-livecall-profile"],
            )
        )
    ).encode() + request["body"].encode()
    expected = "sha256=" + hmac_.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return hmac_.compare_digest(expected, h.get("x-livecall-signature", ""))


async def test_call_context_headers_are_signed_on_get_and_post() -> None:
    import time

    from livecall.agent.http_tools import CallContext

    app, seen = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        runner = HttpToolRunner(client, signing_secret=TOOL_SECRET).for_call(
            CallContext("CA123", "+15551230000", "front-desk")
        )
        await runner.call(spec("/orders/status"), {"order_id": "A 17"})
        await runner.call(spec("/bookings", "POST"), {"name": "Ada", "party": 4})
    get, post = seen
    for request in (get, post):
        h = request["headers"]
        assert h["x-livecall-call-sid"] == "CA123"
        assert h["x-livecall-caller"] == "+15551230000"
        assert h["x-livecall-profile"] == "front-desk"
        assert abs(int(h["x-livecall-timestamp"]) - time.time()) < 60
    assert verify_tool_request(TOOL_SECRET, get, "/orders/status?order_id=A+17")
    assert verify_tool_request(TOOL_SECRET, post, "/bookings")
    # anything changed breaks it: another caller, another argument, another secret
    forged = {**get, "headers": {**get["headers"], "x-livecall-caller": "+15559999999"}}
    assert not verify_tool_request(TOOL_SECRET, forged, "/orders/status?order_id=A+17")
    assert not verify_tool_request(TOOL_SECRET, get, "/orders/status?order_id=B+18")
    assert not verify_tool_request("another-secret", post, "/bookings")


async def test_per_tool_secret_wins_and_never_leaks(monkeypatch) -> None:
    from livecall.agent.http_tools import CallContext

    monkeypatch.setenv("SHOP_SIGNING", TOOL_SECRET)
    app, seen = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        runner = HttpToolRunner(client, signing_secret="global-secret-0000")
        tool = spec("/bookings", "POST", signing_secret="${SHOP_SIGNING}")
        with capture_logs() as logs:
            result = await runner.call(tool, {"n": 1}, CallContext("CA9", None, "p"))
    assert "error" not in result
    (request,) = seen
    assert request["headers"]["x-livecall-caller"] == ""
    assert verify_tool_request(TOOL_SECRET, request, "/bookings")
    assert TOOL_SECRET not in repr(logs) and TOOL_SECRET not in repr(result)


async def test_unset_tool_secret_is_a_clear_error_and_no_request(monkeypatch) -> None:
    from livecall.agent.http_tools import CallContext

    monkeypatch.delenv("NO_SUCH_SIGNING_SECRET", raising=False)
    app, seen = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        runner = HttpToolRunner(client)
        tool = spec("/bookings", "POST", signing_secret="${NO_SUCH_SIGNING_SECRET}")
        result = await runner.call(tool, {}, CallContext("CA9", "+1555", "p"))
    assert result == {
        "error": "shop is not configured: environment variable NO_SUCH_SIGNING_SECRET is not set"
    }
    assert seen == []


async def test_without_a_secret_context_is_sent_unsigned(tools) -> None:
    from livecall.agent.http_tools import CallContext

    runner, seen = tools
    await runner.call(spec("/bookings", "POST"), {}, CallContext("CA1\r\nX-Evil: 1", "+1", "p"))
    headers = seen[0]["headers"]
    assert headers["x-livecall-call-sid"] == "CA1X-Evil:1"  # no header injection
    assert "x-livecall-signature" not in headers and "x-evil" not in headers


def test_signing_secret_must_be_an_env_reference() -> None:
    with pytest.raises(ValueError, match="environment variable reference"):
        spec("/x", signing_secret="literal-secret-in-the-file")
    assert spec("/x", signing_secret="${A_B}").env_vars() == ["A_B"]
