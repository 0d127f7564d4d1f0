"""Audio benchmark: choose the streaming resampler by measurement, and time the codec path.

For every candidate resampler and both directions of a call (caller 8k -> model 16k, model 24k
-> caller 8k) it measures what matters on a phone call:

* held back: how much audio the resampler has taken in but not yet given out, after each 20 ms
  frame (input seconds - output seconds), mean and max. This is latency added to every turn.
* CPU µs per 20 ms frame (median).
* alias / image rejection: downsampler, tones 4-12 kHz (everything that would fold into the
  0-4 kHz phone band), worst case; upsampler, tones 0.3-3.4 kHz, worst energy of the images
  above 4 kHz. In dB below the tone.
* in-band SNR: 300-3400 Hz, against a whole-signal high-quality reference (soxr VHQ, one shot).
* stream vs one-shot: largest difference (LSB) between the streamed output (20 ms frames) and
  the same filter run once over the whole signal.
* PESQ-WB of 8k -> 16k against the reference, if the `pesq` package is installed.

Then it times the full per-frame codec path (Twilio payload -> 16 kHz PCM bytes, and 20 ms of
24 kHz PCM -> Twilio payload), median and p99, fused (`livecall.audio.transcode`) and composed
from the public pieces for comparison.

Run: `python -m livecall.bench.audio` (or `bench/audio.py`). Results: docs/audio.md.
"""

from __future__ import annotations

import base64
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import soxr

from livecall.audio import g711
from livecall.audio.resample import (
    PolyphaseResampler,
    StreamResampler,
    design_lowpass,
    quantize_taps,
)
from livecall.audio.transcode import InboundTranscoder, OutboundTranscoder

Int16Array = npt.NDArray[np.int16]

FRAME_MS = 20
PHONE_BAND = (300.0, 3400.0)
DIRECTIONS = ((8000, 16000), (24000, 8000))
"""The two directions of a Twilio <-> Gemini Live call."""

SPEC_HELD_MS = 5.0
SPEC_REJECTION_DB = 60.0
SPEC_SNR_DB = 40.0


# -- test signals ---------------------------------------------------------------------------


