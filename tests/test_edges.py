"""Bounded edges, attacked over real sockets: bodies, slow requests, WebSocket frames, pending
connections per client, Host names, local trust, the drain and the login throttle.

Each attack here worked on the code before `server/limits.py` and `server/auth.py`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from starlette.datastructures import Headers

from livecall.server.app import create_app
from livecall.server.auth import HostPolicy, LocalAccess, host_name
from livecall.server.dashboard import LoginThrottle
from livecall.server.drain import Drain
from livecall.server.forwarded import TrustedProxies
from livecall.server.limits import PendingGate
from livecall.server.registry import CallRegistry
from livecall.server.serving import uvicorn_config
from livecall.settings import Settings
from livecall.sim.gemini import FakeGeminiServer
from livecall.sim.stack import TEST_AUTH_TOKEN
from livecall.sim.twilio import Pause
from livecall.telephony.twilio import TwilioSignature
from support import eventually

ADMIN = "admin-token-for-tests-0123456789"
API = "api-token-for-tests-0123456789"
pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- helpers


def host_port(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


def stream_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/ws/twilio"


def signed(base_url: str) -> dict[str, str]:
    return {"X-Twilio-Signature": TwilioSignature(TEST_AUTH_TOKEN).sign(stream_url(base_url))}


async def open_stream(
    base_url: str, source: str = "127.0.0.1", **headers: str
) -> websockets.ClientConnection:
    """A signed stream upgrade that then says nothing (pending until its `start`)."""
    return await websockets.connect(
        stream_url(base_url),
        additional_headers={**signed(base_url), **headers},
        proxy=None,
        max_size=None,
        local_addr=(source, 0),
        open_timeout=5,
    )


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after `within`).
    A reset counts as closed: a server that closes with our unread bytes in its buffer
    resets the connection, and the kernel may drop its answer with it."""
    data = b""
    async with asyncio.timeout(within):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# --------------------------------------------------------------------------- pure pieces


