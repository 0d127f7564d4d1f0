"""The load benchmark measures at the ear: a probe's echo counts when it is played, not when it
reaches the socket; and a whole small run (null bridge floor + livecall, real processes)
reports every figure the table shows."""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from livecall.audio.g711 import ulaw_encode
from livecall.bench.ear import REPLY_FRAMES, EarCaller, ear_script
from livecall.bench.load import _hist_stats, run_load_benchmark

BACKLOG_FRAMES = 6  # loud frames queued ahead of each probe's echo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _backlog_app(base: str) -> Starlette:
    """A bridge that answers a probe with a burst: BACKLOG_FRAMES of another tone, then the
    probe, all at once. The probe reaches the socket at once but is heard 120 ms later."""
    t = np.arange(160) / 8000
    other = ulaw_encode((9000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)).tobytes()
    other_b64 = base64.b64encode(other).decode()
    silence_b64 = base64.b64encode(b"\xff" * 160).decode()
    twiml = (
        f'<Response><Connect><Stream url="{base.replace("http", "ws")}/ws"/></Connect></Response>'
    )
    in_reply = 0

    async def voice(_: Request) -> Response:
        return Response(twiml, media_type="application/xml")

    async def stream(ws: WebSocket) -> None:
        nonlocal in_reply
        await ws.accept()
        sid = ""
        try:
            while True:
                msg: dict[str, Any] = orjson.loads(await ws.receive_text())
                if msg["event"] == "start":
                    sid = msg["streamSid"]
                elif msg["event"] == "media" and msg["media"]["payload"] != silence_b64:
                    payloads = [msg["media"]["payload"]]
                    if in_reply == 0:  # the probe: a backlog goes ahead of it
                        payloads = [other_b64] * BACKLOG_FRAMES + payloads
                    in_reply = (in_reply + 1) % (1 + REPLY_FRAMES)
                    for p in payloads:
                        out = {"event": "media", "streamSid": sid, "media": {"payload": p}}
                        await ws.send_text(orjson.dumps(out).decode())
                elif msg["event"] == "stop":
                    break
        except WebSocketDisconnect:
            return

    return Starlette(
        routes=[Route("/twiml", voice, methods=["POST"]), WebSocketRoute("/ws", stream)]
    )


async def test_a_probe_is_timed_when_played_not_when_it_arrives() -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    config = uvicorn.Config(_backlog_app(base), host="127.0.0.1", port=port, log_config=None)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        caller = EarCaller(base, auth_token="t" * 32, timeout=20, script=ear_script(1.2, 240, 0))
        result = await caller.run()
    finally:
        server.should_exit = True
        await serving
    assert result.probes_sent >= 5 and result.probes_lost == 0, result.script_errors
    sock = [ms for _, ms in caller.socket_rtts_ms]
    ear = [ms for _, _, ms in caller.ear_probes]
    assert len(ear) == result.probes_sent
    # at the socket: at once; at the ear: after the backlog played out, 20 ms a frame
    assert max(sock) < 60
    assert min(ear) >= BACKLOG_FRAMES * 20
    assert caller.replies_heard == len(ear)  # each reply heard whole: no underrun
    assert caller.underruns == []
    assert caller.first_audio_at is not None


def test_histogram_quantiles_between_two_scrapes() -> None:
    before = {"h": [(0.001, 10.0), (0.01, 10.0), (0.1, 10.0), (float("inf"), 10.0)]}
    after = {"h": [(0.001, 10.0), (0.01, 60.0), (0.1, 110.0), (float("inf"), 110.0)]}
    stats = _hist_stats(before, after, "h")
    assert stats["n"] == 100
    assert stats["p50"] == pytest.approx(10.0)  # the 50th of 100 is the top of the 1-10 ms bucket
    assert 90 <= stats["p99"] <= 100  # within the 10-100 ms bucket
    assert stats["max_le"] == 100.0


@pytest.mark.timeout(240)
def test_a_small_run_reports_livecall_next_to_the_null_bridge(tmp_path: Path) -> None:
    report = run_load_benchmark(
        [4], hold_s=3.0, ramp_s=0.5, workers=(1,), out_dir=tmp_path, plot=False, quiet=True
    )
    by_target = {lv["target"]: lv for lv in report["levels"]}
    assert set(by_target) == {"null", "livecall"}, report["levels"]
    for lv in by_target.values():
        assert lv["probes_sent_hold"] > 0
        assert lv["probes_back_hold"] == lv["probes_sent_hold"], lv.get("problems")
        assert lv["ear_ms"]["p50"] >= lv["socket_ms"]["p50"]  # played after it arrived
        assert lv["lag_ms_hold"]["n"] > 0  # both servers expose their loop lag
        assert lv["webhook_to_first_audio_ms"]["n"] == 4
        assert lv["server_cpu_pct_core_per_call"] > 0
    assert by_target["livecall"]["setup_ms"]["n"] == 4  # one per call (the warm-up came before)
    assert by_target["null"]["setup_ms"]["n"] == 0  # no model, no setup
    table = (tmp_path / "load.md").read_text()
    assert "null bridge" in table and "livecall x1" in table
