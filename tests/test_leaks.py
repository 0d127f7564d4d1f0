"""No secrets or personal data where they do not belong (issue 11, item 7).

Secrets: every credential setting is registered for redaction at startup (the database and
Redis passwords inside their URLs too), and redaction holds on the stdlib logging chain, the
tracebacks uvicorn and asyncio log included. Personal data: keypad digits are masked in log
lines, call events and spans, transcript text stays out of log lines (both unless asked for),
recordings and spool files are readable by their owner only. Operations: `/metrics` and the
API docs can be closed. Everything runs against the real app under uvicorn, over sockets.
"""

from __future__ import annotations

import asyncio
import io
import logging
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import structlog
from fastapi import FastAPI
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

import livecall.log
from livecall.privacy import DTMF_MASK, keypad, mask_number, transcript_fields
from livecall.server.app import create_app
from livecall.settings import Settings, url_password
from livecall.sim.gemini import Scenario
from livecall.sim.stack import TEST_AUTH_TOKEN, LocalStack
from livecall.sim.twilio import HangUp, Pause, PressDigit, WaitForAgentSilence
from livecall.store.writer import SpoolFile
from livecall.tracing import configure_tracing, shutdown_tracing
from support import say

FAST = {"vad_silence_duration_ms": 300}
DB_PASSWORD = "db-Pass-5e1f0c7a9b"
REDIS_PASSWORD = "redis-Pass-8d2c4e6a1f"
# nothing listens on port 1: the store and the cluster fail, and log why
DATABASE_URL = f"postgresql+asyncpg://livecall:{DB_PASSWORD}@127.0.0.1:1/calls"
REDIS_URL = f"redis://default:{REDIS_PASSWORD}@127.0.0.1:1/0"
METRICS_TOKEN = "metrics-TOKEN-2b7e9a4c"
API_TOKEN = "api-TOKEN-6f3d8b1e"


def model(seed: int, **kw: Any) -> Scenario:
    kw.setdefault("first_audio_delay", 0.2)
    return Scenario(seed=seed, greeting=None, pause_prob=0.0, **kw)


@pytest.fixture
def capture_logs() -> Iterator[Callable[..., io.StringIO]]:
    """`capture_logs(fmt, secrets)`: the process's log lines from then on, rendered as
    `livecall serve` renders them (`configure_logging`), into a buffer. Logging is global:
    all of it is put back after the test."""
    saved_config = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_secrets = set(livecall.log._secrets)

    def capture(fmt: str = "json", secrets: tuple[str, ...] = ()) -> io.StringIO:
        livecall.log.configure_logging("info", fmt, secrets=secrets)
        buffer = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buffer)
        return buffer

    try:
        yield capture
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_config)
        livecall.log._secrets.clear()
        livecall.log._secrets.update(saved_secrets)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert configure_tracing(exporter=exporter)
    try:
        yield exporter
    finally:
        shutdown_tracing()


def json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]


# --------------------------------------------------------------------------- secrets