def test_host_policy_names_and_addresses() -> None:
    policy = HostPolicy(
        "https://calls.example.com", ["*.example.org", "other.example"], None, "/run/a.sock"
    )
    tcp = {"client": ("203.0.113.9", 5000), "server": ("10.0.0.7", 8080)}
    loop = {"client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080)}
    unix = {"client": None, "server": ("/run/a.sock", None)}
    other_unix = {"client": None, "server": ("/run/proxied.sock", None)}

    def allows(scope: dict[str, Any], host: str, **extra: str) -> bool:
        return policy.allows(scope, Headers({"host": host, **extra}))

    assert allows(tcp, "calls.example.com") and allows(tcp, "CALLS.example.com:443")
    assert allows(tcp, "a.example.org") and allows(tcp, "other.example:8080")
    assert allows(tcp, "10.0.0.7:8080") and allows(tcp, "[2001:db8::7]")  # probes, scrapers
    assert not allows(tcp, "evil.example") and not allows(tcp, "example.org.evil.example")
    assert allows(tcp, "localhost:8080") and not allows(tcp, "")  # docker's published ports
    assert allows(loop, "localhost:8080") and allows(loop, "[::1]:8080")
    assert not allows(loop, "evil.example")
    assert allows(unix, "whatever") and not allows(other_unix, "whatever")
    # a forwarded host counts only from a trusted proxy
    assert allows(tcp, "calls.example.com", **{"x-forwarded-host": "evil.example"})  # ignored
    trusting = HostPolicy("https://calls.example.com", (), TrustedProxies(["203.0.113.0/24"]))
    assert not trusting.allows(
        tcp, Headers({"host": "calls.example.com", "x-forwarded-host": "evil.example"})
    )
    assert not HostPolicy(None, ()).active and not HostPolicy("https://x.example", ["*"]).active
    assert host_name("[::1]:80") == "::1" and host_name("Example.COM.:443") == "example.com"


def test_local_access_wants_a_real_loopback_peer_our_host_and_no_foreign_origin() -> None:
    local = LocalAccess(TrustedProxies(["127.0.0.1"]))
    plain = LocalAccess(admin_socket="/run/a.sock")
    peer = {"client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080)}
    sidecar = {"client": ("127.0.0.6", 5000), "server": ("127.0.0.1", 8080)}
    ok = Headers({"host": "localhost:8080"})
    assert plain.is_local(peer, ok)
    assert not local.is_local(peer, ok)  # a trusted proxy's requests are never local
    assert not plain.is_local(sidecar, ok)
    assert not plain.is_local(peer, Headers({"host": "evil.example"}))
    assert not plain.is_local(peer, Headers({"host": "localhost", "origin": "http://evil.example"}))
    assert plain.is_local(peer, Headers({"host": "127.0.0.1", "origin": "http://localhost:8080"}))
    assert not plain.is_local(peer, Headers({"host": "localhost", "x-forwarded-for": "1.2.3.4"}))
    assert plain.is_local({"client": None, "server": ("/run/a.sock", None)}, Headers({}))
    # any other Unix socket may have a public proxy in front of it (`uvicorn --uds`)
    assert not plain.is_local({"client": None, "server": ("/run/b.sock", None)}, ok)


def test_pending_gate_forgets_clients_with_nothing_pending() -> None:
    gate = PendingGate(2)
    assert gate.enter("a") and gate.enter("a") and not gate.enter("a") and gate.enter("b")
    gate.leave("a")
    assert gate.enter("a")
    for _ in range(2):
        gate.leave("a")
    gate.leave("b")
    assert gate.counts == {}


def test_login_throttle_keys_and_bounded_buckets() -> None:
    assert LoginThrottle.client_key("2001:db8:1:2:3::9") == "2001:db8:1:2::/64"
    assert LoginThrottle.client_key("::ffff:203.0.113.5") == "203.0.113.5"
    assert LoginThrottle.client_key("203.0.113.5") == "203.0.113.5"
    throttle = LoginThrottle(limit=1, max_clients=100)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._failures) <= 100
    assert throttle.blocked("10.0.3.231")  # the most recent ones are kept


# --------------------------------------------------------------------------- bodies


async def test_a_300_mb_unsigned_post_to_twiml_is_refused_before_its_body_is_read(
    make_stack,
) -> None:
    """Content-Length says 300 MB: 413 at once, without waiting for (or reading) the body,
    and the connection is closed so the rest never comes in."""
    stack = await make_stack()
    reader, writer = await asyncio.open_connection(*host_port(stack.base_url))
    host = stack.base_url.removeprefix("http://")
    writer.write(
        f"POST /twiml HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        "Content-Length: 300000000\r\n\r\n".encode()
    )
    await writer.drain()
    response = await read_until_closed(reader, 5)  # not one body byte was sent
    writer.close()
    assert status_of(response) == 413, response[:200]
    assert stack.gemini.sessions == [] and stack.registry.load == 0


async def test_a_streamed_oversized_body_is_cut_at_64_kib(make_stack) -> None:
    """A chunked body that never ends: 413 once 64 KiB have been counted, the connection
    closed; the sender gets no further than the socket buffers in between."""
    stack = await make_stack()
    reader, writer = await asyncio.open_connection(*host_port(stack.base_url))
    host = stack.base_url.removeprefix("http://")
    writer.write(
        f"POST /twiml HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    chunk = b"4000\r\n" + b"a" * 0x4000 + b"\r\n"
    answer = asyncio.create_task(read_until_closed(reader, 20))
    sent = 0
    try:
        while not answer.done() and sent < 64 << 20:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    except (ConnectionError, OSError):
        pass  # the server closed the connection on us
    response = await answer
    writer.close()
    assert response == b"" or status_of(response) == 413, response[:200]
    assert sent < 16 << 20, f"{sent} bytes went in before the refusal"


async def test_a_trickled_body_is_cut_within_the_request_deadline(make_stack) -> None:
    """One byte of body now and then (slowloris on the body): 408 and closed at the
    whole-request deadline, although bytes keep coming."""
    stack = await make_stack(request_timeout_s=1.0)
    reader, writer = await asyncio.open_connection(*host_port(stack.base_url))
    host = stack.base_url.removeprefix("http://")
    writer.write(
        f"POST /twiml HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n".encode()
    )
    loop = asyncio.get_running_loop()
    began = loop.time()
    answer = asyncio.create_task(read_until_closed(reader, 6))
    try:
        while not answer.done():
            writer.write(b"a")
            await writer.drain()
            await asyncio.wait([answer], timeout=0.2)  # the trickle's pace
    except (ConnectionError, OSError):
        pass
    response = await answer
    took = loop.time() - began
    writer.close()
    assert response == b"" or status_of(response) == 408, response[:200]
    assert took < 3.0, took


# --------------------------------------------------------------------------- the --factory path


@pytest.mark.timeout(90)
async def test_uvicorn_factory_serving_gets_the_same_limits(tmp_path: Path) -> None:
    """`uvicorn --factory livecall.server.app:app_from_env` with uvicorn's defaults (16 MiB
    frames, no request deadline): the app itself refuses an oversized frame (1009), an
    oversized or a trickled body (413, 408), and a Host it does not serve (400)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "TWILIO_AUTH_TOKEN": TEST_AUTH_TOKEN,
        "GEMINI_API_KEY": "factory-test-key-0123456789",
        "PUBLIC_URL": base,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/calls.db",
        "RECORDINGS_DIR": str(tmp_path / "rec"),
        "SPOOL_DIR": str(tmp_path / "spool"),
        "REQUEST_TIMEOUT": "1",
        "LOG_FORMAT": "json",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "livecall.server.app:app_from_env",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(trust_env=False) as http:

            async def healthy() -> bool:
                assert proc.returncode is None, "uvicorn exited"
                try:
                    return (await http.get(base + "/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(healthy, within=30)
            evil = await http.get(base + "/health", headers={"Host": "evil.example"})
            assert evil.status_code == 400
            big = await http.post(
                base + "/twiml", content=b"a" * (65 * 1024), headers={"X-Twilio-Signature": "x"}
            )
            assert big.status_code == 413
        ws = await open_stream(base)
        with pytest.raises(websockets.ConnectionClosed):
            await ws.send("x" * (2 << 20))
            async with asyncio.timeout(10):
                await ws.recv()
        assert ws.close_code == 1009, ws.close_code
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST /twiml HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Length: 100\r\n\r\na".encode()
        )
        await writer.drain()
        response = await read_until_closed(reader, 5)
        writer.close()
        assert status_of(response) == 408, response[:200]
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# --------------------------------------------------------------------------- pending per client


async def test_one_client_cannot_hold_more_than_its_share_of_pending_sockets(
    make_stack,
) -> None:
    """MAX_PENDING_PER_CLIENT streams that never `start`: the next one from that address is
    refused (429), X-Forwarded-For from an untrusted peer does not make it another client,
    another address still gets in, and a closed socket frees its place."""
    stack = await make_stack(max_pending_per_client=3)
    held = [
        await open_stream(stack.base_url, **{"X-Forwarded-For": f"198.51.100.{i}"})
        for i in range(3)
    ]
    for xff in ("198.51.100.99", None):
        extra = {"X-Forwarded-For": xff} if xff else {}
        with pytest.raises(websockets.InvalidStatus) as refused:
            await open_stream(stack.base_url, **extra)
        assert refused.value.response.status_code == 429
    async with httpx.AsyncClient(trust_env=False) as http:  # plain requests count too
        assert (await http.get(stack.base_url + "/health")).status_code == 429
    other = await open_stream(stack.base_url, source="127.0.0.2")
    await held[0].close()

    async def place_again() -> websockets.ClientConnection | None:
        try:
            return await open_stream(stack.base_url)
        except websockets.InvalidStatus:
            return None

    again = await eventually(place_again, within=5)
    for ws in (*held[1:], other, again):
        await ws.close()
    assert stack.gemini.sessions == []


async def test_a_started_call_no_longer_counts_as_pending(make_stack, call_over) -> None:
    """With room for one pending connection, a call in progress does not take it: the
    webhook is answered and the stream, once its `start` checked out, is a call."""
    stack = await make_stack(max_pending_per_client=1)
    call = asyncio.create_task(stack.caller([Pause(2500)]).run())

    async def in_call() -> bool:
        return bool(stack.registry.active)

    await eventually(in_call, within=10)
    ws = await open_stream(stack.base_url)  # the call holds no pending place
    await ws.close()
    result = await call
    assert result.stream_sid is not None and not result.rejected
    await call_over(stack)


# --------------------------------------------------------------------------- Host and local


async def test_dns_rebinding_is_refused_on_api_dashboard_and_drain(make_stack) -> None:
    """A page on evil.example resolving to 127.0.0.1: its requests say `Host: evil.example`
    (400 everywhere while PUBLIC_URL names our host) and, without any Host configured, local
    trust still refuses them; a foreign Origin is refused too."""
    strict = await make_stack(api_local_only=True, admin_token=ADMIN)
    loose = await make_stack(api_local_only=True, admin_token=ADMIN, public_url=None)
    evil = {"Host": "evil.example"}
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as http:
        for path, method in (("/api/calls", "GET"), ("/login", "POST"), ("/admin/drain", "POST")):
            response = await http.request(method, strict.base_url + path, headers=evil)
            assert response.status_code == 400, path
        b = loose.base_url
        assert (await http.get(b + "/api/calls", headers=evil)).status_code == 403
        assert (await http.post(b + "/login", headers=evil)).status_code == 401
        assert (await http.get(b + "/live", headers=evil)).status_code == 303  # no session
        assert (await http.post(b + "/admin/drain", headers=evil)).status_code == 401
        foreign = {"Origin": "http://evil.example"}
        assert (await http.get(b + "/api/calls", headers=foreign)).status_code == 403
        drain = await http.post(b + "/admin/drain", headers={**foreign, **bearer})
        assert drain.status_code == 403
        # the real thing: this machine, our host, no foreign origin
        assert (await http.get(b + "/api/calls")).status_code == 200
    assert not strict.registry.draining and not loose.registry.draining


async def test_login_throttle_is_per_client_through_trusted_proxies_only(make_stack) -> None:
    """Ten wrong tokens lock out that client, not everyone behind the same proxy; and a
    client that sends X-Forwarded-For itself (no trusted proxy) cannot dodge its bucket."""
    direct = await make_stack(api_token=API)
    proxied = await make_stack(api_token=API, trusted_proxies=["127.0.0.1"])
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as http:

        async def login(base: str, token: str, xff: str) -> int:
            response = await http.post(
                base + "/login", data={"token": token}, headers={"X-Forwarded-For": xff}
            )
            return response.status_code

        for i in range(10):
            assert await login(direct.base_url, "guess", f"198.51.100.{i}") == 401
        assert await login(direct.base_url, API, "198.51.100.200") == 429
        for _ in range(10):
            assert await login(proxied.base_url, "guess", "203.0.113.1") == 401
        assert await login(proxied.base_url, API, "203.0.113.1") == 429
        assert await login(proxied.base_url, API, "203.0.113.2") == 303


# --------------------------------------------------------------------------- drain


async def test_drain_wants_the_admin_token_and_can_be_cancelled(make_stack, call_over) -> None:
    """Loopback is not enough (a sidecar is on loopback): no token 401, a wrong one 401; the
    right one drains (busy answers, /ready 503); DELETE cancels: /ready 200, calls admitted."""
    stack = await make_stack(admin_token=ADMIN)
    untokened = await make_stack()
    base = stack.base_url
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.post(base + "/admin/drain")).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        assert (await http.post(base + "/admin/drain", headers=wrong)).status_code == 401
        assert (await http.post(untokened.base_url + "/admin/drain")).status_code == 403
        assert not stack.registry.draining and not untokened.registry.draining
        bearer = {"Authorization": f"Bearer {ADMIN}"}
        assert (await http.post(base + "/admin/drain", headers=bearer)).status_code == 202
        assert (await http.get(base + "/ready")).status_code == 503
        busy = await stack.caller([Pause(100)]).run()
        assert busy.stream_sid is None
        assert (await http.delete(base + "/admin/drain")).status_code == 401
        assert (await http.delete(base + "/admin/drain", headers=bearer)).status_code == 200
        assert (await http.get(base + "/ready")).status_code == 200
    result = await stack.caller([Pause(300)]).run()
    assert result.stream_sid is not None and not result.rejected
    await call_over(stack)


@pytest.mark.timeout(90)
async def test_serve_drains_over_the_admin_socket_without_a_token(tmp_path: Path) -> None:
    """`livecall serve` with ADMIN_SOCKET: the socket is 0600 and drains without a token;
    over TCP the same request without a token is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    admin_socket = tmp_path / "admin.sock"
    async with FakeGeminiServer() as gemini:
        env = {
            **os.environ,
            "GEMINI_API_KEY": "serve-test-key-0123456789",
            "GEMINI_BASE_URL": gemini.base_url,
            "GEMINI_CA_FILE": str(gemini.ca_file),
            "TWILIO_AUTH_TOKEN": TEST_AUTH_TOKEN,
            "PUBLIC_URL": base,
            "PORT": str(port),
            "ADMIN_SOCKET": str(admin_socket),
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/calls.db",
            "RECORDINGS_DIR": str(tmp_path / "rec"),
            "SPOOL_DIR": str(tmp_path / "spool"),
            "LOG_FORMAT": "json",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "livecall.cli", "serve", "--host", "127.0.0.1",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            async with httpx.AsyncClient(trust_env=False) as http:

                async def healthy() -> bool:
                    assert proc.returncode is None, "livecall serve exited"
                    try:
                        return (await http.get(base + "/health")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(healthy, within=30)
                assert (await http.post(base + "/admin/drain")).status_code == 403  # no token
            assert admin_socket.stat().st_mode & 0o777 == 0o600
            transport = httpx.AsyncHTTPTransport(uds=str(admin_socket))
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as uds:
                assert (await uds.post("/admin/drain")).status_code == 202
                assert (await uds.get("/ready")).status_code == 503
                assert (await uds.delete("/admin/drain")).status_code == 200
                assert (await uds.get("/ready")).status_code == 200
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 20)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    assert not admin_socket.exists()


async def test_a_slow_second_request_on_a_kept_alive_connection_is_cut(make_stack) -> None:
    """The deadline holds for every request of a connection, not only the first: after one
    quick answer, half a request's headers and then nothing get the connection closed."""
    stack = await make_stack(request_timeout_s=1.0)
    reader, writer = await asyncio.open_connection(*host_port(stack.base_url))
    host = stack.base_url.removeprefix("http://")
    writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert status_of(head) == 200
    length = int(Headers(raw=[
        tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:] if b": " in line
    ]).get("content-length", "0"))  # fmt: skip
    await reader.readexactly(length)
    writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\n".encode())  # and never the end
    await writer.drain()
    loop = asyncio.get_running_loop()
    began = loop.time()
    response = await read_until_closed(reader, 6)
    writer.close()
    assert response == b"" or status_of(response) == 408, response[:200]
    assert loop.time() - began < 3.0


async def test_an_operators_drain_can_be_cancelled_a_sigterm_drain_cannot() -> None:
    registry = CallRegistry(10)
    drain = Drain(registry, deadline_s=30.0)
    drain.start("admin")
    assert registry.draining and drain.active
    assert await drain.cancel()
    assert not registry.draining and not drain.active and drain.task is None
    drain.start("admin")
    task = drain.start("signal")  # SIGTERM during an operator's drain: it is final now
    assert not await drain.cancel() and registry.draining
    await task  # no calls: the drain is over at once
    await drain.stop()


async def test_a_unix_socket_other_than_admin_socket_is_not_local(tmp_path: Path) -> None:
    """`uvicorn --uds` behind a public proxy: every request arrives on a Unix socket, and
    none of them is thereby local: no drain without the token, no local-only API."""
    settings = Settings(
        twilio_auth_token=TEST_AUTH_TOKEN,
        public_url="https://calls.example.com",
        api_local_only=True,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/calls.db",
        recordings_dir=tmp_path / "rec",
        spool_dir=tmp_path / "spool",
    )
    app = create_app(settings)
    path = tmp_path / "app.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0))  # type: ignore[arg-type]
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:

        async def started() -> bool:
            assert not serving.done(), "server stopped"
            return server.started

        await eventually(started, within=10)
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://calls.example.com"
        ) as http:
            assert (await http.get("/health")).status_code == 200
            assert (await http.post("/admin/drain")).status_code == 403
            assert (await http.get("/api/calls")).status_code == 403
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
    assert not app.state.livecall.registry.draining
