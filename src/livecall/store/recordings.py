"""Where finished call recordings live, behind an interface small enough for a bucket.

`RecordingStore` is keyed by call SID: put a finished local file, open it for download, delete
it, list the ones older than N days. `LocalRecordingStore` keeps them as
`<dir>/<call_sid>.<wav|flac>` (files 0600, the directory created 0700: they are personal data).
An S3/GCS store (fsspec or the vendors' SDKs) implements the same five methods; `open()` may
then return a stream instead of a path. The retention job (`cleanup_expired`,
`run_retention`) works against the interface only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import structlog

log = structlog.get_logger("livecall.recordings")

FORGET_TIMEOUT_S = 2.0  # a retention pass stopped mid-way: forgetting what it deleted
FORMATS = {"wav": "audio/wav", "flac": "audio/flac"}
# Call ids become file names: nothing that could climb out of the directory. Every carrier's
# id fits (Twilio CA…, Plivo/Vonage uuids, Telnyx "v3:…" call control ids, Exotel sids).
_SAFE_SID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_:-]{0,127}\Z")


def valid_call_sid(call_sid: str) -> bool:
    return bool(_SAFE_SID.match(call_sid))


@dataclass(slots=True)
class Recording:
    """A stored recording: a local path when there is one, else a stream to read."""

    call_sid: str
    media_type: str
    path: Path | None = None
    stream: BinaryIO | None = None
    size: int | None = None


class RecordingStore(ABC):
    """Recordings by call SID. Methods are async so remote stores fit without threads leaking
    into callers; the local store runs its file I/O in worker threads."""

    @abstractmethod
    async def put(self, call_sid: str, local_path: Path) -> str:
        """Take ownership of a finished local file; return the key to record in the call."""

    @abstractmethod
    async def open(self, call_sid: str) -> Recording | None:
        """The call's recording, or None when there is none."""

    @abstractmethod
    async def delete(self, call_sid: str) -> bool:
        """Remove the call's recording; False when there was none."""

    @abstractmethod
    async def list_older_than(self, days: float) -> list[str]:
        """Call SIDs whose recordings were stored more than `days` days ago."""

    async def cleanup_expired(
        self, retention_days: float, removed: list[str] | None = None
    ) -> list[str]:
        """Delete every recording older than the retention; returns their call SIDs (also
        appended to `removed` as they go, so a pass cut off still tells what it may have
        deleted: forgetting a key whose file is still there is harmless, it is past retention
        and goes in the next pass)."""
        removed = [] if removed is None else removed
        for call_sid in await self.list_older_than(retention_days):
            removed.append(call_sid)  # before the delete: one cut off may be gone already
            try:
                if not await self.delete(call_sid):
                    removed.pop()
            except OSError as error:
                removed.pop()
                log.warning("recording not deleted", call_sid=call_sid, error=str(error))
        if removed:
            log.info("expired recordings deleted", count=len(removed), days=retention_days)
        return removed


class RecordingKeys(Protocol):
    """What the retention job tells about deleted files (the `Repository` does this)."""

    async def clear_recordings(self, call_sids: Iterable[str]) -> None: ...


class LocalRecordingStore(RecordingStore):
    """Recordings as `<directory>/<call_sid>.<ext>` on the local disk."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def path_for(self, call_sid: str, fmt: str = "wav") -> Path:
        """Where a recording goes, so the recorder can finish straight into place."""
        if not valid_call_sid(call_sid):
            raise ValueError(f"not a call SID: {call_sid!r}")
        if fmt not in FORMATS:
            raise ValueError(f"unknown recording format {fmt!r}")
        return self.directory / f"{call_sid}.{fmt}"

    def _find(self, call_sid: str) -> Path | None:
        if not valid_call_sid(call_sid):
            return None
        for fmt in FORMATS:
            path = self.directory / f"{call_sid}.{fmt}"
            if path.is_file():
                return path
        return None

    def _put(self, call_sid: str, local_path: Path) -> str:
        fmt = local_path.suffix.lstrip(".").lower()
        target = self.path_for(call_sid, fmt)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if local_path.resolve() != target.resolve():
            for other in FORMATS:  # one recording per call
                if other != fmt:
                    with contextlib.suppress(FileNotFoundError):
                        (self.directory / f"{call_sid}.{other}").unlink()
            shutil.move(str(local_path), target)
        os.chmod(target, 0o600)  # personal data: this user only, whoever wrote the file
        return str(target)

    async def put(self, call_sid: str, local_path: Path) -> str:
        return await asyncio.to_thread(self._put, call_sid, Path(local_path))

    async def open(self, call_sid: str) -> Recording | None:
        path = await asyncio.to_thread(self._find, call_sid)
        if path is None:
            return None
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        media_type = FORMATS[path.suffix.lstrip(".")]
        return Recording(call_sid=call_sid, media_type=media_type, path=path, size=size)

    def _delete(self, call_sid: str) -> bool:
        deleted = False
        if not valid_call_sid(call_sid):
            return False
        for fmt in FORMATS:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{call_sid}.{fmt}").unlink()
                deleted = True
        return deleted

    async def delete(self, call_sid: str) -> bool:
        return await asyncio.to_thread(self._delete, call_sid)

    def _older_than(self, days: float) -> list[str]:
        if not self.directory.is_dir():
            return []
        cutoff = time.time() - days * 86400
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                stem, dot, ext = entry.name.rpartition(".")
                if not dot or ext not in FORMATS or not valid_call_sid(stem):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file() and entry.stat().st_mtime < cutoff:
                        found.append(stem)
        return sorted(found)

    async def list_older_than(self, days: float) -> list[str]:
        return await asyncio.to_thread(self._older_than, days)


async def cleanup_expired(
    recordings: RecordingStore, retention_days: float, keys: RecordingKeys | None = None
) -> list[str]:
    """One retention pass: delete old recordings and (given `keys`) forget their keys.

    Stopped mid-pass (shutdown), the keys of the recordings already deleted are still
    forgotten (bounded): the next pass finds no file for them, so nothing else would, and
    their calls would point at recordings that are gone for good.
    """
    removed: list[str] = []
    try:
        await recordings.cleanup_expired(retention_days, removed)
        if keys is not None and removed:
            await keys.clear_recordings(removed)
    except asyncio.CancelledError:
        if keys is not None and removed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(FORGET_TIMEOUT_S):
                    await keys.clear_recordings(removed)  # idempotent: again is harmless
        raise
    return removed


async def run_retention(
    recordings: RecordingStore,
    retention_days: float,
    keys: RecordingKeys | None = None,
    *,
    interval_s: float = 3600.0,
) -> None:
    """The cleanup job: a pass now and then every `interval_s`, until cancelled."""
    async for _ in _every(interval_s):
        try:
            await cleanup_expired(recordings, retention_days, keys)
        except Exception:
            log.exception("recording retention pass failed")


async def _every(interval_s: float) -> AsyncIterator[None]:
    while True:
        yield
        await asyncio.sleep(interval_s)
