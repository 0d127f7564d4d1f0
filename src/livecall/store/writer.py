"""`CallStore`: keeps every call's records without ever making a call wait for the database.

The bridge talks to one `CallRecordWriter` per call (a `CallObserver`). Its methods turn each
record into a plain JSON-able *op* and append it to the store's queue: O(1), no I/O, and they
never raise. One background task drains the queue in batches, each batch one transaction of
idempotent upserts (see `Repository.apply`).

When a write fails (the database down, or its schema missing), the queued ops and every later
one go to the spool task instead, which appends them to this process's spool file (JSON lines
in `settings.spool_dir`, mode 0600, held under an `flock`) and fsyncs, in a worker thread, all
the ops gathered during the previous fsync at once. `settled(call_sid)` tells when a call's ops
are in the database or on disk: a call's task awaits it before it ends, so a process killed
during an outage loses nothing. When the database answers again the spool is replayed first,
then what is queued, so rows land in the order they happened; replays are harmless because
every write is keyed (call_sid / call_sid+idx / call_sid+seq). Spool files left by a process
that died are claimed and replayed by the next one (or by any live process on a shared volume,
see `_claimable`; a file a process closed on its way out is renamed `spool-released-…` and
claimable by anyone at once). The spool is bounded by `SPOOL_MAX_BYTES`; when it (or the disk)
refuses, ops are held in memory up to `memory_limit`, then dropped and counted, loudly: never an
unbounded queue. `close()` writes what it can within its timeout and spools the rest.

A batch the database rejects for its *content* (integrity or data errors) is split, and the
ops that still fail go to `rejected.jsonl` beside the spool instead of blocking every call
behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.settings import Settings
from livecall.store import db
from livecall.store.repository import Repository

if TYPE_CHECKING:
    from livecall.metrics import Metrics

try:  # POSIX: tells a live process's spool file from an orphan
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # no module here: the checks below read None

log = structlog.get_logger("livecall.store")

Op = dict[str, Any]

SPOOL_PREFIX = "spool-"
SPOOL_SUFFIX = ".jsonl"
REJECTED_FILE = "rejected.jsonl"
# A spool file names the host that wrote it. One from this host is claimed as soon as its
# flock is free (the writer is gone). One from another host (a shared volume) must also have
# gone unrefreshed for FOREIGN_SPOOL_AGE_S: some network filesystems (Cloud Run's NFS) keep
# locks per client only, so a lock alone cannot tell a live pod's spool from a dead one's.
# Every live process refreshes its files' mtime each SPOOL_HEARTBEAT_S. A process that closes
# its store renames its files RELEASED_PREFIX…: no one writes them any more, so any host may
# claim them at once (a replaced pod has a new hostname: it would otherwise wait the age out).
SPOOL_HEARTBEAT_S = 15.0
RELEASED_PREFIX = f"{SPOOL_PREFIX}released-"  # host names never hold "-": no clash
FOREIGN_SPOOL_AGE_S = 60.0
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:48] or "host"


def _spool_host(path: Path) -> str | None:
    """The host a spool file's name says wrote it (None: an older name without one)."""
    parts = path.name[len(SPOOL_PREFIX) : -len(SPOOL_SUFFIX)].rsplit("-", 2)
    return parts[0] if len(parts) == 3 else None