def test_every_credential_setting_is_a_secret() -> None:
    settings = Settings(
        database_url=DATABASE_URL,
        redis_url=REDIS_URL,
        api_token=API_TOKEN,
        calls_token="calls-TOKEN-1234",
        metrics_token=METRICS_TOKEN,
        twilio_auth_token=TEST_AUTH_TOKEN,
        gemini_api_key="gemini-KEY-9876",
    )
    shown = repr(settings) + str(settings.model_dump())
    secrets = settings.secret_values()
    for value in (DB_PASSWORD, REDIS_PASSWORD, API_TOKEN, METRICS_TOKEN, TEST_AUTH_TOKEN):
        assert value not in shown
        assert value in secrets
    assert DATABASE_URL in secrets and REDIS_URL in secrets
    assert "calls-TOKEN-1234" in secrets and "gemini-KEY-9876" in secrets
    assert "default" not in secrets and "livecall" not in secrets  # user names are not secret
    # percent-encoded in the URL: both spellings are redacted
    assert url_password("redis://:p%40ss-word@h:6379") == ["p%40ss-word", "p@ss-word"]
    assert url_password("sqlite+aiosqlite:///./livecall.db") == []


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.timeout(40)
async def test_secrets_in_tracebacks_logged_by_uvicorn_asyncio_and_sqlalchemy_are_redacted(
    capture_logs, tmp_path: Path, fmt: str
) -> None:
    """An exception whose message quotes the Twilio auth token and the database and Redis
    passwords, raised in a request (uvicorn logs the traceback), handed to asyncio's exception
    handler (as a task nobody awaited is), and logged by SQLAlchemy's loggers with the URL as
    an argument: none of them appears in the process's log output, whichever renderer."""
    logs = capture_logs(fmt)  # as `create_app()` alone sees it: the app registers its secrets
    leaked = f"token={TEST_AUTH_TOKEN} db={DATABASE_URL} redis={REDIS_PASSWORD}"

    def app_with_bugs(settings: Settings) -> FastAPI:
        app = create_app(settings)

        @app.get("/bug")
        async def bug() -> None:
            raise RuntimeError(f"could not connect: {leaked}")

        @app.get("/lost-task")
        async def lost_task() -> dict[str, bool]:
            try:
                raise ConnectionError(f"lost: {leaked}")
            except ConnectionError as exc:
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "Task exception was never retrieved", "exception": exc}
                )
            return {"ok": True}

        return app

    stack = LocalStack(
        scenario=model(81),
        app_factory=app_with_bugs,
        settings_overrides={
            "database_url": DATABASE_URL,
            "redis_url": REDIS_URL,
            "recordings_dir": tmp_path / "rec",
            "spool_dir": tmp_path / "spool",
        },
    )
    await stack.start()
    try:
        async with httpx.AsyncClient(base_url=stack.base_url, trust_env=False) as http:
            answer = await http.get("/bug")
            assert answer.status_code == 500
            assert (await http.get("/lost-task")).status_code == 200
            health = await http.get("/health")
        sqlalchemy_log = logging.getLogger("sqlalchemy.pool.impl.AsyncAdaptedQueuePool")
        try:
            raise OSError(f"connect to {DATABASE_URL} refused")
        except OSError:
            sqlalchemy_log.error(
                "Exception during reset or similar on %s", DATABASE_URL, exc_info=True
            )
    finally:
        await stack.stop()

    text = logs.getvalue()
    for secret in (TEST_AUTH_TOKEN, DB_PASSWORD, REDIS_PASSWORD):
        assert secret not in text, text[text.index(secret) - 300 : text.index(secret) + 50]
        assert secret not in answer.text and secret not in health.text
    # the tracebacks themselves were logged (scrubbed, not dropped)
    assert "Exception in ASGI application" in text and "Traceback" in text
    assert "Task exception was never retrieved" in text and "ConnectionError" in text
    assert "Exception during reset" in text
    assert text.count(livecall.log.REDACTED) >= 6


# --------------------------------------------------------------------------- keypad, transcripts


def test_privacy_helpers() -> None:
    assert keypad("7", keep=False) == DTMF_MASK and keypad("7", keep=True) == "7"
    assert transcript_fields("my PIN is 1234", keep=False) == {"chars": 14}
    assert transcript_fields("hi", keep=True) == {"text": "hi"}
    assert mask_number("+15557654321") == "+*******4321"
    assert mask_number("+44") == "+44" and mask_number(None) == ""


async def _keypad_call(
    make_stack: Any, call_over: Any, seed: int, **settings: Any
) -> tuple[Any, Any, list[Any]]:
    scenario = model(seed, replies={"yes": "one_moment"}, text_replies={"pressed": "goodbye"})
    stack = await make_stack(scenario, **FAST, **settings)
    result = await stack.caller(
        [
            Pause(300),
            PressDigit("7"),
            WaitForAgentSilence(silence_ms=400, timeout=10),
            say("yes"),
            WaitForAgentSilence(silence_ms=400, timeout=10),
            HangUp(),
        ],
        seed=seed,
    ).run()
    await call_over(stack)
    [session] = stack.gemini.sessions
    assert any("pressed 7" in text for text in session.texts), session.texts  # the model knows
    call = await stack.app.state.livecall.store.repo.get_call(result.call_sid)
    assert call is not None and call.turns
    return stack, call, session


@pytest.mark.timeout(60)
async def test_keypad_digits_and_transcripts_stay_out_of_logs_events_and_spans(
    capture_logs, make_stack, call_over, spans: InMemorySpanExporter
) -> None:
    """By default a keypress is '•' in the log line, the call's event and the span event,
    and a turn's log line gives the length of its text, not the text; the model still gets
    the digit and the call records keep the transcript."""
    logs = capture_logs("json")
    _, call, _ = await _keypad_call(make_stack, call_over, 82)

    lines = json_lines(logs)
    assert [line["digit"] for line in lines if line["event"] == "call.dtmf"] == [DTMF_MASK]
    assert [e.data for e in call.events if e.kind == "dtmf"] == [{"digit": DTMF_MASK}]
    [call_span] = [s for s in spans.get_finished_spans() if s.name == "call"]
    assert [dict(e.attributes) for e in call_span.events if e.name == "dtmf"] == [
        {"digit": DTMF_MASK}
    ]
    turn_lines = [line for line in lines if line["event"] == "call.turn"]
    assert len(turn_lines) == len(call.turns) >= 2
    assert all("text" not in line and line["chars"] > 0 for line in turn_lines), turn_lines
    texts = [t.text for t in call.turns if len(t.text) > 8]
    assert texts, [t.text for t in call.turns]  # the records keep the transcript
    for text in texts:
        assert text not in logs.getvalue()