def speech_like(rate: int, seconds: float, seed: int = 0) -> Int16Array:
    """Synthetic voice: gliding harmonics under moving formants, fricative noise, pauses.

    Band-limited to 0.95 x Nyquist of `rate`, so a 24 kHz signal has content up to 11.4 kHz
    (what folds into the phone band if the downsampler lets it) and an 8 kHz one up to 3.8 kHz.
    Peak -6 dBFS.
    """
    rng = np.random.default_rng(seed)
    n = round(rate * seconds)
    t = np.arange(n) / rate
    f0 = 140.0 + 35.0 * np.sin(2 * np.pi * 0.7 * t) + 15.0 * np.sin(2 * np.pi * 2.3 * t + 1.0)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = (
        (550.0 + 200.0 * np.sin(2 * np.pi * 1.1 * t), 90.0),
        (1500.0 + 500.0 * np.sin(2 * np.pi * 0.8 * t + 1.0), 120.0),
        (2600.0 + 300.0 * np.sin(2 * np.pi * 0.5 * t + 2.0), 160.0),
        (3600.0 + 200.0 * np.sin(2 * np.pi * 0.3 * t), 250.0),
    )
    f_max = 0.95 * rate / 2
    voiced = np.zeros(n)
    for k in range(1, int(f_max // 90.0) + 1):
        fk = k * f0
        gain = 0.3 / k + sum(np.exp(-(((fk - f) / bw) ** 2)) for f, bw in formants)
        gain *= 1.0 / (1.0 + (fk / 4000.0) ** 2) ** 0.5 + 0.05  # tilt, with some air on top
        voiced += np.where(fk < f_max, gain, 0.0) * np.sin(k * phase)
    # fricatives: white noise shaped to the upper band
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum *= np.clip((freqs - 1500.0) / 2000.0, 0.0, 1.0) * (freqs < f_max)
    noise = np.fft.irfft(spectrum, n)
    noise *= 3.0 * np.std(voiced) / max(float(np.std(noise)), 1e-9)
    # syllables: ~4 per second, voiced or fricative, with gaps
    gate_v, gate_n = np.zeros(n), np.zeros(n)
    pos = 0
    while pos < n:
        length = int(rate * rng.uniform(0.12, 0.3))
        gap = int(rate * rng.uniform(0.03, 0.15))
        target = gate_v if rng.random() < 0.75 else gate_n
        target[pos : pos + length] = rng.uniform(0.4, 1.0)
        pos += length + gap
    smooth = np.hanning(max(3, int(0.02 * rate)))
    smooth /= smooth.sum()
    gate_v = np.convolve(gate_v, smooth, mode="same")
    gate_n = np.convolve(gate_n, smooth, mode="same")
    x = voiced * gate_v + 0.3 * noise * gate_n
    x *= 16384.0 / np.max(np.abs(x))
    return np.round(x).astype(np.int16)


def tone(rate: int, freq: float, seconds: float, amplitude: float = 16384.0) -> Int16Array:
    """A sine (phase offset so a tone at Nyquist is not all zeros)."""
    t = np.arange(round(rate * seconds)) / rate
    return np.round(amplitude * np.sin(2 * np.pi * freq * t + np.pi / 4)).astype(np.int16)


# -- candidates -----------------------------------------------------------------------------


class Resampler(Protocol):
    def process(self, samples: Int16Array) -> Int16Array: ...
    def flush(self) -> Int16Array: ...


class SoxrStream:
    """soxr.ResampleStream (int16 I/O) behind the StreamResampler interface."""

    def __init__(self, in_rate: int, out_rate: int, quality: str) -> None:
        self.args = (in_rate, out_rate, quality)
        self._s = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)

    def process(self, samples: Int16Array) -> Int16Array:
        return self._s.resample_chunk(samples)

    def flush(self) -> Int16Array:
        tail = self._s.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        self._s = soxr.ResampleStream(*self.args[:2], 1, dtype="int16", quality=self.args[2])
        return tail


class SoxrPerChunk:
    """One-shot soxr on every chunk, no state carried: the naive plan. No delay, but clicks."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.args = (in_rate, out_rate, quality)

    def process(self, samples: Int16Array) -> Int16Array:
        return soxr.resample(samples, *self.args[:2], quality=self.args[2])

    def flush(self) -> Int16Array:
        return np.zeros(0, dtype=np.int16)


def _kaiser(in_rate: int, out_rate: int) -> PolyphaseResampler:
    taps = quantize_taps(design_lowpass(in_rate, out_rate, method="kaiser"))
    return PolyphaseResampler(in_rate, out_rate, taps)


@dataclass(frozen=True)
class Candidate:
    name: str
    make: Callable[[int, int], Resampler]
    one_shot: Callable[[Int16Array, int, int], Int16Array]  # the same filter, whole signal


def _stream_one_shot(make: Callable[[int, int], Resampler]) -> Callable[..., Int16Array]:
    def run(x: Int16Array, in_rate: int, out_rate: int) -> Int16Array:
        r = make(in_rate, out_rate)
        return np.concatenate([r.process(x), r.flush()])

    return run


def _soxr_stream(quality: str) -> Callable[[int, int], Resampler]:
    return lambda fi, fo: SoxrStream(fi, fo, quality)


def _soxr_one_shot(quality: str) -> Callable[..., Int16Array]:
    return lambda x, fi, fo: soxr.resample(x, fi, fo, quality=quality)


def candidates() -> list[Candidate]:
    out = [
        Candidate("FIR remez", StreamResampler, _stream_one_shot(StreamResampler)),
        Candidate("FIR kaiser", _kaiser, _stream_one_shot(_kaiser)),
    ]
    for q in ("LQ", "MQ", "HQ", "VHQ"):
        out.append(Candidate(f"soxr {q} stream", _soxr_stream(q), _soxr_one_shot(q)))
    out.append(Candidate("soxr HQ per-chunk", SoxrPerChunk, _soxr_one_shot("HQ")))
    return out


# -- measurements -----------------------------------------------------------------------------


def stream(r: Resampler, x: Int16Array, frame: int) -> Int16Array:
    """Feed `x` in frames of `frame` samples, then flush."""
    parts = [r.process(x[i : i + frame]) for i in range(0, len(x), frame)]
    parts.append(r.flush())
    return np.concatenate(parts)


def held_back_ms(r: Resampler, x: Int16Array, in_rate: int, out_rate: int) -> tuple[float, float]:
    """Audio taken in but not yet given out after each 20 ms frame: (mean, max) in ms."""
    frame = in_rate * FRAME_MS // 1000
    n_in = n_out = 0
    held = []
    for i in range(0, len(x) - frame + 1, frame):
        n_out += len(r.process(x[i : i + frame]))
        n_in += frame
        held.append(1000.0 * (n_in / in_rate - n_out / out_rate))
    r.flush()
    return float(np.mean(held)), float(np.max(held))


def cpu_us_per_frame(r: Resampler, x: Int16Array, in_rate: int, repeat: int = 3) -> list[float]:
    """Per-call wall time of `process` on 20 ms frames (GC off), in µs."""
    frame = in_rate * FRAME_MS // 1000
    frames = [x[i : i + frame] for i in range(0, len(x) - frame + 1, frame)]
    times: list[float] = []
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            for f in frames:
                t0 = clock()
                r.process(f)
                times.append((clock() - t0) / 1000.0)
            r.flush()
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def alias_rejection_db(
    make: Callable[[int, int], Resampler], in_rate: int, out_rate: int, step: float = 100.0
) -> tuple[float, float]:
    """Worst (lowest) rejection in dB and the tone frequency where it happens.

    Downsampling: every input tone from the output Nyquist to the input Nyquist would alias;
    rejection = input tone RMS / output RMS. Upsampling: tones across the phone band; rejection
    = total output energy / output energy above the input Nyquist (the images).
    """
    frame = in_rate * FRAME_MS // 1000
    seconds = 0.3
    worst, worst_f = np.inf, 0.0
    if out_rate < in_rate:
        freqs = np.arange(out_rate / 2, in_rate / 2 + 1, step)
    else:
        freqs = np.arange(PHONE_BAND[0], PHONE_BAND[1] + 1, step)
    for f in freqs:
        x = tone(in_rate, float(f), seconds)
        y = stream(make(in_rate, out_rate), x, frame).astype(np.float64)
        skip = int(0.06 * out_rate)
        y = y[skip : len(y) - skip]
        if out_rate < in_rate:
            x_rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
            y_rms = max(np.sqrt(np.mean(y**2)), 1e-3)
            rej = 20 * np.log10(x_rms / y_rms)
        else:
            spec = np.abs(np.fft.rfft(y * np.hanning(len(y)))) ** 2
            freq_axis = np.fft.rfftfreq(len(y), 1 / out_rate)
            images = max(spec[freq_axis > in_rate / 2].sum(), 1e-12)
            rej = 10 * np.log10(spec.sum() / images)
        if rej < worst:
            worst, worst_f = float(rej), float(f)
    return worst, worst_f


def in_band_snr_db(
    y: npt.ArrayLike, ref: npt.ArrayLike, rate: int, band: tuple[float, float] = PHONE_BAND
) -> float:
    """SNR of `y` against `ref` counting only the error inside `band` (Hann-windowed FFT).

    The first and last 50 ms are left out: the two filters may treat the signal's edges
    differently, and that is not what a call hears.
    """
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    n = min(len(y), len(ref))
    skip = int(0.05 * rate)
    y, ref = y[skip : n - skip], ref[skip : n - skip]
    w = np.hanning(len(ref))
    err = np.fft.rfft((y - ref) * w)
    sig = np.fft.rfft(ref * w)
    f = np.fft.rfftfreq(len(ref), 1 / rate)
    mask = (f >= band[0]) & (f <= band[1])
    return float(10 * np.log10(np.sum(np.abs(sig[mask]) ** 2) / np.sum(np.abs(err[mask]) ** 2)))


def reference(x: Int16Array, in_rate: int, out_rate: int) -> Int16Array:
    """The whole-signal high-quality reference: soxr VHQ, one shot."""
    return soxr.resample(x, in_rate, out_rate, quality="VHQ")


def _pesq_wb(ref16: Int16Array, deg16: Int16Array) -> float | None:
    try:
        from pesq import pesq
    except ImportError:
        return None
    n = min(len(ref16), len(deg16))
    try:
        return float(pesq(16000, ref16[:n].astype(np.float64), deg16[:n].astype(np.float64), "wb"))
    except Exception:  # e.g. no utterance detected in a synthetic signal
        return None


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure_candidate(c: Candidate, in_rate: int, out_rate: int, x: Int16Array) -> dict[str, Any]:
    frame = in_rate * FRAME_MS // 1000
    ref = reference(x, in_rate, out_rate)
    streamed = stream(c.make(in_rate, out_rate), x, frame)
    one_shot = c.one_shot(x, in_rate, out_rate)
    n = min(len(streamed), len(one_shot))
    held_mean, held_max = held_back_ms(c.make(in_rate, out_rate), x, in_rate, out_rate)
    times = cpu_us_per_frame(c.make(in_rate, out_rate), x, in_rate)
    rejection, worst_f = alias_rejection_db(c.make, in_rate, out_rate)
    result: dict[str, Any] = {
        "held_mean_ms": held_mean,
        "held_max_ms": held_max,
        "cpu_us_median": _percentile(times, 50),
        "cpu_us_p99": _percentile(times, 99),
        "rejection_db": rejection,
        "rejection_worst_hz": worst_f,
        "snr_db": in_band_snr_db(streamed, ref, out_rate),
        "stream_vs_one_shot_lsb": int(
            np.max(np.abs(streamed[:n].astype(np.int32) - one_shot[:n].astype(np.int32)))
        ),
        "length_diff": len(streamed) - len(one_shot),
    }
    if out_rate == 16000:
        result["pesq_wb"] = _pesq_wb(ref, streamed)
    return result


# -- codec path ----------------------------------------------------------------------------


def _time_interleaved(
    jobs: dict[str, tuple[Callable[[Any], Any], list[Any]]], repeat: int
) -> dict[str, list[float]]:
    """Per-call µs of each job, the jobs taking turns so machine noise hits them alike."""
    clock = time.perf_counter_ns
    times: dict[str, list[float]] = {name: [] for name in jobs}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            for name, (fn, inputs) in jobs.items():
                out = times[name]
                for item in inputs:
                    t0 = clock()
                    fn(item)
                    out.append((clock() - t0) / 1000.0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def measure_codec_path(seconds: float, repeat: int = 6) -> dict[str, dict[str, float]]:
    """µs per 20 ms frame of the whole codec path, each way: fused, and composed by hand."""
    caller = speech_like(8000, seconds, seed=1)
    payloads = [
        base64.b64encode(g711.ulaw_encode(caller[i : i + 160]).tobytes()).decode("ascii")
        for i in range(0, len(caller) - 159, 160)
    ]
    agent = speech_like(24000, seconds, seed=2)
    chunks = [agent[i : i + 480].tobytes() for i in range(0, len(agent) - 479, 480)]

    inbound = InboundTranscoder(16000)
    outbound = OutboundTranscoder(24000)
    up = StreamResampler(8000, 16000)
    down = StreamResampler(24000, 8000)

    def composed_in(p: str) -> bytes:
        return up.process(g711.ulaw_decode(base64.b64decode(p))).tobytes()

    def composed_out(pcm: bytes) -> str:
        codes = g711.ulaw_encode(down.process(np.frombuffer(pcm, dtype=np.int16)))
        return base64.b64encode(codes.tobytes()).decode("ascii")

    times = _time_interleaved(
        {
            "in: payload -> 16k PCM, InboundTranscoder": (inbound.decode_payload, payloads),
            "in: same, composed (b64 + g711 + StreamResampler)": (composed_in, payloads),
            "out: 24k PCM -> payload, OutboundTranscoder": (outbound.encode_payload, chunks),
            "out: same, composed (StreamResampler + g711 + b64)": (composed_out, chunks),
        },
        repeat,
    )
    return {
        name: {"median_us": _percentile(t, 50), "p99_us": _percentile(t, 99), "calls": len(t)}
        for name, t in times.items()
    }


# -- optional recorded speech ------------------------------------------------------------------


def recorded_speech(rate: int) -> Int16Array | None:
    """The simulator's speech clips at `rate` (mono PCM16 WAVs), joined; None if there are none.

    Only an extra check on real(istic) speech: the benchmark does not depend on them.
    """
    import wave
    from pathlib import Path

    import livecall

    clip_dir = Path(livecall.__file__).parent / "sim" / "clips"
    parts = []
    for path in sorted(clip_dir.glob("*.wav")):
        try:
            with wave.open(str(path)) as w:
                if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (rate, 1, 2):
                    continue
                parts.append(np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"))
        except (OSError, wave.Error, EOFError):
            continue
    return np.concatenate(parts).astype(np.int16) if parts else None


def measure_recorded(c: Candidate, in_rate: int, out_rate: int, x: Int16Array) -> dict[str, Any]:
    y = stream(c.make(in_rate, out_rate), x, in_rate * FRAME_MS // 1000)
    ref = reference(x, in_rate, out_rate)
    result: dict[str, Any] = {"snr_db": in_band_snr_db(y, ref, out_rate)}
    if out_rate == 16000:
        result["pesq_wb"] = _pesq_wb(ref, y)
    return result


# -- report ----------------------------------------------------------------------------------


def meets_spec(by_direction: dict[str, dict[str, Any]]) -> bool:
    return all(
        m["held_max_ms"] <= SPEC_HELD_MS
        and m["rejection_db"] >= SPEC_REJECTION_DB
        and m["snr_db"] >= SPEC_SNR_DB
        for m in by_direction.values()
    )


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _direction(in_rate: int, out_rate: int) -> str:
    return f"{in_rate // 1000}k->{out_rate // 1000}k"


def run_audio_benchmark(seconds: float = 10.0, console: Any = None) -> dict[str, Any]:
    """Measure every candidate both ways and the codec path; print rich tables; return figures.

    `seconds` is the length of the speech-like test signal (and of the codec-path run).
    """
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console(width=max(Console().width, 132))
    started = time.perf_counter()
    signals = {fi: speech_like(fi, seconds, seed=fi) for fi, _ in DIRECTIONS}
    recorded = {fi: recorded_speech(fi) for fi, _ in DIRECTIONS}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for c in candidates():
        results[c.name] = {}
        for fi, fo in DIRECTIONS:
            m = measure_candidate(c, fi, fo, signals[fi])
            if (speech := recorded[fi]) is not None:
                m["recorded"] = measure_recorded(c, fi, fo, speech)
            results[c.name][_direction(fi, fo)] = m

    passing = [name for name, by_dir in results.items() if meets_spec(by_dir)]
    chosen = min(
        passing,
        key=lambda n: (
            max(m["held_max_ms"] for m in results[n].values()),
            sum(m["cpu_us_median"] for m in results[n].values()),
        ),
        default=None,
    )

    table = Table(
        title=f"Streaming resamplers: {seconds:g} s speech-like signal in 20 ms frames. Spec: held "
        f"<= {SPEC_HELD_MS:g} ms, rejection >= {SPEC_REJECTION_DB:g} dB, "
        f"SNR >= {SPEC_SNR_DB:g} dB"
    )
    columns = [
        "candidate",
        "dir",
        "held ms\nmean / max",
        "CPU µs/frame\nmedian",
        "alias/image\nrej. dB (worst at)",
        "in-band\nSNR dB",
        "stream vs\n1-shot LSB",
        "PESQ-WB",
        "clips SNR dB\n(PESQ-WB)",
        "meets\nspec",
    ]
    for col in columns:
        table.add_column(col, justify="left" if col in ("candidate", "dir") else "right")
    for name, by_dir in results.items():
        for direction, m in by_dir.items():
            rec = m.get("recorded")
            clips = "-"
            if rec is not None:
                clips = _fmt(rec["snr_db"])
                if rec.get("pesq_wb") is not None:
                    clips += f" ({rec['pesq_wb']:.2f})"
            table.add_row(
                name,
                direction,
                f"{m['held_mean_ms']:.1f} / {m['held_max_ms']:.1f}",
                f"{m['cpu_us_median']:.1f}",
                f"{m['rejection_db']:.1f} ({m['rejection_worst_hz'] / 1000:g}k)",
                f"{m['snr_db']:.1f}",
                str(m["stream_vs_one_shot_lsb"]),
                _fmt(m.get("pesq_wb"), ".2f"),
                clips,
                "yes" if name in passing else "no",
            )
        table.add_section()
    console.print(table)
    console.print(
        f"Default chosen by measurement (meets spec; least held back, then least CPU): {chosen}"
    )

    codec = measure_codec_path(seconds)
    t2 = Table(title="Full codec path per 20 ms frame (target <= 10 µs each way)")
    t2.add_column("path")
    t2.add_column("median µs", justify="right")
    t2.add_column("p99 µs", justify="right")
    for name, m in codec.items():
        t2.add_row(name, f"{m['median_us']:.1f}", f"{m['p99_us']:.1f}")
    console.print(t2)
    elapsed = time.perf_counter() - started
    console.print(f"benchmark took {elapsed:.1f} s")
    return {
        "seconds": seconds,
        "resamplers": results,
        "passing": passing,
        "chosen": chosen,
        "codec_path": codec,
        "elapsed_s": elapsed,
    }


if __name__ == "__main__":
    run_audio_benchmark()
