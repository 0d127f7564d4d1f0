"""The null bridge: the load benchmark's floor.

A server that speaks exactly the Twilio side livecall speaks (the voice webhook answered with
`<Connect><Stream>`, then the Media Stream WebSocket) on the same stack (uvicorn, the same
WebSocket settings) and sends each caller media frame straight back: no model, no codec, no
resampling, no call records. What the caller hears from it is what the harness, the
machine and the web stack cost; livecall's figures are read next to these, from the same run.

Like the echo model used against livecall, it returns only audio: a frame whose payload is
the caller's silence is not sent back, so silence never queues ahead of a probe at the ear.
It samples its own event-loop lag into the same metrics livecall exposes (`/metrics`).

    python -m livecall.bench.null_bridge --host 127.0.0.1 --port 8099
"""

from __future__ import annotations

import argparse
import base64
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from livecall.metrics import LoopLagMonitor, Metrics, metrics_response

__all__ = ["create_null_app", "main"]

_SILENCE_B64 = base64.b64encode(b"\xff" * 160).decode()


def create_null_app(public_url: str) -> Starlette:
    """The null bridge's ASGI app; `public_url` names the Stream URL in the TwiML."""
    ws_url = public_url.replace("http", "ws", 1).rstrip("/") + "/ws/twilio"
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<Response><Connect><Stream url="{ws_url}"/></Connect></Response>'
    )
    metrics = Metrics()
    lag = LoopLagMonitor(metrics)

    async def voice(_: Request) -> Response:
        return Response(twiml, media_type="application/xml")

    async def health(_: Request) -> Response:
        return PlainTextResponse("ok")

    async def prometheus(_: Request) -> Response:
        body, ctype = metrics_response(metrics)
        return Response(body, media_type=ctype)

    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        head = ""
        try:
            while True:
                text = await ws.receive_text()
                msg: dict[str, Any] = orjson.loads(text)
                event = msg.get("event")
                if event == "media":
                    payload = msg["media"]["payload"]
                    if payload != _SILENCE_B64:
                        await ws.send_text(head + payload + '"}}')
                elif event == "start":
                    sid = orjson.dumps(msg["streamSid"]).decode()
                    head = '{"event":"media","streamSid":' + sid + ',"media":{"payload":"'
                elif event == "stop":
                    break
        except WebSocketDisconnect:
            return
        await ws.close()

    @asynccontextmanager
    async def lifespan(_: Starlette) -> Any:
        lag.start()
        yield
        await lag.stop()

    return Starlette(
        routes=[
            Route("/twiml", voice, methods=["POST"]),
            Route("/health", health),
            Route("/metrics", prometheus),
            WebSocketRoute("/ws/twilio", stream),
        ],
        lifespan=lifespan,
    )


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m livecall.bench.null_bridge")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8099)
    p.add_argument("--public-url", default=None)
    p.add_argument(
        "--ws",
        default="auto",
        choices=("auto", "websockets", "websockets-sansio", "wsproto"),
        help="uvicorn's WebSocket implementation (livecall runs on websockets-sansio)",
    )
    a = p.parse_args(argv)
    app = create_null_app(a.public_url or f"http://{a.host}:{a.port}")
    uvicorn.run(
        app,
        host=a.host,
        port=a.port,
        ws=a.ws,
        ws_max_size=1 << 20,
        ws_ping_interval=20.0,
        ws_ping_timeout=60.0,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