@pytest.mark.timeout(60)
async def test_log_dtmf_and_log_transcripts_keep_them_when_asked(
    capture_logs, make_stack, call_over, spans: InMemorySpanExporter
) -> None:
    logs = capture_logs("json")
    _, call, _ = await _keypad_call(make_stack, call_over, 83, log_dtmf=True, log_transcripts=True)
    lines = json_lines(logs)
    assert [line["digit"] for line in lines if line["event"] == "call.dtmf"] == ["7"]
    assert [e.data for e in call.events if e.kind == "dtmf"] == [{"digit": "7"}]
    [call_span] = [s for s in spans.get_finished_spans() if s.name == "call"]
    assert [e.attributes["digit"] for e in call_span.events if e.name == "dtmf"] == ["7"]
    logged = {line["text"] for line in lines if line["event"] == "call.turn"}
    assert logged and logged <= {t.heard_text if t.interrupted else t.text for t in call.turns}


# --------------------------------------------------------------------------- files


@pytest.mark.timeout(40)
async def test_recordings_and_spool_files_are_for_their_owner_only(
    make_stack, call_over, tmp_path: Path
) -> None:
    stack = await make_stack(model(84, replies={"yes": "one_moment"}), **FAST)
    result = await stack.caller(
        [Pause(200), say("yes"), WaitForAgentSilence(silence_ms=400, timeout=10), HangUp()],
        seed=84,
    ).run()
    await call_over(stack)
    recording = await stack.app.state.livecall.recordings.open(result.call_sid)
    assert recording is not None and recording.path is not None
    assert stat.S_IMODE(recording.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(recording.path.parent.stat().st_mode) == 0o700

    spool = SpoolFile.create(tmp_path / "spool-here")
    try:
        spool.append([{"op": "event", "call_sid": "CA1", "data": {"text": "my address"}}])
        assert stat.S_IMODE(spool.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(spool.path.parent.stat().st_mode) == 0o700
    finally:
        spool.close()


# --------------------------------------------------------------------------- /metrics, docs


@pytest.fixture
async def ops_stack(make_stack: Any) -> LocalStack:
    return await make_stack(model(85), metrics_token=METRICS_TOKEN, api_token=API_TOKEN)


async def test_metrics_need_metrics_token_when_set(ops_stack: LocalStack) -> None:
    async with httpx.AsyncClient(base_url=ops_stack.base_url, trust_env=False) as http:
        anonymous = await http.get("/metrics")
        wrong = await http.get("/metrics", headers={"Authorization": f"Bearer {API_TOKEN}"})
        right = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert anonymous.status_code == 401 and "livecall_" not in anonymous.text
    assert wrong.status_code == 401
    assert right.status_code == 200 and "livecall_active_calls" in right.text


async def test_api_docs_are_not_public_by_default(ops_stack: LocalStack) -> None:
    async with httpx.AsyncClient(base_url=ops_stack.base_url, trust_env=False) as http:
        for path in ("/docs", "/redoc"):
            assert (await http.get(path)).status_code == 404, path
        assert (await http.get("/openapi.json")).status_code == 401
        schema = await http.get("/openapi.json", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert schema.status_code == 200 and "/api/calls" in schema.json()["paths"]


async def test_docs_public_serves_them_to_anyone(make_stack: Any) -> None:
    stack = await make_stack(model(86), docs_public=True, metrics_token=SecretStr("m-TOKEN-1"))
    async with httpx.AsyncClient(base_url=stack.base_url, trust_env=False) as http:
        assert (await http.get("/docs")).status_code == 200
        assert (await http.get("/openapi.json")).status_code == 200
        assert (await http.get("/metrics")).status_code == 401


def test_uvicorn_s_own_logging_config_cannot_route_around_the_redaction(capture_logs) -> None:
    """A uvicorn.Config made without log_config=None (a library, a simulator) installs
    uvicorn's logging config: handlers of its own that do not propagate. Configuring
    livecall's logging puts every uvicorn record back through the redacting root handler."""
    import logging.config

    from uvicorn.config import LOGGING_CONFIG

    logging.config.dictConfig(LOGGING_CONFIG)
    error_log = logging.getLogger("uvicorn.error")
    assert error_log.handlers or not logging.getLogger("uvicorn").propagate
    logs = capture_logs("json", (TEST_AUTH_TOKEN,))
    try:
        raise RuntimeError(f"could not connect: {TEST_AUTH_TOKEN}")
    except RuntimeError:
        error_log.exception("Exception in ASGI application")
    text = logs.getvalue()
    assert "Exception in ASGI application" in text and "Traceback" in text
    assert TEST_AUTH_TOKEN not in text
