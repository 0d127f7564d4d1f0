"""A stereo call recording (caller left, agent right) of what the caller actually heard.

Pure audio at 8 kHz int16, fed by the bridge:

- `add_caller(at_ms, pcm)`: a caller frame at its stream timestamp; gaps become silence.
- `add_agent(at_ms, pcm)`: agent audio at its estimated playout start (the bridge knows it
  from Twilio's in-order playout and the mark echoes).
- `cut_agent(at_ms)`: a `clear` was sent: agent audio at or after `at_ms` never reached the
  caller, so it is dropped (audio added later, e.g. the next answer, is kept).
- `finish(path, fmt)`: the WAV (stdlib `wave`) or FLAC (`soundfile`) file.

Memory stays bounded however long the call: audio older than `window_ms` behind the caller's
clock can no longer be cut, so it is mixed and written to a raw temp file ("finalized").
The `add_*`/`cut_agent` methods only copy the frame and append to a list: no I/O, no mixing.
The file writes happen in `flush()`, which runs them in `asyncio.to_thread`. With a running
event loop the recorder schedules that flush itself once `flush_every_ms` of audio is ready
(`auto_flush`); without one, call `flush_sync()` from a worker thread now and then. Blocks are
written at their own file offset, so flushes never depend on each other's order.
`finish()` does file I/O too: call it in a thread (`await finish_async(...)`) after the
last `add_*`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["RATE", "StereoRecorder"]

RATE = 8000
_FRAME_BYTES = 4  # two int16 channels
_COPY_FRAMES = 1 << 16  # per read when converting the temp file

Format = Literal["wav", "flac"]
Int16Array = npt.NDArray[np.int16]
# (first sample, audio) pieces of one channel, not yet finalized
_Pieces = list[tuple[int, Int16Array]]


_BLOCK = RATE // 2  # contiguous frames are packed into blocks of 0.5 s


def _sample(at_ms: float) -> int:
    return max(0, round(at_ms * RATE / 1000))


class _Track:
    """One channel's audio not yet finalized: sealed pieces, plus an open block that
    contiguous frames are copied into, so a second of audio is two objects, not fifty."""

    __slots__ = ("_block", "_block_len", "_block_start", "pieces")

    def __init__(self) -> None:
        self.pieces: _Pieces = []
        self._block: Int16Array | None = None
        self._block_start = 0
        self._block_len = 0

    def add(self, start: int, audio: Int16Array) -> None:
        n = len(audio)
        block = self._block
        if (
            block is not None
            and start == self._block_start + self._block_len
            and self._block_len + n <= _BLOCK
        ):
            block[self._block_len : self._block_len + n] = audio
            self._block_len += n
            return
        self.seal()
        if n >= _BLOCK:
            self.pieces.append((start, np.array(audio, dtype=np.int16)))
            return
        block = np.empty(_BLOCK, dtype=np.int16)
        block[:n] = audio
        self._block, self._block_start, self._block_len = block, start, n

    def seal(self) -> _Pieces:
        """Close the open block (before pieces are cut or taken); returns the pieces."""
        if self._block is not None:
            if self._block_len:
                self.pieces.append((self._block_start, self._block[: self._block_len]))
            self._block = None
            self._block_len = 0
        return self.pieces


class StereoRecorder:
    """Builds one call's stereo recording with bounded memory (see the module docstring)."""

    def __init__(
        self,
        *,
        window_ms: float = 20_000,
        flush_every_ms: float = 5_000,
        tmp_dir: Path | str | None = None,
        auto_flush: bool = True,
    ) -> None:
        self.window = _sample(window_ms)
        self.flush_every = max(1, _sample(flush_every_ms))
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else None
        self.auto_flush = auto_flush
        self._caller = _Track()
        self._agent = _Track()
        self._buffered = 0  # samples held in both tracks
        self._caller_end = 0  # the caller's clock, in samples
        self._end = 0  # last sample of any audio kept
        self._finalized = 0  # samples [0, _finalized) are in the temp file (or dropped)
        self._tmp: Path | None = None
        self._io = threading.Condition()
        self._inflight = 0  # blocks taken but not yet written
        self._flush_task: asyncio.Task[None] | None = None
        self._finished = False
        self.late_samples = 0  # audio that came after its time was finalized (lost)

    # --- the audio path (cheap) ------------------------------------------------------------

    def add_caller(self, at_ms: float, pcm: Int16Array) -> None:
        start = _sample(at_ms)
        samples = self._place(self._caller, start, pcm)
        if samples:
            self._caller_end = max(self._caller_end, start + samples)
            if self.auto_flush and self.needs_flush:
                self._schedule_flush()

    def add_agent(self, at_ms: float, pcm: Int16Array) -> None:
        self._place(self._agent, _sample(at_ms), pcm)

    def cut_agent(self, at_ms: float) -> None:
        """Drop agent audio the caller never heard: everything at or after `at_ms`."""
        cut = _sample(at_ms)
        if cut < self._finalized:
            self.late_samples += self._finalized - cut
            cut = self._finalized
        kept: _Pieces = []
        for start, audio in self._agent.seal():
            if start >= cut:
                self._buffered -= len(audio)
            elif start + len(audio) > cut:
                self._buffered -= start + len(audio) - cut
                kept.append((start, audio[: cut - start]))
            else:
                kept.append((start, audio))
        self._agent.pieces = kept
        agent_end = max((s + len(a) for s, a in kept), default=0)
        self._end = max(self._caller_end, agent_end, self._finalized)

    def _place(self, track: _Track, start: int, pcm: Int16Array) -> int:
        if self._finished:
            raise RuntimeError("recording already finished")
        audio = np.asarray(pcm, dtype=np.int16).reshape(-1)  # the track copies it
        if start < self._finalized:  # too late to be placed (older than the window)
            late = min(len(audio), self._finalized - start)
            self.late_samples += late
            audio = audio[late:]
            start += late
        if not len(audio):
            return 0
        track.add(start, audio)
        self._buffered += len(audio)
        self._end = max(self._end, start + len(audio))
        return len(audio)

    # --- finalizing (file I/O off the audio path) -------------------------------------------

    @property
    def horizon(self) -> int:
        """Samples before this can no longer change."""
        return max(self._finalized, self._caller_end - self.window)

    @property
    def needs_flush(self) -> bool:
        return self.horizon - self._finalized >= self.flush_every

    @property
    def buffered_ms(self) -> float:
        """Audio held in memory (both channels), in milliseconds."""
        return self._buffered * 1000 / RATE

    @property
    def duration_ms(self) -> float:
        return self._end * 1000 / RATE

    def _schedule_flush(self) -> None:
        if self._flush_task is not None and not self._flush_task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the owner calls flush_sync()
        self._flush_task = loop.create_task(self.flush())

    def _take(self, until: int) -> tuple[int, _Pieces, _Pieces]:
        """Detach everything before `until` from the live lists (no copying, no mixing).

        Every take is followed by exactly one `_write` of what it took.
        """
        with self._io:
            self._inflight += 1
        start = self._finalized
        if until <= start:
            return start, [], []
        taken: tuple[_Pieces, _Pieces] = ([], [])
        for index, track in enumerate((self._caller, self._agent)):
            kept: _Pieces = []
            for first, audio in track.seal():
                end = first + len(audio)
                if end <= until:
                    taken[index].append((first, audio))
                    self._buffered -= len(audio)
                elif first < until:
                    taken[index].append((first, audio[: until - first]))
                    kept.append((until, audio[until - first :]))
                    self._buffered -= until - first
                else:
                    kept.append((first, audio))
            track.pieces = kept
        self._finalized = until
        return start, taken[0], taken[1]

    def _write(self, start: int, end: int, caller: _Pieces, agent: _Pieces) -> None:
        """Mix pieces into interleaved stereo and write them at their offset (any thread)."""
        try:
            if end <= start:
                return
            block = np.zeros((end - start, 2), dtype="<i2")
            for channel, pieces in enumerate((caller, agent)):
                for first, audio in pieces:
                    block[first - start : first - start + len(audio), channel] = audio
            with self._io:
                if self._tmp is None:
                    fd, name = tempfile.mkstemp(
                        prefix="livecall-rec-", suffix=".raw", dir=self.tmp_dir
                    )
                    os.close(fd)
                    self._tmp = Path(name)
                with self._tmp.open("r+b") as raw:
                    raw.seek(start * _FRAME_BYTES)
                    raw.write(block.tobytes())
        finally:
            with self._io:
                self._inflight -= 1
                self._io.notify_all()

    async def flush(self) -> None:
        """Write finalized audio to the temp file in a worker thread."""
        start, caller, agent = self._take(self.horizon)
        end = self._finalized
        # shielded: once taken, the block must be written even if this task is cancelled
        await asyncio.shield(asyncio.to_thread(self._write, start, end, caller, agent))

    def flush_sync(self) -> None:
        """`flush()` for callers without an event loop (blocks: not on the audio path)."""
        start, caller, agent = self._take(self.horizon)
        self._write(start, self._finalized, caller, agent)

    # --- the file -------------------------------------------------------------------------

    def finish(self, path: Path | str, fmt: Format = "wav", *, end_ms: float | None = None) -> Path:
        """Write the recording (blocking I/O: run it in a thread); returns the file written.

        `end_ms`, when given, trims both channels there (agent audio still queued when the
        caller hung up was never heard). The suffix of `path` is set to `fmt`.
        """
        if fmt not in ("wav", "flac"):
            raise ValueError(f"unknown recording format {fmt!r}")
        if end_ms is not None:
            self.cut_agent(end_ms)
        end = self._end if end_ms is None else max(self._finalized, min(self._end, _sample(end_ms)))
        start, caller, agent = self._take(end)
        self._write(start, end, caller, agent)
        self._finished = True
        with self._io:  # a flush still writing in another thread
            if not self._io.wait_for(lambda: self._inflight == 0, timeout=60):
                raise RuntimeError("a recording flush never finished")
        target = Path(path).with_suffix(f".{fmt}")
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        try:
            # a call's voices: readable by this user only, from the first byte written
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            os.close(fd)
            if fmt == "wav":
                self._to_wav(partial, end)
            else:
                self._to_flac(partial, end)
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            self.discard()
        return target

    async def finish_async(
        self, path: Path | str, fmt: Format = "wav", *, end_ms: float | None = None
    ) -> Path:
        """`finish()` in a worker thread, once an automatic flush under way has taken its block."""
        if self._flush_task is not None:
            with contextlib.suppress(Exception):
                await self._flush_task
        return await asyncio.to_thread(self.finish, path, fmt, end_ms=end_ms)

    def discard(self) -> None:
        """Drop the temp file (after finish, or when the recording is not wanted)."""
        with self._io:
            if self._tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._tmp.unlink()
                self._tmp = None
        self._caller, self._agent, self._buffered = _Track(), _Track(), 0

    def _read_raw(self, frames: int) -> Iterator[bytes]:
        """Yield the temp file's first `frames` stereo frames in blocks, zero-padded."""
        remaining = frames
        if self._tmp is not None:
            with self._tmp.open("rb") as raw:
                while remaining > 0:
                    data = raw.read(min(remaining, _COPY_FRAMES) * _FRAME_BYTES)
                    if not data:
                        break
                    remaining -= len(data) // _FRAME_BYTES
                    yield data
        while remaining > 0:  # silence that was never written (nothing at the very end)
            count = min(remaining, _COPY_FRAMES)
            remaining -= count
            yield bytes(count * _FRAME_BYTES)

    def _to_wav(self, target: Path, frames: int) -> None:
        with wave.open(str(target), "wb") as out:
            out.setnchannels(2)
            out.setsampwidth(2)
            out.setframerate(RATE)
            for data in self._read_raw(frames):
                out.writeframesraw(data)

    def _to_flac(self, target: Path, frames: int) -> None:
        import soundfile  # optional dependency: only FLAC needs it

        with soundfile.SoundFile(
            str(target), "w", samplerate=RATE, channels=2, subtype="PCM_16", format="FLAC"
        ) as out:
            for data in self._read_raw(frames):
                out.write(np.frombuffer(data, dtype="<i2").reshape(-1, 2))
