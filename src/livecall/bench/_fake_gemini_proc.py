"""The fake Gemini Live server as a process of its own, for the load benchmark.

`python -m livecall.sim.gemini` only says how many sessions it served. The load benchmark needs
each session's frame counters to tell frames lost on the way from frames never sent, and it
needs the fake on a CPU core budget of its own (a separate process) so the server under test is
not measured together with the simulator. This runner prints the same GEMINI_BASE_URL /
SSL_CERT_FILE lines as the standalone fake, then ``READY``, and when it is told to stop
(SIGTERM, SIGINT, its stdin closing, or `--max-seconds` running out) it writes one JSON file
with every session's counters.

    python -m livecall.bench._fake_gemini_proc --stats-out stats.json [--mode echo]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from livecall.sim.gemini import FakeGeminiServer, Scenario, SessionRecord

__all__ = ["main", "session_counters"]


def session_counters(rec: SessionRecord) -> dict[str, Any]:
    """What the benchmark reads from one session (times: `time.monotonic()`, system-wide)."""
    return {
        "index": rec.index,
        "opened_at": rec.opened_at,
        "closed_at": rec.closed_at,
        "setup_completed": rec.setup_completed,
        "messages_received": rec.messages_received,
        "messages_sent": rec.messages_sent,
        "audio_chunks_received": rec.audio_chunks_received,
        "audio_bytes_received": rec.audio_bytes_received,
        "audio_chunks_sent": rec.audio_chunks_sent,
        "audio_bytes_sent": rec.audio_bytes_sent,
        "close_code": rec.close_code,
        "closed_by": rec.closed_by,
    }


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop when the parent goes away: its end of our stdin closes."""
    with contextlib.suppress(Exception):
        while sys.stdin.readline():
            pass
    loop.call_soon_threadsafe(stop.set)


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    server = FakeGeminiServer(
        args.host,
        args.port,
        scenario=Scenario(
            mode=args.mode, rate=None, seed=args.seed, echo_min_peak=args.echo_min_peak
        ),
        keep_audio=False,
        ca_file=args.ca_file,
        compression=args.compression,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
    started = time.monotonic()
    async with server:
        print(f"GEMINI_BASE_URL={server.base_url}", flush=True)
        if server.ca_file is not None:
            print(f"SSL_CERT_FILE={server.ca_file}", flush=True)
        print("READY", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.max_seconds)
        stopped = time.monotonic()
    return {
        "started_at": started,
        "stopped_at": stopped,
        "sessions": [session_counters(s) for s in server.sessions],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m livecall.bench._fake_gemini_proc")
    p.add_argument("--stats-out", required=True, help="JSON file written on exit")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--mode", choices=("assistant", "echo"), default="echo")
    p.add_argument("--ca-file", default=None, help="write the test CA's PEM here")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--echo-min-peak",
        type=int,
        default=0,
        help="echo mode: echo only chunks this loud (peak |sample|); 0 echoes everything",
    )
    p.add_argument("--max-seconds", type=float, default=900.0, help="stop by itself after this")
    p.add_argument(
        "--compression", action="store_true", help="accept permessage-deflate, as a real server may"
    )
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (a cheaper simulator)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.uvloop:
        import uvloop

        stats = uvloop.run(_serve(args))
    else:
        stats = asyncio.run(_serve(args))
    Path(args.stats_out).write_text(json.dumps(stats), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
