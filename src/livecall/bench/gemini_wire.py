"""Per-frame cost of Gemini Live traffic: the SDK's message objects vs `live_protocol`.

Sending: `AsyncSession.send_realtime_input(audio=Blob)` (converter + json.dumps) against
`live_protocol.audio_message`. Receiving: what `AsyncSession._receive` does per frame
(json.loads + converter + `LiveServerMessage` validation) against
`live_protocol.parse_server_message`. The socket itself is left out of both: it costs the
same either way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from google.genai import live as genai_live
from google.genai import types
from rich.console import Console
from rich.table import Table

from livecall.agent import live_protocol as lp


class _SinkSocket:
    """Stands in for the session's WebSocket: keeps nothing, costs nothing."""

    async def send(self, _data: Any) -> None:
        return None


def _time_us(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def run_gemini_wire_benchmark(n: int = 20000, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    pcm16k = bytes(640)  # 20 ms at 16 kHz
    pcm24k = bytes(960)  # 20 ms at 24 kHz
    frame = json.dumps(
        {
            "serverContent": {
                "modelTurn": {
                    "parts": [
                        {
                            "inlineData": {
                                "mimeType": "audio/pcm;rate=24000",
                                "data": base64.b64encode(pcm24k).decode(),
                            }
                        }
                    ]
                }
            }
        }
    ).encode()

    from google.genai import _live_converters as conv

    def sdk_parse() -> Any:
        response = json.loads(frame)
        response_dict = conv._LiveServerMessage_from_mldev(response)
        return types.LiveServerMessage._from_response(response=response_dict, kwargs={})

    def raw_parse() -> Any:
        return lp.parse_server_message(frame)

    session = genai_live.AsyncSession.__new__(genai_live.AsyncSession)
    # Stand-ins, so the SDK's send path is timed without a socket or an API client.
    session._ws = _SinkSocket()  # type: ignore[assignment]

    class _Api:
        vertexai = False

    session._api_client = _Api()  # type: ignore[assignment]
    loop = asyncio.new_event_loop()
    blob = types.Blob(data=pcm16k, mime_type="audio/pcm;rate=16000")

    def sdk_send() -> Any:
        coro = session.send_realtime_input(audio=blob)
        with contextlib.suppress(StopIteration):
            coro.send(None)

    def raw_send() -> Any:
        return lp.audio_message(pcm16k)

    results: dict[str, Any] = {}
    rows = [
        ("receive 20 ms audio (SDK LiveServerMessage)", sdk_parse),
        ("receive 20 ms audio (live_protocol)", raw_parse),
        ("send 20 ms audio (SDK send_realtime_input)", sdk_send),
        ("send 20 ms audio (live_protocol)", raw_send),
    ]
    table = Table(title="Gemini Live per-frame cost (µs, socket excluded)")
    table.add_column("path")
    table.add_column("median µs", justify="right")
    table.add_column("p99 µs", justify="right")
    for name, fn in rows:
        for _ in range(500):
            fn()
        med, p99 = _time_us(fn, n)
        results[name] = {"median_us": round(med, 2), "p99_us": round(p99, 2)}
        table.add_row(name, f"{med:.1f}", f"{p99:.1f}")
    loop.close()
    console.print(table)
    return results


if __name__ == "__main__":
    run_gemini_wire_benchmark()