def _claimable(path: Path, now: float) -> bool:
    if path.name.startswith(RELEASED_PREFIX):
        return True  # its writer closed it: only its lock decides
    host = _spool_host(path)
    if host is None or host == _HOST:
        return True
    try:
        return now - path.stat().st_mtime > FOREIGN_SPOOL_AGE_S
    except FileNotFoundError:
        return False


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

    Owner-only (0600): records hold phone numbers and what was said. Appends are fsynced and
    run in worker threads (`asyncio.to_thread`); a lock keeps an append from interleaving with
    a read. A failed append (a full disk) is cut off again, so the file never keeps half a line.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._lock = threading.Lock()
        self.offset = 0
        self.size = os.fstat(fd).st_size

    @classmethod
    def create(cls, directory: Path) -> SpoolFile:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"{SPOOL_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}{SPOOL_SUFFIX}"
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _fsync_dir(directory)  # the new name survives a crash too
        return cls(path, fd)

    @classmethod
    def claim(cls, path: Path) -> SpoolFile | None:
        """Take over a spool file whose process is gone; None if it is alive or vanished."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            return None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return None
        if not path.exists():  # replayed and removed by someone else meanwhile
            os.close(fd)
            return None
        return cls(path, fd)

    def append(self, ops: list[Op], room: int | None = None) -> int:
        """Append and fsync as many of `ops` as fit in `room` bytes; how many were written.

        Raises OSError (the file as it was before) when the disk refuses.
        """
        lines = [_dumps(op) + b"\n" for op in ops]
        count, total = len(lines), sum(map(len, lines))
        if room is not None and total > room:
            count, total = 0, 0
            for line in lines:
                if total + len(line) > room:
                    break
                count, total = count + 1, total + len(line)
        if count == 0:
            return 0
        data = memoryview(b"".join(lines[:count]))
        with self._lock:
            before = self.size
            try:
                while data:
                    data = data[os.write(self._fd, data) :]
                os.fsync(self._fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, before)
                raise
            self.size = before + total
        return count

    def read(self, max_ops: int) -> tuple[list[Op], list[bytes], int]:
        """Up to `max_ops` ops after `offset`, the unreadable lines, and the offset after them."""
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
            self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def release(self) -> None:
        """Close it for good (this process is done with it): renamed `spool-released-…`
        first, so any host may claim it at once. Unrenamed (an error), the age rule holds."""
        with self._lock:
            if self._fd >= 0 and not self.path.name.startswith(RELEASED_PREFIX):
                name = RELEASED_PREFIX + self.path.name[len(SPOOL_PREFIX) :]
                try:
                    os.rename(self.path, self.path.with_name(name))
                except OSError as error:
                    log.warning("spool file not released", file=str(self.path), error=str(error))
                else:
                    self.path = self.path.with_name(name)
                    _fsync_dir(self.path.parent)
            self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
            self._store._unrecordable(self.call_sid)
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
            idx = self._numbering.first_turn + int(turn.index)
            interrupted = bool(turn.interrupted)
            op = {
                "op": "turn",
                "call_sid": sid,
                "idx": idx,
                "speaker": _clean_str(turn.speaker, "speaker"),
                "text": _clean_str(turn.text) or "",
                "heard_text": _clean_str(turn.heard_text),
                "start_ms": int(turn.start_ms),
                "end_ms": None if turn.end_ms is None else int(turn.end_ms),
                "interrupted": bool(turn.interrupted),
                "heard_estimated": bool(turn.heard_estimated),
                "first_audio_latency_ms": _number(turn.first_audio_latency_ms),
                "barge_in_stop_ms": _number(turn.barge_in_stop_ms),
            }
            self._store._put(op)
            self._turns.add(idx)
            self._numbering.next_turn = max(self._numbering.next_turn, idx + 1)
            if interrupted:
                self._interrupted.add(idx)
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


class SchemaNotReady(RuntimeError):
    """The database answers but its schema is not the one this version writes (AUTO_MIGRATE off)."""


def _unreachable(error: BaseException) -> bool:
    """The database could not be reached at all (as opposed to refusing what we asked)."""
    if isinstance(error, OSError | TimeoutError | ConnectionError | sa_exc.TimeoutError):
        return True
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, sa_exc.InterfaceError | sa_exc.DisconnectionError)


def _schema_missing(error: str) -> bool:
    return any(s in error for s in ("no such table", "does not exist", "UndefinedTable"))


class CallStore:
    """Owns the engine, the write queue, the spool and the tasks that drain them.

    `repo` answers reads (API, CLI). `migrate` (default: `AUTO_MIGRATE`) brings the schema
    to head on start, under a PostgreSQL advisory lock so instances starting together take
    turns; with it off, a reachable database on an older schema stops the start
    (`SchemaNotReady`, naming `livecall db upgrade`).

    Durability: while the database is healthy, ops wait in memory only for the next batch
    (milliseconds). Once a write fails, they and every later op go to the spool task, which
    appends them to this process's spool file and fsyncs, many calls' ops per fsync, in a
    worker thread; `settled(call_sid)` waits until a call's ops are in the database or on
    disk. The spool is bounded by `SPOOL_MAX_BYTES`: past it (or when the disk fails) ops are
    held in memory up to `memory_limit`, then dropped and counted, with an alarm metric and an
    error log, never kept without bound.
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
        spool_retry_s: float = 1.0,
        metrics: Metrics | None = None,
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
        self.spool_max_bytes = settings.spool_max_bytes
        self._migrate = settings.auto_migrate if migrate is None else migrate
        self._check_schema = not self._migrate and migrate is None
        self.memory_limit = memory_limit
        self.batch_size = batch_size
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.write_timeout_s = write_timeout_s
        self.spool_retry_s = spool_retry_s
        self.metrics = metrics

        self._pending: deque[Op] = deque()  # healthy: the next batches for the database
        self._held: list[Op] = []  # for the spool task: not on disk yet (bounded)
        self._appending = 0  # ops the spool task is appending right now
        self._room_made = False  # a spool file was replayed and removed since the last look
        self._numberings: OrderedDict[str, _Numbering] = OrderedDict()
        self._spools: deque[SpoolFile] = deque()  # oldest first; the last may be ours
        self._own_spool: SpoolFile | None = None
        self._spool_lock = asyncio.Lock()  # one of: an append, or the removal of a spool
        self._unsettled: dict[str, int] = {}  # call_sid -> its ops only in memory
        self._settle_waiters: dict[str, list[asyncio.Future[bool]]] = {}
        self._wake = asyncio.Event()
        self._spool_wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._spool_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[bool]] = []  # flush(): resolved after the next pass
        self._drain_waiters: list[asyncio.Future[None]] = []  # drained(): once nothing is left
        self._force = False
        self._closing = False
        self._closed = False
        self._healthy = True
        self._retry_delay = retry_initial_s
        self._next_try = 0.0
        self._spool_full: str | None = None  # why the spool refuses records, while it does
        self._schema_problem: str | None = None
        self._lost_logged_at = -math.inf
        self.written = 0
        self.spooled = 0
        self.rejected = 0
        self.lost = 0
        self.last_error: str | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate (if asked), claim orphaned spool files, start the drain and spool tasks.

        Never fails because the database is unreachable: records are spooled and the
        database retried in the background. Raises `SchemaNotReady` when it answers with an
        older schema and migrating is off.
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
        if self._migrate or self._check_schema:
            # the schema first, so the API can read at once; a dead database is retried later
            try:
                await asyncio.wait_for(self._prepare_schema(), self.write_timeout_s * 4)
            except SchemaNotReady:
                raise
            except Exception as error:
                self._schema_failed(error)
        self._task = asyncio.create_task(self._run(), name="livecall-call-store")
        self._spool_task = asyncio.create_task(self._spool_run(), name="livecall-call-spool")
        self._gauges()
        if self._spools:
            self._force = True
            self._wake.set()

    async def _prepare_schema(self) -> None:
        """Migrate, or check the revision; clears `_migrate`/`_check_schema` when done."""
        if self._migrate:
            await db.upgrade_or_confirm(self.engine)
            self._migrate = False
            self._schema_problem = None
            return
        current = await db.current_revision(self.engine)
        head = db.head_revision()
        if current != head:
            raise SchemaNotReady(
                f"the call records database is at schema revision {current or 'none'}, this "
                f"livecall writes {head}: run `livecall db upgrade` (or set AUTO_MIGRATE=true)"
            )
        self._check_schema = False
        self._schema_problem = None

    def _schema_failed(self, error: BaseException) -> None:
        """Migrating failed: unreachable (retried quietly) or refused (loud, /ready false)."""
        if _unreachable(error):
            log.warning("call records database unreachable at start", error=repr(error))
        else:
            self._schema_problem = repr(error)
            log.error(
                "call records schema not ready: calls are spooled, not recorded, until it is",
                error=repr(error),
                hint="run `livecall db upgrade`",
            )
        self._mark_down(repr(error))

    async def close(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - then it spools
        """Write everything within `timeout` seconds; spool what is left. Idempotent."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
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
        if self._pending:  # not written: to the spool, ahead of anything newer
            self._held[:0] = self._pending
            self._pending.clear()
        self._spool_wake.set()
        if self._spool_task is not None:
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._spool_task), max(1.0, deadline - loop.time())
                )
            except TimeoutError:
                self._spool_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._spool_task
        elif self._held:  # never started: spool synchronously
            await self._append_held()
        if self._held:
            self._lose(self._held, "the spool refused them at shutdown")
            self._held = []
        for spool in self._spools:  # the next start() (any host's) replays them at once
            await asyncio.to_thread(spool.release)
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

    async def settled(self, call_sid: str, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until none of the call's records is held only in memory: each one is in the
        database or fsynced to the spool (or, the spool refusing too, counted lost).

        False when `timeout` ran out first, or at once while the spool is full and the
        database away. A call's task awaits this before it ends, so a process killed
        afterwards loses nothing of it.
        """
        if not self._unsettled.get(call_sid):
            return True
        if self._spool_full and not self._healthy:
            return False  # nowhere to put them now: do not hold the call up
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._settle_waiters.setdefault(call_sid, []).append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            log.warning("call records not on disk yet", call_sid=call_sid, timeout_s=timeout)
            waiters = self._settle_waiters.get(call_sid, [])
            if waiter in waiters:
                waiters.remove(waiter)
            return False

    def can_record(self) -> str | None:
        """None when a new call's records can be kept, else why not (for /ready)."""
        if self._schema_problem:
            return "schema"
        if self._spool_full and not self._healthy:
            return "spool_full"
        return None

    def _unrecordable(self, call_sid: str) -> None:
        """A call starts while its records cannot be kept: an error for it, and a count."""
        reason = self.can_record()
        if reason is None:
            return
        log.error(
            "call.not_recorded: this call's records cannot be kept",
            call_sid=call_sid,
            reason=reason,
            error=self._schema_problem or self._spool_full,
        )
        if self.metrics is not None:
            self.metrics.calls_unrecorded.labels(reason=reason).inc()

    def health(self) -> dict[str, Any]:
        """Numbers for /health and /metrics."""
        return {
            "healthy": self._healthy,
            "pending": len(self._pending),
            "held": len(self._held),
            "spooled_files": len(self._spools),
            "spool_bytes": self._spool_bytes(),
            "spool_full": self._spool_full,
            "schema_problem": self._schema_problem,
            "written": self.written,
            "spooled": self.spooled,
            "rejected": self.rejected,
            "lost": self.lost,
            "last_error": self.last_error,
        }

    def _gauges(self) -> None:
        if self.metrics is None:
            return
        self.metrics.records_database_up.set(1 if self._healthy else 0)
        self.metrics.records_spool_bytes.set(self._spool_bytes())
        self.metrics.records_spool_full.set(1 if self._spool_full else 0)

    def _spool_bytes(self) -> int:
        return sum(spool.size for spool in self._spools)

    # --- the queue --------------------------------------------------------------------------

    def _spooling(self) -> bool:
        """New ops go to the spool: the database is down, or older ops wait on disk."""
        return not self._healthy or bool(self._spools or self._held or self._appending)

    def _put(self, op: Op) -> None:
        if self._closed:
            self._late(op)
            return
        sid = op["call_sid"]
        self._unsettled[sid] = self._unsettled.get(sid, 0) + 1
        if self._spooling() or len(self._pending) >= self.memory_limit:
            if len(self._held) >= self.memory_limit:
                self._lose([op], "the spool is not keeping up")
                return
            self._held.append(op)
            self._wake_soon(self._spool_wake)
            return
        self._pending.append(op)
        self._wake_soon(self._wake)

    def _settle(self, ops: list[Op]) -> None:
        """These ops are safe (database or disk) or lost: wake whoever waits on their calls."""
        for op in ops:
            sid = op["call_sid"]
            left = self._unsettled.get(sid, 0) - 1
            if left > 0:
                self._unsettled[sid] = left
                continue
            self._unsettled.pop(sid, None)
            for waiter in self._settle_waiters.pop(sid, ()):
                if not waiter.done():
                    waiter.set_result(True)

    def _lose(self, ops: list[Op], why: str) -> None:
        """Neither the database nor the spool takes these: count them, say so loudly."""
        self.lost += len(ops)
        if self.metrics is not None:
            self.metrics.records_lost.inc(len(ops))
        loop = self._loop
        now = loop.time() if loop is not None else math.inf
        if now - self._lost_logged_at >= 10.0:  # loud, not a flood
            self._lost_logged_at = now
            log.error(
                "call records LOST: the database is unavailable and the spool refuses them",
                why=why,
                lost_total=self.lost,
                spool_dir=str(self.spool_dir),
                spool_max_bytes=self.spool_max_bytes,
            )
        self._settle(ops)

    def _wake_soon(self, event: asyncio.Event) -> None:
        loop = self._loop
        if loop is None:
            return  # not started: the first start() drains
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:  # an observer called from another thread
            loop.call_soon_threadsafe(event.set)

    def _late(self, op: Op) -> None:
        """A record after close(): straight to a spool file of its own, so it is not lost."""
        log.warning("call record after the store closed: spooled", call_sid=op.get("call_sid"))
        try:
            spool = SpoolFile.create(self.spool_dir)
            spool.append([op])
            spool.release()
        except OSError:
            log.exception("call record lost", call_sid=op.get("call_sid"))

    # --- the spool task ---------------------------------------------------------------------

    async def _spool_run(self) -> None:
        """Appends held ops to the spool, all that gathered during the previous fsync at once."""
        loop = asyncio.get_running_loop()
        blocked_until = 0.0
        while True:
            if self._closing and (not self._held or loop.time() < blocked_until):
                return
            if not self._held or loop.time() < blocked_until:
                self._spool_wake.clear()
                timeout = max(0.0, blocked_until - loop.time()) if self._held else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._spool_wake.wait(), timeout)
                if self._room_made:
                    self._room_made = False
                    blocked_until = 0.0  # a spool replayed and removed: try at once
                continue
            try:
                if not await self._append_held():
                    blocked_until = loop.time() + self.spool_retry_s
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the spool task die
                log.exception("call records spool pass failed")
                blocked_until = loop.time() + self.spool_retry_s

    async def _append_held(self) -> bool:
        """One append of everything held; False when the spool refused some (full, disk)."""
        async with self._spool_lock:
            ops, self._held = self._held, []
            if not ops:
                return True
            error: str | None = None
            written = 0
            self._appending = len(ops)
            try:
                if self._own_spool is None:
                    self._own_spool = await asyncio.to_thread(SpoolFile.create, self.spool_dir)
                    self._spools.append(self._own_spool)
                room = max(0, self.spool_max_bytes - self._spool_bytes())
                written = await asyncio.to_thread(self._own_spool.append, ops, room)
                if written < len(ops):
                    error = f"SPOOL_MAX_BYTES ({self.spool_max_bytes}) reached"
            except OSError as exc:
                error = f"{exc.__class__.__name__}: {exc}"
            except asyncio.CancelledError:  # close() gave up on a slow disk: still ours
                self._held[:0] = ops
                raise
            finally:
                self._appending = 0
            self.spooled += written
            self._settle(ops[:written])
            rest = ops[written:]
            if rest:  # back in front, bounded
                self._held[:0] = rest
                excess = len(self._held) - self.memory_limit
                if excess > 0:
                    dropped = self._held[-excess:]
                    del self._held[-excess:]
                    self._lose(dropped, error or "spool full")
        self._spool_state(error)
        if self._healthy:
            self._wake.set()  # spooled behind a replay: the drain reads it on
        return error is None

    def _spool_state(self, error: str | None) -> None:
        if error and not self._spool_full:
            log.error(
                "CALL RECORDS SPOOL FULL: records are held in memory (at most "
                f"{self.memory_limit}) and dropped past that until the database or disk recovers",
                error=error,
                spool_dir=str(self.spool_dir),
                spool_bytes=self._spool_bytes(),
                spool_max_bytes=self.spool_max_bytes,
                held=len(self._held),
            )
        elif not error and self._spool_full:
            log.warning("call records spool accepts records again", held=len(self._held))
        self._spool_full = error
        if error and not self._healthy:  # calls waiting for their records: not now, go on
            waiting, self._settle_waiters = self._settle_waiters, {}
            for waiters in waiting.values():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(False)
        self._gauges()

    # --- draining ---------------------------------------------------------------------------

    def _orphans(self, ours: list[Path] | None = None) -> list[Path]:
        """Spool files of processes that are gone (see `_claimable`), oldest first."""
        if not self.spool_dir.is_dir():
            return []
        mine = set(ours) if ours is not None else {s.path for s in self._spools}
        now = time.time()
        found = []
        for path in self.spool_dir.glob(f"{SPOOL_PREFIX}*{SPOOL_SUFFIX}"):
            if path not in mine and _claimable(path, now):
                with contextlib.suppress(FileNotFoundError):
                    found.append((path.stat().st_mtime, path))
        return [path for _, path in sorted(found)]

    def _heartbeat(self, ours: list[Path]) -> list[SpoolFile]:
        """Refresh our spool files' mtime (they are alive); claim the orphans (worker thread)."""
        for path in ours:
            with contextlib.suppress(OSError):
                os.utime(path)
        claimed = []
        for path in self._orphans(ours):
            spool = SpoolFile.claim(path)
            if spool is not None:
                log.info("replaying spooled call records", file=str(path))
                claimed.append(spool)
        return claimed

    def _has_work(self) -> bool:
        return bool(self._pending or self._spools or self._held or self._appending)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + SPOOL_HEARTBEAT_S  # start() has just claimed orphans
        while True:
            now = loop.time()
            due = self._healthy or now >= self._next_try
            urgent = self._closing or self._force or bool(self._waiters)
            if now >= next_beat:
                next_beat = now + SPOOL_HEARTBEAT_S
                try:
                    ours = [spool.path for spool in self._spools]
                    self._spools.extend(await asyncio.to_thread(self._heartbeat, ours))
                except OSError as error:
                    log.warning("cannot read the spool directory", error=str(error))
                if self._spools and self._healthy:
                    self._wake.set()
            if not urgent and not (due and self._has_work()):
                timeout = max(0.0, next_beat - now)
                if self._has_work():  # unhealthy: wake for the next retry
                    timeout = min(timeout, max(0.0, self._next_try - now))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            waiters, self._waiters = self._waiters, []
            force, self._force = self._force, False
            try:
                if due or force or self._closing:
                    await self._write_all()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # never let the drain task die
                if self._migrate or self._check_schema:
                    self._schema_failed(error)
                else:
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
        """Spool files first, then what is held, then the queue, until done or the DB fails."""
        if self._migrate or self._check_schema:
            await asyncio.wait_for(self._prepare_schema(), self.write_timeout_s * 4)
        while True:
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
                async with self._spool_lock:  # no append may land in a file being removed
                    if spool.offset < spool.size:
                        continue  # appended meanwhile: read on
                    if spool is self._own_spool:
                        self._own_spool = None
                    self._spools.popleft()
                    await asyncio.to_thread(spool.remove)
                self._gauges()
                self._room_made = True  # a full spool may take records again
                self._spool_wake.set()
                ours = [s.path for s in self._spools]
                for path in await asyncio.to_thread(self._orphans, ours):  # a process died?
                    claimed = await asyncio.to_thread(SpoolFile.claim, path)
                    if claimed is not None:
                        self._spools.append(claimed)
            async with self._spool_lock:
                if self._spools:
                    continue  # the spool task made a new file meanwhile
                # held ops the spool could not take go straight in, in order, before newer ones
                self._pending.extendleft(reversed(self._held))
                self._held = []
            break
        if self._spool_full:
            self._spool_state(None)
        while self._pending:
            batch = [self._pending[i] for i in range(min(self.batch_size, len(self._pending)))]
            if not await self._write(batch):
                return
            for _ in batch:
                self._pending.popleft()
            self._settle(batch)

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
        self._schema_problem = None
        self._retry_delay = self.retry_initial_s
        self.last_error = None
        self._gauges()
        return True

    def _mark_down(self, error: str) -> None:
        """The database failed: retry later; until then every op goes to the spool."""
        if self._healthy:
            hint = None
            if _schema_missing(error):
                hint = "the schema is missing: run `livecall db upgrade`"
            log.warning(
                "call records database unavailable: spooling records", error=error, hint=hint
            )
        if _schema_missing(error) and not self._schema_problem:
            self._schema_problem = error
        self._healthy = False
        self.last_error = error
        loop = self._loop or asyncio.get_running_loop()
        self._next_try = loop.time() + self._retry_delay
        self._retry_delay = min(self.retry_max_s, self._retry_delay * 2)
        if self._pending:  # queued for the database: to disk now, ahead of anything newer
            self._held[:0] = self._pending
            self._pending.clear()
            self._spool_wake.set()
        self._gauges()

    # --- files (run in worker threads) ------------------------------------------------------

    def _reject_ops(self, ops: list[Op], reason: str) -> None:
        self._reject_lines([_dumps({"reason": reason, "op": op}, None) + b"\n" for op in ops], None)

    def _reject_lines(self, lines: list[bytes], reason: str | None) -> None:
        self.rejected += len(lines)
        if reason:
            log.error("call records rejected", reason=reason, count=len(lines))
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.spool_dir / REJECTED_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            for line in lines:
                out.write(line if line.endswith(b"\n") else line + b"\n")
