"""Stereo call recordings (caller left, agent right, what the caller heard) and their storage."""

from __future__ import annotations

import os
import time
import tracemalloc
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile

from livecall.audio.recording import RATE, StereoRecorder
from livecall.store.recordings import LocalRecordingStore, cleanup_expired

FRAME_MS = 20
FRAME = RATE * FRAME_MS // 1000  # 160 samples


def tone(ms: float, value: int) -> np.ndarray:
    return np.full(round(ms * RATE / 1000), value, dtype=np.int16)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, RATE)
        data = wav.readframes(wav.getnframes())
    return np.frombuffer(data, dtype="<i2").reshape(-1, 2)


def at(ms: float) -> int:
    return round(ms * RATE / 1000)


def raw_files(directory: Path) -> list[Path]:
    """The recorder's temp files left in `directory`."""
    return list(directory.glob("*.raw"))


def test_caller_left_agent_right_at_their_times(tmp_path: Path) -> None:
    rec = StereoRecorder(tmp_dir=tmp_path)
    for n in range(50):  # one second of caller frames, each with its own value
        rec.add_caller(n * FRAME_MS, tone(FRAME_MS, 100 + n))
    rec.add_agent(500, tone(300, -2000))
    out = rec.finish(tmp_path / "call.wav", "wav")

    audio = read_wav(out)
    assert len(audio) == at(1000)
    left, right = audio[:, 0], audio[:, 1]
    assert np.array_equal(left, np.repeat(np.arange(100, 150, dtype=np.int16), FRAME))
    assert not right[: at(500)].any() and not right[at(800) :].any()
    assert (right[at(500) : at(800)] == -2000).all()
    assert raw_files(tmp_path) == []  # the temp file is gone


def test_gaps_in_caller_audio_become_silence(tmp_path: Path) -> None:
    rec = StereoRecorder(tmp_dir=tmp_path)
    for ms in range(0, 200, FRAME_MS):
        rec.add_caller(ms, tone(FRAME_MS, 7))
    for ms in range(400, 600, FRAME_MS):  # frames 200-400 ms never arrived
        rec.add_caller(ms, tone(FRAME_MS, 9))
    left = read_wav(rec.finish(tmp_path / "gap.wav"))[:, 0]
    assert len(left) == at(600)
    assert (left[: at(200)] == 7).all()
    assert not left[at(200) : at(400)].any()
    assert (left[at(400) :] == 9).all()


def test_clear_drops_the_agent_audio_the_caller_never_heard(tmp_path: Path) -> None:
    rec = StereoRecorder(tmp_dir=tmp_path)
    for ms in range(0, 4000, FRAME_MS):
        rec.add_caller(ms, tone(FRAME_MS, 1))
    # a 2 s answer sent ahead of playout in 100 ms chunks, from 1.0 s on
    for n in range(20):
        rec.add_agent(1000 + n * 100, tone(100, 500 + n))
    rec.cut_agent(1850)  # barge-in: Twilio's queue cleared at 1.85 s
    rec.add_agent(2500, tone(500, -300))  # the next answer is kept
    right = read_wav(rec.finish(tmp_path / "cut.wav"))[:, 1]

    assert len(right) == at(4000)
    assert not right[: at(1000)].any()
    expected = np.repeat(np.arange(500, 509, dtype=np.int16), at(100))[: at(850)]
    assert np.array_equal(right[at(1000) : at(1850)], expected)
    assert not right[at(1850) : at(2500)].any()
    assert (right[at(2500) : at(3000)] == -300).all()
    assert not right[at(3000) :].any()


def test_finish_can_trim_audio_queued_after_the_hang_up(tmp_path: Path) -> None:
    rec = StereoRecorder(tmp_dir=tmp_path)
    for ms in range(0, 1000, FRAME_MS):
        rec.add_caller(ms, tone(FRAME_MS, 1))
    rec.add_agent(800, tone(3000, 9))  # still queued when the caller hung up at 1 s
    audio = read_wav(rec.finish(tmp_path / "end.wav", end_ms=1000))
    assert len(audio) == at(1000)
    assert (audio[at(800) :, 1] == 9).all()


