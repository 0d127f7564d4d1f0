"""`CallStore`: keeps every call's records without ever making a call wait for the database.

The bridge talks to one `CallRecordWriter` per call (a `CallObserver`). Its methods turn each
record into a plain JSON-able *op* and append it to the store's queue: O(1), no I/O, and they
never raise. One background task drains the queue in batches, each batch one transaction of
idempotent upserts (see `Repository.apply`).

When the database is slow or down, ops stay in memory; past `memory_limit` they are appended
to a spool file (JSON lines in `settings.spool_dir`, one file per process, held under an
`flock` so another process can tell it is alive). When the database answers again the spool
is replayed first, then the queue, so rows land in the order they happened; replays are
harmless because every write is keyed (call_sid / call_sid+idx / call_sid+seq). Spool files
left by a process that died are claimed and replayed by the next one. `close()` writes what
it can within its timeout and spools the rest, so a graceful shutdown loses nothing.

A batch the database rejects for its *content* (integrity or data errors) is split, and the
ops that still fail go to `rejected.jsonl` beside the spool instead of blocking every call
behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson
import structlog
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.settings import Settings
from livecall.store import db
from livecall.store.repository import Repository

try:  # POSIX: tells a live process's spool file from an orphan
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = structlog.get_logger("livecall.store")

Op = dict[str, Any]

SPOOL_PREFIX = "spool-"
SPOOL_SUFFIX = ".jsonl"
REJECTED_FILE = "rejected.jsonl"

# Column widths in `models`: values are cut to fit rather than rejected by PostgreSQL.
_WIDTHS = {
    "call_sid": 64,
    "stream_sid": 64,
    "account_sid": 64,
    "from_number": 64,
    "to_number": 64,
    "direction": 16,
    "profile": 128,
    "model": 128,
    "status": 16,
    "end_reason": 64,
    "speaker": 16,
    "kind": 32,
    "name": 128,
}
_JSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _clean_str(value: Any, key: str | None = None) -> str | None:
    """Text PostgreSQL accepts (no NUL) and that fits its column."""
    if value is None:
        return None
    text = str(value).replace("\x00", "")
    width = _WIDTHS.get(key or "")
    return text[:width] if width else text


_INT64 = 2**63 - 1


def _big_ints_as_text(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value <= _INT64 else str(value)
    if isinstance(value, dict):
        return {k: _big_ints_as_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_big_ints_as_text(v) for v in value]
    return value


def _dumps(value: Any, option: int | None = _JSON_OPTS) -> bytes:
    """JSON that cannot fail: orjson refuses integers past 64 bits even with `default`."""
    try:
        return orjson.dumps(value, default=str, option=option)
    except TypeError:
        return orjson.dumps(_big_ints_as_text(value), default=str, option=option)


_INT32 = 2**31 - 1
NUMBERING_MEMORY = 10_000  # calls whose record numbering a later stream may continue


def _count(value: Any) -> int:
    """A counter as the database stores it (INTEGER columns: 32 bits on PostgreSQL)."""
    return max(0, min(int(value or 0), _INT32))


def _clean_json(value: Any) -> Any:
    """A detached, JSON-only copy: unknown types become strings, NULs are dropped."""
    raw = _dumps(value)
    if b"\\u0000" in raw:
        raw = raw.replace(b"\\u0000", b"")
    return orjson.loads(raw)


def _number(value: Any) -> float | None:
    """A finite number, or None (NaN would poison averages and percentiles)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def _is_transient(error: BaseException) -> bool:
    """True when the database is unreachable or not ready, False when it refused the data.

    Only integrity and data errors (and bugs in an op) blame the data: a missing table
    (not migrated yet), a lock or a dropped connection all heal by waiting.
    """
    if isinstance(error, sa_exc.IntegrityError | sa_exc.DataError):
        return False
    if isinstance(error, sa_exc.DBAPIError | sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True
    return isinstance(error, OSError | TimeoutError | ConnectionError)


# --- spool files ----------------------------------------------------------------------------


class SpoolFile:
    """One JSON-lines file of ops waiting for the database, read back from `offset`.

    Appends and reads run in worker threads (`asyncio.to_thread`); a lock keeps a late
    append from interleaving with another.
    """

    def __init__(self, path: Path, handle: IO[bytes]) -> None:
        self.path = path
        self._handle = handle
        self._lock = threading.Lock()
        self.offset = 0

    @classmethod
    def create(cls, directory: Path) -> SpoolFile:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / f"{SPOOL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}{SPOOL_SUFFIX}"
        handle = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(path, handle)

    @classmethod
    def claim(cls, path: Path) -> SpoolFile | None:
        """Take over a spool file whose process is gone; None if it is alive or vanished."""
        try:
            handle = path.open("ab")
        except OSError:
            return None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                return None
        if not path.exists():  # replayed and removed by someone else meanwhile
            handle.close()
            return None
        return cls(path, handle)

    def append(self, ops: list[Op]) -> None:
        data = b"".join(_dumps(op) + b"\n" for op in ops)
        with self._lock:
            self._handle.write(data)
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def read(self, max_ops: int) -> tuple[list[Op], list[bytes], int]:
        """Up to `max_ops` ops after `offset`, the unreadable lines, and the offset after them.

        A torn last line (a crash mid-append) is left for later unless the file ends there.
        """
        ops: list[Op] = []
        bad: list[bytes] = []
        with self._lock, self.path.open("rb") as reader:
            reader.seek(self.offset)
            offset = self.offset
            while len(ops) < max_ops:
                line = reader.readline()
                if not line:
                    break
                offset += len(line)
                if not line.strip():
                    continue
                try:
                    op = orjson.loads(line)
                    if not isinstance(op, dict) or "op" not in op or "call_sid" not in op:
                        raise ValueError("not an op")
                    ops.append(op)
                except (orjson.JSONDecodeError, ValueError):
                    bad.append(line)
        return ops, bad, offset

    def remove(self) -> None:
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._handle.close()

    def close(self) -> None:
        with self._lock:
            self._handle.close()


# --- per-call writer ------------------------------------------------------------------------


@dataclass(slots=True)
class _Numbering:
    """One stream's record numbering: turn indexes from `first_turn`, event seqs onwards."""

    first_turn: int = 0
    next_seq: int = 0
    next_turn: int = 0


class CallRecordWriter:
    """The `CallObserver` for one call: turns records into ops and queues them.

    Every method returns at once and swallows its own errors: keeping records must never
    break a call.
    """

    __slots__ = (
        "_answered",
        "_interrupted",
        "_numbering",
        "_started_at",
        "_store",
        "_turns",
        "call_sid",
    )

    def __init__(self, store: CallStore, call_sid: str) -> None:
        self._store = store
        self.call_sid = call_sid
        # A second stream for the same call (Twilio reconnecting) goes on numbering where the
        # first stopped, so it adds to the transcript instead of overwriting it.
        self._numbering = store._numbering_for(call_sid)
        self._started_at: datetime | None = None
        self._answered = False
        self._turns: set[int] = set()
        self._interrupted: set[int] = set()

    def call_started(self, info: CallInfo) -> None:
        try:
            self._started_at = info.started_at
            self._store._put(
                {
                    "op": "start",
                    "call_sid": _clean_str(info.call_sid or self.call_sid, "call_sid"),
                    "stream_sid": _clean_str(info.stream_sid, "stream_sid"),
                    "account_sid": _clean_str(info.account_sid, "account_sid"),
                    "from_number": _clean_str(info.from_number, "from_number"),
                    "to_number": _clean_str(info.to_number, "to_number"),
                    "direction": _clean_str(info.direction, "direction"),
                    "profile": _clean_str(info.profile, "profile"),
                    "model": _clean_str(info.model, "model"),
                    "started_at": _iso(info.started_at),
                    "custom_parameters": _clean_json(dict(info.custom_parameters)),
                }
            )
        except Exception:
            log.exception("call record dropped", call_sid=self.call_sid, record="call_started")

    def turn(self, turn: TurnRecord) -> None:
        try:
            sid = _clean_str(turn.call_sid or self.call_sid, "call_sid")
            op = {
                "op": "turn",
                "call_sid": sid,
                "idx": self._numbering.first_turn + int(turn.index),
                "speaker": _clean_str(turn.speaker, "speaker"),
                "text": _clean_str(turn.text) or "",
                "heard_text": _clean_str(turn.heard_text),
                "start_ms": int(turn.start_ms),
                "end_ms": None if turn.end_ms is None else int(turn.end_ms),
                "interrupted": bool(turn.interrupted),
                "first_audio_latency_ms": _number(turn.first_audio_latency_ms),
                "barge_in_stop_ms": _number(turn.barge_in_stop_ms),
            }
            self._store._put(op)
            self._turns.add(op["idx"])
            self._numbering.next_turn = max(self._numbering.next_turn, op["idx"] + 1)
            if op["interrupted"]:
                self._interrupted.add(op["idx"])
            if turn.speaker == "agent" and not self._answered and self._started_at is not None:
                self._answered = True
                answered = self._started_at + timedelta(milliseconds=turn.start_ms)
                self._store._put({"op": "answered", "call_sid": sid, "answered_at": _iso(answered)})
        except Exception:
            log.exception("call record dropped", call_sid=self.call_sid, record="turn")

    def event(self, event: CallEventRecord) -> None:
        try:
            seq = self._numbering.next_seq
            self._numbering.next_seq += 1
            data = _clean_json(event.data) if event.data else {}
            if not isinstance(data, dict):
                data = {"value": data}
            name = data.get("name")
            self._store._put(
                {
                    "op": "event",
                    "call_sid": _clean_str(event.call_sid or self.call_sid, "call_sid"),
                    "seq": seq,
                    "at_ms": int(event.at_ms),
                    "kind": _clean_str(event.kind, "kind"),
                    "name": _clean_str(name, "name") if isinstance(name, str) else None,
                    "duration_ms": _number(data.get("duration_ms")),
                    "data": data,
                }
            )
        except Exception:
            log.exception("call record dropped", call_sid=self.call_sid, record="event")

    def call_ended(self, summary: CallSummary) -> None:
        try:
            self._store._put(
                {
                    "op": "end",
                    "call_sid": _clean_str(summary.call_sid or self.call_sid, "call_sid"),
                    "ended_at": _iso(summary.ended_at),
                    "duration_s": _number(summary.duration_s),
                    "end_reason": _clean_str(summary.end_reason, "end_reason"),
                    "status": _clean_str(summary.status, "status"),
                    "turn_count": _count(summary.turns or len(self._turns)),
                    "interruptions": _count(summary.interruptions or len(self._interrupted)),
                    "frames_in": _count(summary.frames_in),
                    "frames_out": _count(summary.frames_out),
                    "frames_missing": _count(summary.frames_missing),
                    "gemini_sessions": _count(summary.gemini_sessions),
                    "prompt_tokens": _count(summary.prompt_tokens),
                    "response_tokens": _count(summary.response_tokens),
                    "total_tokens": _count(summary.total_tokens),
                    "recording_key": _clean_str(summary.recording_path),
                }
            )
        except Exception:
            log.exception("call record dropped", call_sid=self.call_sid, record="call_ended")


# --- the store ------------------------------------------------------------------------------


class CallStore:
    """Owns the engine, the write queue, the spool and the task that drains them.

    `repo` answers reads (API, CLI). `migrate` (default: only for SQLite, the embedded
    database) brings the schema to head on start; PostgreSQL deployments run
    `livecall db upgrade` instead so several processes never race on DDL.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: AsyncEngine | None = None,
        migrate: bool | None = None,
        memory_limit: int = 20_000,
        batch_size: int = 500,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        write_timeout_s: float = 15.0,
    ) -> None:
        self.settings = settings
        self._owns_engine = engine is None
        self.engine = (
            engine
            if engine is not None
            else db.make_engine(settings.database_url.get_secret_value())
        )
        self.repo = Repository(db.make_sessionmaker(self.engine))
        self.spool_dir = Path(settings.spool_dir)
        self._migrate = db.is_sqlite(str(self.engine.url)) if migrate is None else migrate
        self.memory_limit = memory_limit
        self.batch_size = batch_size
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.write_timeout_s = write_timeout_s

        self._pending: deque[Op] = deque()
        self._numberings: OrderedDict[str, _Numbering] = OrderedDict()
        self._spools: deque[SpoolFile] = deque()  # oldest first; the last may be ours
        self._own_spool: SpoolFile | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[bool]] = []  # flush(): resolved after the next pass
        self._drain_waiters: list[asyncio.Future[None]] = []  # drained(): once nothing is left
        self._force = False
        self._closing = False
        self._closed = False
        self._healthy = True
        self._retry_delay = retry_initial_s
        self._next_try = 0.0
        self.written = 0
        self.spooled = 0
        self.rejected = 0
        self.last_error: str | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate (if asked), claim orphaned spool files, start the drain task.

        Never fails because of the database: a dead one is retried in the background.
        """
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        try:
            for path in await asyncio.to_thread(self._orphans):
                spool = await asyncio.to_thread(SpoolFile.claim, path)
                if spool is not None:
                    log.info("replaying spooled call records", file=str(path))
                    self._spools.append(spool)
        except OSError as error:
            log.warning("cannot read the spool directory", error=str(error))
        if self._migrate:
            # the schema first, so the API can read at once; a dead database is retried later
            try:
                await asyncio.wait_for(db.upgrade(self.engine), self.write_timeout_s)
                self._migrate = False
            except Exception as error:
                log.warning("call records database not migrated yet", error=repr(error))
                self._mark_down(repr(error))
        self._task = asyncio.create_task(self._run(), name="livecall-call-store")
        if self._spools:
            self._force = True
            self._wake.set()

    async def close(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - then it spools
        """Write everything within `timeout` seconds; spool what is left. Idempotent."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                log.warning("call records: database too slow at shutdown, spooling the rest")
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except Exception:  # pragma: no cover - _run handles its own errors
                log.exception("call store task failed")
        if self._pending:
            await self._spool_pending()
        for spool in self._spools:
            spool.close()  # its lock goes with it; the next start() replays it
        self._spools.clear()
        self._own_spool = None
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(False)
        for other in self._drain_waiters:
            if not other.done():
                other.set_result(None)
        self._waiters.clear()
        self._drain_waiters.clear()
        if self._owns_engine:
            await self.engine.dispose()

    async def __aenter__(self) -> CallStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def observer(self, call_sid: str) -> CallRecordWriter:
        """A fresh writer for one call (the bridge's `CallObserver`)."""
        return CallRecordWriter(self, call_sid)

    def _numbering_for(self, call_sid: str) -> _Numbering:
        """Where a new stream of `call_sid` starts numbering its turns and events.

        Remembered for the most recent calls only (bounded): a later stream of the same call
        is seconds away from the previous one, never hours.
        """
        known = self._numberings.pop(call_sid, None)
        numbering = (
            _Numbering()
            if known is None
            else _Numbering(known.next_turn, known.next_seq, known.next_turn)
        )
        self._numberings[call_sid] = numbering
        while len(self._numberings) > NUMBERING_MEMORY:
            self._numberings.popitem(last=False)
        return numbering

    def enqueue(self, op: Op) -> None:
        """Queue a JSON-able op from outside the call writers (the webhook outbox).

        It is kept like a call record (memory, spool, replay) and written after every op
        queued before it; `Repository.apply` must know its ``op`` kind.
        """
        self._put(op)

    async def flush(self) -> bool:
        """Try to write everything now, skipping any retry back-off.

        True when nothing is left in memory or spool files, False when the database is still
        unavailable. Bound it with `asyncio.timeout()` if needed.
        """
        if self._task is None or self._closed or self._task.done():
            return not self._has_work()
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._force = True
        self._wake.set()
        return await asyncio.shield(waiter)

    async def drained(self) -> None:
        """Wait until everything is written, retrying only on the store's own schedule."""
        if not self._has_work() or self._task is None or self._closed:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await asyncio.shield(waiter)

    def health(self) -> dict[str, Any]:
        """Numbers for /health and /metrics."""
        return {
            "healthy": self._healthy,
            "pending": len(self._pending),
            "spooled_files": len(self._spools),
            "written": self.written,
            "spooled": self.spooled,
            "rejected": self.rejected,
            "last_error": self.last_error,
        }

    # --- the queue --------------------------------------------------------------------------

    def _put(self, op: Op) -> None:
        if self._closed:
            self._late(op)
            return
        self._pending.append(op)
        # while the database is down, only the first op (to arm the retry timer) and an
        # overflow (to spool) need the drain task
        if self._healthy or len(self._pending) == 1 or len(self._pending) > self.memory_limit:
            self._wake_soon()

    def _wake_soon(self) -> None:
        loop = self._loop
        if loop is None:
            return  # not started: the first start() drains
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:  # an observer called from another thread
            loop.call_soon_threadsafe(self._wake.set)

    def _late(self, op: Op) -> None:
        """A record after close(): straight to a spool file of its own, so it is not lost."""
        log.warning("call record after the store closed: spooled", call_sid=op.get("call_sid"))
        try:
            spool = SpoolFile.create(self.spool_dir)
            spool.append([op])
            spool.close()
        except OSError:
            log.exception("call record lost", call_sid=op.get("call_sid"))

    # --- draining ---------------------------------------------------------------------------

    def _orphans(self) -> list[Path]:
        if not self.spool_dir.is_dir():
            return []
        mine = {s.path for s in self._spools}
        return sorted(
            (p for p in self.spool_dir.glob(f"{SPOOL_PREFIX}*{SPOOL_SUFFIX}") if p not in mine),
            key=lambda p: p.stat().st_mtime,
        )

    def _has_work(self) -> bool:
        return bool(self._pending or self._spools)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            due = self._healthy or now >= self._next_try
            overflow = not self._healthy and len(self._pending) > self.memory_limit
            urgent = self._closing or self._force or overflow or bool(self._waiters)
            if not urgent and not (due and self._has_work()):
                timeout = None
                if self._has_work():  # unhealthy: wake for the next retry
                    timeout = max(0.0, self._next_try - now)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            waiters, self._waiters = self._waiters, []
            force, self._force = self._force, False
            try:
                if due or force or self._closing:
                    await self._write_all()
                if not self._healthy and (self._closing or len(self._pending) > self.memory_limit):
                    await self._spool_pending()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the drain task die
                log.exception("call store drain pass failed")
                self._mark_down("drain pass failed")
            done = not self._has_work()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(done)
            if done:
                drained, self._drain_waiters = self._drain_waiters, []
                for other in drained:
                    if not other.done():
                        other.set_result(None)
            if self._closing:
                return

    async def _write_all(self) -> None:
        """Spool files first, then the queue, until everything is written or the DB fails."""
        if self._migrate:
            await asyncio.wait_for(db.upgrade(self.engine), self.write_timeout_s * 4)
            self._migrate = False
        while self._spools:
            spool = self._spools[0]
            while True:
                ops, bad, offset = await asyncio.to_thread(spool.read, self.batch_size)
                if bad:
                    await asyncio.to_thread(self._reject_lines, bad, "unreadable spool line")
                if ops and not await self._write(ops):
                    return
                spool.offset = offset
                if not ops and not bad:
                    break
            if spool is self._own_spool:
                self._own_spool = None
            self._spools.popleft()
            await asyncio.to_thread(spool.remove)
            for path in await asyncio.to_thread(self._orphans):  # another process died?
                claimed = await asyncio.to_thread(SpoolFile.claim, path)
                if claimed is not None:
                    self._spools.append(claimed)
        while self._pending:
            batch = [self._pending[i] for i in range(min(self.batch_size, len(self._pending)))]
            if not await self._write(batch):
                return
            for _ in batch:
                self._pending.popleft()

    async def _write(self, ops: list[Op]) -> bool:
        """One batch; False (and the store marked down) when the database is unavailable."""
        try:
            await asyncio.wait_for(self.repo.apply(ops), self.write_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if _is_transient(error):
                self._mark_down(repr(error))
                return False
            if len(ops) > 1:
                for op in ops:  # find the op the database refuses; write the rest
                    if not await self._write([op]):
                        return False
                return True
            log.error("call record rejected by the database", error=repr(error), op=ops[0])
            await asyncio.to_thread(self._reject_ops, ops, repr(error))
            return True
        self.written += len(ops)
        if not self._healthy:
            log.info("call records database is back", spooled=self.spooled)
        self._healthy = True
        self._retry_delay = self.retry_initial_s
        self.last_error = None
        return True

    def _mark_down(self, error: str) -> None:
        if self._healthy:
            hint = None
            if "no such table" in error or "does not exist" in error:
                hint = "the schema is missing: run `livecall db upgrade`"
            log.warning(
                "call records database unavailable: keeping records", error=error, hint=hint
            )
        self._healthy = False
        self.last_error = error
        loop = self._loop or asyncio.get_running_loop()
        self._next_try = loop.time() + self._retry_delay
        self._retry_delay = min(self.retry_max_s, self._retry_delay * 2)

    # --- files (run in worker threads) ------------------------------------------------------

    async def _spool_pending(self) -> None:
        """Move every queued op to our spool file (behind anything spooled before)."""
        ops = list(self._pending)
        self._pending.clear()
        if not ops:
            return
        try:
            if self._own_spool is None:
                self._own_spool = await asyncio.to_thread(SpoolFile.create, self.spool_dir)
                self._spools.append(self._own_spool)
            await asyncio.to_thread(self._own_spool.append, ops)
            self.spooled += len(ops)
        except OSError:
            # the disk fails too: keep them in memory rather than lose them
            log.exception("cannot spool call records; keeping them in memory")
            self._pending.extendleft(reversed(ops))

    def _reject_ops(self, ops: list[Op], reason: str) -> None:
        self._reject_lines([_dumps({"reason": reason, "op": op}, None) + b"\n" for op in ops], None)

    def _reject_lines(self, lines: list[bytes], reason: str | None) -> None:
        self.rejected += len(lines)
        if reason:
            log.error("call records rejected", reason=reason, count=len(lines))
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        with (self.spool_dir / REJECTED_FILE).open("ab") as out:
            for line in lines:
                out.write(line if line.endswith(b"\n") else line + b"\n")
