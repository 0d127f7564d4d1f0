"""The call-records REST API: auth, listing, a call's detail, recordings, erasure, stats,
and a schemathesis run against its OpenAPI schema."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import hypothesis
import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from sqlalchemy.pool import NullPool

from livecall.audio.recording import StereoRecorder
from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.server.api import build_api_router
from livecall.server.auth import ApiDisabled
from livecall.settings import Settings
from livecall.store import db
from livecall.store.recordings import LocalRecordingStore
from livecall.store.writer import CallStore

TOKEN = "test-token-3f9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def make_settings(tmp_path: Path, token: str | None = TOKEN, local_only: bool = False) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'api.db'}",
        spool_dir=tmp_path / "spool",
        recordings_dir=tmp_path / "recordings",
        api_token=SecretStr(token) if token else None,
        api_local_only=local_only,
    )


def make_app(store: CallStore, recordings: LocalRecordingStore, settings: Settings) -> FastAPI:
    app = FastAPI(title="livecall")
    app.include_router(build_api_router(store, recordings, settings))
    return app


def record_call(
    store: CallStore,
    sid: str,
    started: datetime,
    from_number: str,
    status: str = "completed",
    latency_ms: float = 600.0,
) -> None:
    obs = store.observer(sid)
    obs.call_started(CallInfo(sid, "MZ" + sid, started, from_number=from_number, to_number="+1800"))
    obs.turn(TurnRecord(sid, 0, "agent", "Hello!", 300, 900))
    obs.turn(TurnRecord(sid, 1, "caller", "Hi, when are you open?", 1200, 2500))
    obs.turn(
        TurnRecord(
            sid,
            2,
            "agent",
            "Nine to five, Monday to Friday.",
            2500 + latency_ms,
            4000,
            interrupted=True,
            heard_text="Nine to five",
            first_audio_latency_ms=latency_ms,
            barge_in_stop_ms=4.0,
        )
    )
    obs.event(CallEventRecord(sid, 3000, "dtmf", {"digits": "5"}))
    obs.call_ended(
        CallSummary(sid, started + timedelta(seconds=30), 30.0, "caller_stop", status=status)  # type: ignore[arg-type]
    )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[CallStore, LocalRecordingStore, Settings]]:
    settings = make_settings(tmp_path)
    store = CallStore(settings)
    await store.start()
    for i in range(12):
        record_call(
            store,
            f"CA{i:03d}",
            T0 + timedelta(minutes=i),
            "+1555" if i % 2 else "+1666",
            status="failed" if i % 4 == 0 else "completed",
            latency_ms=100.0 * (i + 1),
        )
    assert await store.flush()
    yield store, LocalRecordingStore(settings.recordings_dir), settings
    await store.close()


@pytest.fixture
async def client(
    env: tuple[CallStore, LocalRecordingStore, Settings],
) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(*env)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


# --- auth ------------------------------------------------------------------------------------


async def test_no_token_means_no_api(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, token=None)
    store = CallStore(settings)
    with pytest.raises(ApiDisabled, match="LIVECALL_API_TOKEN"):
        build_api_router(store, LocalRecordingStore(tmp_path), settings)
    await store.close()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ],
)
async def test_wrong_or_missing_token_is_401(client: httpx.AsyncClient, headers: dict) -> None:
    for path in ("/api/calls", "/api/calls/CA001", "/api/calls/CA001/recording", "/api/stats"):
        response = await client.get(path, headers=headers)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
    response = await client.delete("/api/calls/CA001", headers=headers)
    assert response.status_code == 401
    assert (await client.get("/api/calls/CA001", headers=AUTH)).status_code == 200


async def test_local_only_serves_loopback_clients_only(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, token=None, local_only=True)
    store = CallStore(settings)
    await store.start()
    try:
        app = make_app(store, LocalRecordingStore(tmp_path), settings)
        for host, expected in (("127.0.0.1", 200), ("::1", 200), ("203.0.113.7", 403)):
            transport = httpx.ASGITransport(app=app, client=(host, 40000))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost:8080"
            ) as client:
                assert (await client.get("/api/calls")).status_code == expected, host
        # a loopback peer, but not a local request: DNS rebinding (Host, Origin), a proxy
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport) as client:
            for url, headers in (
                ("http://evil.example/api/calls", {}),
                ("http://localhost/api/calls", {"Origin": "http://evil.example"}),
                ("http://localhost/api/calls", {"X-Forwarded-For": "203.0.113.7"}),
            ):
                response = await client.get(url, headers=headers)
                assert response.status_code == 403, (url, headers)
    finally:
        await store.close()


async def test_local_only_with_a_token_still_wants_the_token(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, local_only=True)
    store = CallStore(settings)
    app = make_app(store, LocalRecordingStore(tmp_path), settings)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/api/stats")).status_code == 401
    await store.close()


# --- reading ---------------------------------------------------------------------------------


async def test_list_filters_and_pagination(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/calls", params={"limit": 5}, headers=AUTH)
    assert response.status_code == 200
    page = response.json()
    assert page["total"] == 12
    assert [c["call_sid"] for c in page["items"]] == [f"CA{i:03d}" for i in range(11, 6, -1)]
    assert page["items"][0]["status"] == "completed" and page["items"][0]["turn_count"] == 3

    seen = []
    params: dict[str, str | int] = {"limit": 5}
    while True:
        page = (await client.get("/api/calls", params=params, headers=AUTH)).json()
        seen += [c["call_sid"] for c in page["items"]]
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == [f"CA{i:03d}" for i in range(11, -1, -1)]

    page = (await client.get("/api/calls?limit=5&offset=10", headers=AUTH)).json()
    assert [c["call_sid"] for c in page["items"]] == ["CA001", "CA000"]

    page = (await client.get("/api/calls?number=%2B1555&status=completed", headers=AUTH)).json()
    assert {c["call_sid"] for c in page["items"]} == {"CA001", "CA003", "CA005", "CA007"} | {
        "CA009",
        "CA011",
    }
    page = (await client.get("/api/calls?status=failed", headers=AUTH)).json()
    assert {c["call_sid"] for c in page["items"]} == {"CA000", "CA004", "CA008"}
    since = (T0 + timedelta(minutes=3)).isoformat()
    until = (T0 + timedelta(minutes=5)).isoformat()
    page = (
        await client.get("/api/calls", params={"since": since, "until": until}, headers=AUTH)
    ).json()
    assert {c["call_sid"] for c in page["items"]} == {"CA003", "CA004"}
    # a naive time is UTC; another offset is converted
    page = (
        await client.get("/api/calls", params={"since": "2025-03-01T13:10:00+01:00"}, headers=AUTH)
    ).json()
    assert page["total"] == 2

    for bad in ("limit=0", "limit=201", "offset=-1", "status=lost"):
        assert (await client.get(f"/api/calls?{bad}", headers=AUTH)).status_code == 422, bad
    assert (await client.get("/api/calls?cursor=nonsense", headers=AUTH)).status_code == 400


async def test_get_a_call_with_transcript_and_events(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/calls/CA003", headers=AUTH)
    assert response.status_code == 200
    call = response.json()
    assert call["from_number"] == "+1555" and call["to_number"] == "+1800"
    assert call["started_at"].startswith("2025-03-01T12:03:00")
    assert call["answered_at"].startswith("2025-03-01T12:03:00.3")
    assert call["has_recording"] is False
    assert [(t["index"], t["speaker"]) for t in call["turns"]] == [
        (0, "agent"),
        (1, "caller"),
        (2, "agent"),
    ]
    cut = call["turns"][2]
    assert cut["interrupted"] and cut["heard_text"] == "Nine to five"
    assert cut["first_audio_latency_ms"] == 400.0 and cut["barge_in_stop_ms"] == 4.0
    assert call["events"] == [
        {
            "seq": 0,
            "at_ms": 3000,
            "kind": "dtmf",
            "name": None,
            "duration_ms": None,
            "data": {"digits": "5"},
        }
    ]
    assert (await client.get("/api/calls/CA999", headers=AUTH)).status_code == 404
    assert (await client.get("/api/calls/..%2Fetc", headers=AUTH)).status_code in (404, 422)


@pytest.mark.parametrize(
    "sid",
    [
        "v3:u5OAKGEPT3Dx8SZSSDRWEMdNH2OripQhO-IeFNEOQpXqkgrVXGTxQVA",  # Telnyx call control
        "8f1a2b3c-4d5e-6f70-8192-a3b4c5d6e7f8",  # Plivo / Vonage UUID
        "b6cf11111111111111111111111111119",  # Exotel
    ],
)
async def test_every_carriers_call_ids_are_readable(
    env: tuple[CallStore, LocalRecordingStore, Settings], client: httpx.AsyncClient, sid: str
) -> None:
    store = env[0]
    record_call(store, sid, T0, "+1777")
    assert await store.flush()
    response = await client.get(f"/api/calls/{sid}", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["call_sid"] == sid
    too_long = "v3:" + "a" * 62  # beyond the store's 64-character ids
    assert (await client.get(f"/api/calls/{too_long}", headers=AUTH)).status_code == 422


async def test_recording_download_and_delete(
    client: httpx.AsyncClient, env: tuple[CallStore, LocalRecordingStore, Settings]
) -> None:
    _, recordings, _ = env
    assert (await client.get("/api/calls/CA002/recording", headers=AUTH)).status_code == 404

    rec = StereoRecorder()
    rec.add_caller(0, np.full(800, 1000, dtype=np.int16))
    rec.add_agent(0, np.full(400, -1000, dtype=np.int16))
    path = await rec.finish_async(recordings.path_for("CA002", "flac"), "flac")
    await recordings.put("CA002", path)

    response = await client.get("/api/calls/CA002/recording", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/flac"
    assert response.content == await asyncio.to_thread(path.read_bytes)

    response = await client.delete("/api/calls/CA002", headers=AUTH)
    assert response.status_code == 204
    assert not await asyncio.to_thread(path.exists)
    assert (await client.get("/api/calls/CA002", headers=AUTH)).status_code == 404
    assert (await client.get("/api/calls/CA002/recording", headers=AUTH)).status_code == 404
    assert (await client.delete("/api/calls/CA002", headers=AUTH)).status_code == 404
    assert (await client.get("/api/calls", headers=AUTH)).json()["total"] == 11


async def test_stats(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/stats", headers=AUTH)
    assert response.status_code == 200
    stats = response.json()
    assert stats["calls"] == 12
    assert stats["by_status"] == {"completed": 9, "failed": 3}
    assert stats["by_end_reason"] == {"caller_stop": 12}
    assert stats["total_duration_s"] == 360.0 and stats["mean_duration_s"] == 30.0
    assert stats["turns"] == 36 and stats["interrupted_turns"] == 12
    latency = stats["first_audio_latency_ms"]
    assert latency["count"] == 12 and latency["max"] == 1200.0
    assert latency["p50"] == pytest.approx(650.0)  # 100..1200, interpolated
    assert latency["p90"] == pytest.approx(1090.0)
    assert stats["barge_in_stop_ms"]["p99"] == pytest.approx(4.0)
    assert stats["answer_ms"]["p50"] == pytest.approx(300.0)

    failed = (await client.get("/api/stats?status=failed", headers=AUTH)).json()
    assert failed["calls"] == 3 and failed["first_audio_latency_ms"]["count"] == 3


async def test_database_down_is_503_not_500(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    settings.database_url = SecretStr("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    store = CallStore(settings)
    app = make_app(store, LocalRecordingStore(tmp_path), settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        for path in ("/api/calls", "/api/calls/CA1", "/api/stats"):
            assert (await client.get(path, headers=AUTH)).status_code == 503, path
    await store.close()


async def test_openapi_schema(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths) == {
        "/api/calls",
        "/api/calls/{sid}",
        "/api/calls/{sid}/recording",
        "/api/callers/{number}/memory",
        "/api/stats",
    }
    assert set(paths["/api/calls/{sid}"]) == {"get", "delete"}
    assert set(paths["/api/callers/{number}/memory"]) == {"delete"}
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert paths["/api/calls"]["get"]["security"] == [{"HTTPBearer": []}]
    detail = schema["components"]["schemas"]["CallDetail"]["properties"]
    assert {"turns", "events", "custom_parameters", "analysis"} <= set(detail)
    params = {p["name"] for p in paths["/api/calls"]["get"]["parameters"]}
    assert params == {"since", "until", "number", "status", "limit", "cursor", "offset"}


# --- schemathesis ----------------------------------------------------------------------------


@pytest.fixture
def api_schema(tmp_path: Path) -> schemathesis.schemas.BaseSchema:
    """The API over a seeded SQLite file. Schemathesis drives the app from its own event-loop
    thread, so the engine pools nothing (NullPool): each request opens its own connection."""
    settings = make_settings(tmp_path)

    async def seed() -> None:
        async with CallStore(settings) as store:
            for i in range(5):
                record_call(store, f"CA{i:03d}", T0 + timedelta(minutes=i), "+1555")

    asyncio.run(seed())
    engine = db.make_engine(settings.database_url.get_secret_value(), poolclass=NullPool)
    store = CallStore(settings, engine=engine)
    app = make_app(store, LocalRecordingStore(settings.recordings_dir), settings)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize(
    ("mode", "examples"),
    [(GenerationMode.POSITIVE, 25), (GenerationMode.NEGATIVE, 10)],
    ids=["positive", "negative"],
)
def test_api_has_no_server_errors(
    api_schema: schemathesis.schemas.BaseSchema, mode: GenerationMode, examples: int
) -> None:
    """Every operation, with generated valid (and invalid) input: never a 5xx, and every
    response matches the schema. (The schemathesis pytest plugin's lazy fixtures do not
    work with this pytest, so the strategies are driven directly.)"""
    checks = [not_a_server_error]
    if mode is GenerationMode.POSITIVE:
        checks.append(response_schema_conformance)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 6
    strategies = [operation.as_strategy(generation_mode=mode) for operation in operations]
    if mode is GenerationMode.POSITIVE:  # a call that exists, for the detail's 200 response
        strategies += [
            operation.as_strategy(path_parameters={"sid": "CA001"})
            for operation in operations
            if operation.method == "get" and "{sid}" in operation.path
        ]
    for strategy in strategies:

        @hypothesis.given(case=strategy)
        @hypothesis.settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=AUTH, checks=checks)

        run()