def test_flac_holds_the_same_samples_as_wav(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    caller = rng.integers(-20000, 20000, size=at(2000), dtype=np.int16)
    agent = rng.integers(-20000, 20000, size=at(700), dtype=np.int16)
    recs = [StereoRecorder(tmp_dir=tmp_path) for _ in range(2)]
    for rec in recs:
        for n in range(0, len(caller), FRAME):
            rec.add_caller(n * 1000 / RATE, caller[n : n + FRAME])
        rec.add_agent(900, agent)
    wav = read_wav(recs[0].finish(tmp_path / "x.wav", "wav"))
    flac_path = recs[1].finish(tmp_path / "x.wav", "flac")  # suffix follows the format
    assert flac_path == tmp_path / "x.flac"
    flac, rate = soundfile.read(flac_path, dtype="int16")
    assert rate == RATE and flac.shape == wav.shape
    assert np.array_equal(flac, wav)
    assert np.array_equal(wav[:, 0], caller)
    assert np.array_equal(wav[at(900) : at(1600), 1], agent)


async def test_an_hour_long_call_keeps_memory_bounded(tmp_path: Path) -> None:
    """60 minutes of 20 ms frames both ways: memory holds about the window, not the call.

    Allocations are traced over five minutes of the steady state (tracing every frame of the
    hour would be slow): holding on to audio would grow by 9.6 MB there.
    """
    minutes = 60
    rec = StereoRecorder(tmp_dir=tmp_path, window_ms=30_000, flush_every_ms=10_000)
    caller = tone(FRAME_MS, 3)
    agent = tone(FRAME_MS, -3)
    most_buffered = 0.0
    traced = range(40 * 60_000 // FRAME_MS, 45 * 60_000 // FRAME_MS)
    growth = peak = 0
    for n in range(minutes * 60_000 // FRAME_MS):
        if n == traced.start:
            tracemalloc.start()
        elif n == traced.stop:
            growth, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        ms = n * FRAME_MS
        rec.add_caller(ms, caller)
        if (ms // 5000) % 2:  # the agent talks every other 5 s
            rec.add_agent(ms, agent)
        if n % 1500 == 1000:  # now and then it is cut short 200 ms ahead
            rec.add_agent(ms + 20, tone(400, 11))
            rec.cut_agent(ms + 200)
        if rec.needs_flush:  # the bridge's housekeeping, off the audio path
            await rec.flush()
        most_buffered = max(most_buffered, rec.buffered_ms)
    assert most_buffered <= 2 * (30_000 + 10_000 + 1000)
    assert growth < 3 * 2**20 and peak < 6 * 2**20
    out = await rec.finish_async(tmp_path / "long.flac", "flac")
    info = soundfile.info(out)
    assert info.frames == minutes * 60 * RATE and info.channels == 2
    tail, _ = soundfile.read(out, start=info.frames - at(100), dtype="int16")
    assert (tail[:, 0] == 3).all()
    # 3597 s is in an agent stretch (3595 // 5 is odd)
    span, _ = soundfile.read(out, start=at(3597_000), frames=at(100), dtype="int16")
    assert (span[:, 1] == -3).all()
    assert raw_files(tmp_path) == []


async def test_the_recorder_flushes_by_itself_with_a_running_loop(tmp_path: Path) -> None:
    rec = StereoRecorder(tmp_dir=tmp_path, window_ms=1000, flush_every_ms=500)
    for ms in range(0, 1600, FRAME_MS):
        rec.add_caller(ms, tone(FRAME_MS, 5))
    task = rec._flush_task
    assert task is not None  # scheduled, not run: add_caller did no I/O
    assert raw_files(tmp_path) == []
    await task
    assert raw_files(tmp_path) != []
    assert rec.buffered_ms <= 1100
    left = read_wav(await rec.finish_async(tmp_path / "auto.wav"))[:, 0]
    assert len(left) == at(1600) and (left == 5).all()


def test_audio_older_than_the_window_is_counted_not_misplaced(tmp_path: Path) -> None:
    rec = StereoRecorder(tmp_dir=tmp_path, window_ms=1000, flush_every_ms=200)
    for ms in range(0, 3000, FRAME_MS):
        rec.add_caller(ms, tone(FRAME_MS, 1))
    rec.flush_sync()
    rec.add_agent(500, tone(100, 9))  # too late: 0.5 s is already written
    rec.cut_agent(100)  # likewise, a cut that far back cannot change the file
    assert rec.late_samples == at(100) + at(1900)
    audio = read_wav(rec.finish(tmp_path / "late.wav"))
    assert len(audio) == at(3000) and not audio[:, 1].any()


def test_empty_recording_is_a_valid_file(tmp_path: Path) -> None:
    out = StereoRecorder(tmp_dir=tmp_path).finish(tmp_path / "empty.wav")
    assert len(read_wav(out)) == 0


# --- where recordings are kept ---------------------------------------------------------------


async def test_local_recording_store(tmp_path: Path) -> None:
    store = LocalRecordingStore(tmp_path / "recordings")
    made = tmp_path / "made.wav"
    made.write_bytes(b"RIFF....")
    key = await store.put("CA1", made)
    assert key == str(tmp_path / "recordings" / "CA1.wav") and not made.exists()
    opened = await store.open("CA1")
    assert opened is not None and opened.media_type == "audio/wav" and opened.size == 8
    assert await store.open("CA2") is None
    assert await store.open("../etc/passwd") is None
    with pytest.raises(ValueError):
        store.path_for("../x")

    # finishing straight into place, then put(), leaves the file where it is
    flac = store.path_for("CA3", "flac")
    StereoRecorder(tmp_dir=tmp_path).finish(flac, "flac")
    assert await store.put("CA3", flac) == str(flac) and flac.exists()
    found = await store.open("CA3")
    assert found is not None and found.media_type == "audio/flac"

    assert await store.delete("CA1")
    assert not await store.delete("CA1")
    assert await store.open("CA1") is None


async def test_retention_deletes_only_old_recordings(tmp_path: Path) -> None:
    store = LocalRecordingStore(tmp_path)
    now = time.time()
    for sid, age_days in (("CAOLD", 40), ("CAEDGE", 29), ("CANEW", 1)):
        path = store.path_for(sid)
        path.write_bytes(b"x")
        os.utime(path, (now - age_days * 86400, now - age_days * 86400))
    (tmp_path / "notes.txt").write_text("not a recording")

    class Keys:
        def __init__(self) -> None:
            self.cleared: list[str] = []

        async def clear_recordings(self, sids: object) -> None:
            self.cleared.extend(sids)  # type: ignore[call-overload]

    keys = Keys()
    assert await store.list_older_than(30) == ["CAOLD"]
    assert await cleanup_expired(store, 30, keys) == ["CAOLD"]
    assert keys.cleared == ["CAOLD"]
    assert sorted(os.listdir(tmp_path)) == ["CAEDGE.wav", "CANEW.wav", "notes.txt"]
    assert await store.cleanup_expired(7) == ["CAEDGE"]
