"""What durable records cost the call path: the writer's per-record cost, and the event loop
while hundreds of calls spool to disk during a database outage.

python bench/durability.py               # 200 calls, 10 records/s each, 10 s
python bench/durability.py --calls 500 --seconds 5

1. Per record, on the event loop: `observer.event()` with the database up (queued for the
   next batch) and down (held for the spool task). No I/O happens on the loop in either case.
2. An outage: N calls each record an event every 100 ms; every record is appended and fsynced
   by the spool task in a worker thread, many calls' records per fsync. Printed: records and
   fsyncs per second, the time from a record to its fsync (p50/p99/max), and the event loop's
   lag (how late a 5 ms timer fires) against the same run with the database up.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from livecall.records import CallEventRecord, CallInfo
from livecall.settings import Settings
from livecall.store import db
from livecall.store import writer as writer_module
from livecall.store.writer import CallStore

DEAD = "postgresql+asyncpg://postgres@127.0.0.1:1/bench"
T0 = datetime(2025, 3, 1, tzinfo=UTC)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


async def per_record_cost(home: Path, url: str, n: int = 20_000) -> float:
    store = CallStore(
        Settings(database_url=url, spool_dir=home / "spool-cost"), migrate=False, write_timeout_s=5
    )
    await store.start()
    try:
        if url == DEAD:
            await store.flush()  # learn that it is down
        obs = store.observer("CACOST")
        record = CallEventRecord("CACOST", 0, "dtmf", {"digits": "5"})
        t0 = time.perf_counter()
        for i in range(n):
            record.at_ms = i
            obs.event(record)
            if i % 500 == 499:
                await asyncio.sleep(0)  # let the writer tasks run, as between frames
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        await store.close(timeout=5)


async def outage(home: Path, url: str, calls: int, seconds: float) -> dict[str, float]:
    store = CallStore(
        Settings(database_url=url, spool_dir=home / f"spool-{calls}-{url[:6]}"),
        migrate=False,
        write_timeout_s=5,
        memory_limit=1_000_000,
    )
    await store.start()
    if url == DEAD:
        await store.flush()
    appends = 0
    real_append = writer_module.SpoolFile.append

    def counting(self: writer_module.SpoolFile, ops: list, room: int | None = None) -> int:
        nonlocal appends
        appends += 1
        return real_append(self, ops, room)

    writer_module.SpoolFile.append = counting  # type: ignore[method-assign]
    lags: list[float] = []
    to_disk: list[float] = []
    stop = asyncio.Event()
    watchers: list[asyncio.Task[None]] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(0.005)
            lags.append((loop.time() - t - 0.005) * 1000)

    async def call(i: int) -> None:
        sid = f"CABENCH{i:06d}"
        obs = store.observer(sid)
        obs.call_started(CallInfo(sid, "MZ" + sid, T0))
        seq = 0
        await asyncio.sleep((i % 100) / 1000)
        while not stop.is_set():
            obs.event(CallEventRecord(sid, seq, "dtmf", {"digits": "1"}))
            seq += 1
            if url == DEAD:
                watchers.append(asyncio.create_task(on_disk(sid, time.perf_counter())))
            await asyncio.sleep(0.1)

    async def on_disk(sid: str, t: float) -> None:
        await store.settled(sid, timeout=10)
        to_disk.append((time.perf_counter() - t) * 1000)

    tick = asyncio.create_task(ticker())
    tasks = [asyncio.create_task(call(i)) for i in range(calls)]
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, tick)
    await asyncio.gather(*watchers)
    elapsed = time.perf_counter() - t0
    writer_module.SpoolFile.append = real_append  # type: ignore[method-assign]
    ops = store.spooled if url == DEAD else store.written + len(store._pending)
    await store.close(timeout=10)
    return {
        "records/s": ops / elapsed,
        "fsyncs/s": appends / elapsed,
        "to_disk_p50_ms": pct(to_disk, 50),
        "to_disk_p99_ms": pct(to_disk, 99),
        "to_disk_max_ms": max(to_disk, default=float("nan")),
        "lag_p50_ms": pct(lags, 50),
        "lag_p99_ms": pct(lags, 99),
        "lag_max_ms": max(lags, default=float("nan")),
    }


async def main_async(calls: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="livecall-bench-") as tmp:
        home = Path(tmp)
        up = f"sqlite+aiosqlite:///{home / 'calls.db'}"
        engine = db.make_engine(up)
        await db.upgrade(engine)
        await engine.dispose()
        print("per record on the event loop (observer.event):")
        print(f"  database up   {await per_record_cost(home, up):6.2f} µs")
        print(f"  database down {await per_record_cost(home, DEAD):6.2f} µs (held for the spool)")
        for label, url in (("database up (SQLite)", up), ("database down (spool)", DEAD)):
            r = await outage(home, url, calls, seconds)
            print(f"{calls} calls, {label}:")
            print(
                f"  {r['records/s']:.0f} records/s, {r['fsyncs/s']:.0f} fsyncs/s"
                + (
                    f", record -> on disk p50 {r['to_disk_p50_ms']:.1f} ms"
                    f" p99 {r['to_disk_p99_ms']:.1f} ms max {r['to_disk_max_ms']:.1f} ms"
                    if url == DEAD
                    else ""
                )
            )
            print(
                f"  event loop lag p50 {r['lag_p50_ms']:.2f} ms p99 {r['lag_p99_ms']:.2f} ms"
                f" max {r['lag_max_ms']:.2f} ms"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main_async(args.calls, args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
