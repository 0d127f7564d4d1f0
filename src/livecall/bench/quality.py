"""Quality benchmark: does the bridge's audio path cost anything beyond the phone codec itself?

Real calls through the real bridge (in-process `LocalStack`: fake Gemini in assistant mode +
simulated Twilio caller). The caller says the library clips; the fake model answers each with a
scripted agent clip. For both directions the audio that arrived is compared, with PESQ, against
a whole-signal conversion of what was said, done once over the whole clip with soxr VHQ:

* caller -> model (PESQ-WB, 16 kHz): *reference* = the caller's clean 8 kHz clip, VHQ 8k->16k;
  *ideal* = the caller's μ-law clip (what went on the line) decoded, VHQ 8k->16k;
  *measured* = what the fake model received (`SessionRecord.received_audio`).
* model -> caller (PESQ-NB, 8 kHz): *reference* = the agent's 24 kHz clip, VHQ 24k->8k;
  *ideal* = the reference through μ-law and back (all a perfect bridge may cost);
  *measured* = what the simulated caller heard (its playout timeline).

`ideal` and `measured` are found in the received streams by cross-correlation. The target:
PESQ(reference, measured) within 0.1 of PESQ(reference, ideal), i.e. the bridge's streaming
resamplers cost no more than 0.1 on top of the μ-law line. PESQ(ideal, measured) is shown too.

μ-law here is our own G.711 (Sun `g711.c` rules), not livecall's, so a bug in the product's
codec tables cannot cancel out. The caller sends exactly these μ-law bytes.

Agent audio comes unpaced (all of a reply at once: the codec path alone) and paced the way the
fake's default scenario sends it (1.3x real time in bursts with hiccups, as the service does);
a hiccup that outlasts the caller's queued audio is a gap the caller hears, which shows up in
the paced rows and is the model's doing, not the codec's.

Run: ``python bench/quality.py`` or ``python -m livecall.bench.quality``. Writes
``bench/out/quality.json``. Needs `pesq` (dev / bench extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr
from scipy import signal

__all__ = [
    "DEFAULT_SEQUENCES",
    "TARGET_DELTA",
    "ClipScore",
    "print_quality_table",
    "run_quality_benchmark",
    "run_quality_benchmark_async",
    "ulaw_decode_ref",
    "ulaw_encode_ref",
]

TARGET_DELTA = 0.1
CALLER_CLIPS_SAID = ("book", "time", "hours", "yes")
DEFAULT_SEQUENCES: tuple[tuple[str, ...], ...] = (
    ("book_reply", "time_reply", "hours_reply", "goodbye"),
    ("greeting", "sorry", "one_moment", "apology"),
)
"""Agent replies to the four caller clips, one call each: all eight agent clips are heard."""

Float = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- reference G.711


def ulaw_encode_ref(pcm: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """int16 -> G.711 μ-law, Sun `g711.c` `linear2ulaw` (14-bit magnitude, bias 33, clip 8159)."""
    x = np.asarray(pcm, dtype=np.int32) >> 2
    negative = x < 0
    mag = np.minimum(np.where(negative, -x, x), 8159) + 33
    seg = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 5, 0, 8)
    code = np.where(seg > 7, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))  # 8: past the top
    return np.where(negative, code ^ 0x7F, code ^ 0xFF).astype(np.uint8)


def ulaw_decode_ref(codes: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """G.711 μ-law -> int16, Sun `g711.c` `ulaw2linear`."""
    u = ~np.asarray(codes, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


# --------------------------------------------------------------------------- scoring


@dataclass(slots=True)
class ClipScore:
    """One clip in one direction: the three PESQ numbers and where it was found."""

    direction: str  # "caller->model" | "model->caller"
    pacing: str  # "unpaced" | "paced"
    clip: str
    ref_vs_ideal: float | None
    ref_vs_measured: float | None
    delta: float | None  # ref_vs_ideal - ref_vs_measured; <= TARGET_DELTA passes
    ideal_vs_measured: float | None
    match: float  # normalized cross-correlation peak of ideal in the stream (1.0: same)
    offset_s: float  # where it was found in the stream
    gaps_ms: float  # silence inserted inside the clip (its end is found this much late)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.delta is not None and self.delta <= TARGET_DELTA


def _pesq(rate: int, ref: Float, deg: Float) -> float | None:
    from pesq import PesqError, pesq

    try:
        return round(float(pesq(rate, ref, deg, "wb" if rate == 16000 else "nb")), 3)
    except PesqError:
        return None


def _find(stream: Float, clip: Float) -> tuple[int, float]:
    """Sample offset of `clip` in `stream` (cross-correlation peak) and the normalized peak."""
    if len(stream) < len(clip):
        stream = np.concatenate([stream, np.zeros(len(clip) - len(stream))])
    xc = signal.correlate(stream, clip, mode="valid", method="fft")
    lag = int(np.argmax(xc))
    seg = stream[lag : lag + len(clip)]
    norm = float(np.linalg.norm(seg) * np.linalg.norm(clip)) or 1.0
    return lag, float(xc[lag]) / norm


def _segment(stream: Float, lag: int, n: int) -> Float:
    seg = stream[lag : lag + n]
    return np.concatenate([seg, np.zeros(n - len(seg))]) if len(seg) < n else seg


def _gaps_ms(stream: Float, ideal: Float, rate: int) -> float:
    """How much later the clip's last 400 ms turn up than its first 400 ms say they should:
    the playout holes (underruns) inside it, or audio missing from it if negative."""
    n = int(0.4 * rate)
    if len(ideal) < 3 * n:
        return 0.0
    head, _ = _find(stream, ideal[:n])
    tail_at = head + len(ideal) - n
    lo = max(0, tail_at - 2 * rate)  # look up to 2 s early and 10 s late
    tail, _ = _find(stream[lo : tail_at + 10 * rate + n], ideal[-n:])
    return round(1000.0 * (lo + tail - tail_at) / rate, 1)


def _score(
    direction: str, pacing: str, clip: str, rate: int, ref: Float, ideal: Float, stream: Float
) -> ClipScore:
    lag, match = _find(stream, ideal)
    measured = _segment(stream, lag, len(ideal))
    a = _pesq(rate, ref, ideal)
    b = _pesq(rate, ref, measured)
    gaps = _gaps_ms(stream, ideal, rate)
    note = ""
    if abs(gaps) >= 5.0:
        note = f"{gaps:g} ms of gaps inside the clip"
    elif match < 0.9:
        note = f"weak match ({match:.2f})"
    return ClipScore(
        direction=direction,
        pacing=pacing,
        clip=clip,
        ref_vs_ideal=a,
        ref_vs_measured=b,
        delta=None if a is None or b is None else round(a - b, 3),
        ideal_vs_measured=_pesq(rate, ideal, measured),
        match=round(match, 4),
        offset_s=round(lag / rate, 3),
        gaps_ms=gaps,
        note=note,
    )


def _f(x: npt.ArrayLike) -> Float:
    return np.asarray(x, dtype=np.float64)


def _vhq(x: Float, rate_in: int, rate_out: int) -> Float:
    return _f(soxr.resample(x, rate_in, rate_out, quality="VHQ"))


# --------------------------------------------------------------------------- calls


async def _one_call(
    replies: Sequence[str], pacing: str, work: Path, seed: int
) -> tuple[list[ClipScore], dict[str, Any]]:
    """One call: say the four caller clips, each answered by the next agent clip."""
    from livecall.sim.clips import load_clip
    from livecall.sim.gemini import Scenario
    from livecall.sim.stack import LocalStack
    from livecall.sim.twilio import Pause, Say, WaitForAgentSilence

    scenario = Scenario(
        mode="assistant",
        reply_sequence=list(replies),
        rate=None if pacing == "unpaced" else 1.3,
        seed=seed,
    )
    said = {name: ulaw_encode_ref(load_clip(name)[0]) for name in CALLER_CLIPS_SAID}
    script: list[Any] = [Pause(500)]
    for name in CALLER_CLIPS_SAID:
        script += [
            Say(said[name].tobytes(), rate=8000, label=name),
            WaitForAgentSilence(silence_ms=1200, timeout=40.0),
            Pause(400),
        ]
    overrides = {"recording_enabled": False, "spool_dir": work / "spool",
                 "recordings_dir": work / "recordings",
                 "database_url": f"sqlite+aiosqlite:///{work / 'calls.db'}"}  # fmt: skip
    async with LocalStack(scenario=scenario, settings_overrides=overrides) as stack:
        result = await stack.caller(script, timeout=240.0).run()
        gemini = stack.gemini
        assert gemini is not None
        await gemini.wait_for(lambda: all(s.closed for s in gemini.sessions), 10.0)
        sessions = list(gemini.sessions)
    received = _f(np.frombuffer(b"".join(bytes(s.received_audio) for s in sessions), "<i2"))
    heard = _f(ulaw_decode_ref(np.frombuffer(result.heard, dtype=np.uint8)))
    scores = []
    for name in CALLER_CLIPS_SAID:
        clean, rate = load_clip(name)
        ref = _vhq(_f(clean), rate, 16000)
        ideal = _vhq(_f(ulaw_decode_ref(said[name])), rate, 16000)
        scores.append(_score("caller->model", pacing, name, 16000, ref, ideal, received))
    turns = [t for s in sessions for t in s.turns]
    for name in replies:
        clean, rate = load_clip(name)
        ref = _vhq(_f(clean), rate, 8000)
        ideal = _f(ulaw_decode_ref(ulaw_encode_ref(np.clip(np.round(ref), -32768, 32767))))
        score = _score("model->caller", pacing, name, 8000, ref, ideal, heard)
        turn = next((t for t in turns if t.reply_clip == name), None)
        if turn is None:
            score.note = "the model never sent it"
        elif turn.interrupted:
            score.note = "; ".join(x for x in ("reply was interrupted", score.note) if x)
        scores.append(score)
    info = {
        "pacing": pacing,
        "replies": list(replies),
        "sessions": len(sessions),
        "model_turns": [(t.reply_clip, t.interrupted) for t in turns],
        "caller_script_errors": result.script_errors,
        "caller_protocol_errors": result.protocol_errors[:5],
        "heard_s": round(len(heard) / 8000, 2),
        "received_s": round(len(received) / 16000, 2),
    }
    return scores, info


async def run_quality_benchmark_async(
    pacings: Sequence[str] = ("unpaced", "paced"),
    sequences: Sequence[Sequence[str]] = DEFAULT_SEQUENCES,
) -> dict[str, Any]:
    """One call after the other: stacks started side by side in one process share Alembic's
    global migration context (their store falls over), and a stalled loop would show up as
    playout gaps that are not the codec's."""
    done = []
    with tempfile.TemporaryDirectory(prefix="livecall-quality-") as tmp:
        for pacing in pacings:
            for i, seq in enumerate(sequences):
                work = Path(tempfile.mkdtemp(prefix=f"{pacing}-{i}-", dir=tmp))
                done.append(await _one_call(seq, pacing, work, seed=i))
    scores = [s for batch, _ in done for s in batch]
    from livecall.audio import g711

    all_int16 = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    codes = np.arange(256, dtype=np.uint8)
    same_codec = bool(
        np.array_equal(g711.ulaw_encode(all_int16), ulaw_encode_ref(all_int16))
        and np.array_equal(g711.ulaw_decode(codes.tobytes()), ulaw_decode_ref(codes))
    )
    return {
        "benchmark": "quality",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target_delta": TARGET_DELTA,
        "livecall_ulaw_matches_reference_g711": same_codec,
        "calls": [info for _, info in done],
        "scores": [{**asdict(s), "ok": s.ok} for s in scores],
        "summary": _summary(scores),
    }


def _summary(scores: list[ClipScore]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for direction in ("caller->model", "model->caller"):
        for pacing in sorted({s.pacing for s in scores}):
            group = [s for s in scores if s.direction == direction and s.pacing == pacing]
            deltas = [s.delta for s in group if s.delta is not None]
            clean = [s for s in group if abs(s.gaps_ms) < 5.0 and "interrupted" not in s.note]
            clean_deltas = [s.delta for s in clean if s.delta is not None]
            out[f"{direction} {pacing}"] = {
                "clips": len(group),
                "mean_delta": round(float(np.mean(deltas)), 3) if deltas else None,
                "worst_delta": round(max(deltas), 3) if deltas else None,
                "all_ok": bool(group) and all(s.ok for s in group),
                "clips_with_gaps": len(group) - len(clean),
                "gaps_ms_total": round(sum(max(0.0, s.gaps_ms) for s in group), 1),
                "worst_delta_without_gaps": round(max(clean_deltas), 3) if clean_deltas else None,
            }
    return out


def run_quality_benchmark(
    pacings: Sequence[str] = ("unpaced", "paced"),
    *,
    out_dir: Path | str = Path("bench/out"),
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the calls, print the table, write quality.json; returns what it holds."""
    from livecall.log import configure_logging

    configure_logging("warning")  # the calls' info lines would bury the table
    report = asyncio.run(run_quality_benchmark_async(pacings))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    if not quiet:
        print_quality_table(report)
    return report


def print_quality_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title="PESQ through the bridge vs a whole-signal ideal (soxr VHQ one-shot + μ-law); "
        f"target Δ ≤ {report['target_delta']}"
    )
    for c in ("direction", "pacing", "clip", "ref→ideal", "ref→measured", "Δ",
              "ideal→measured", "match", "gaps ms", "ok", "note"):  # fmt: skip
        t.add_column(c, justify="left" if c in ("direction", "pacing", "clip", "note") else "right")
    for s in report["scores"]:
        t.add_row(
            s["direction"] + (" WB" if s["direction"] == "caller->model" else " NB"),
            s["pacing"], s["clip"], str(s["ref_vs_ideal"]), str(s["ref_vs_measured"]),
            str(s["delta"]), str(s["ideal_vs_measured"]), f"{s['match']:.3f}", f"{s['gaps_ms']:g}",
            "yes" if s["ok"] else "NO", s["note"],
        )  # fmt: skip
    console = Console(width=max(150, Console().width))
    console.print(t)
    for key, v in report["summary"].items():
        line = (
            f"  {key}: {v['clips']} clips, mean Δ {v['mean_delta']}, worst Δ {v['worst_delta']}"
            f" -> {'OK' if v['all_ok'] else 'MISS'}"
        )
        if v["clips_with_gaps"]:
            line += (
                f" ({v['clips_with_gaps']} clip(s) with playout gaps, {v['gaps_ms_total']:g} ms"
                f" in all; worst Δ of the others {v['worst_delta_without_gaps']})"
            )
        console.print(line)
    if not report["livecall_ulaw_matches_reference_g711"]:
        console.print("  note: livecall's μ-law tables differ from the reference G.711 here")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/quality.py", description=__doc__.split("\n")[0])
    p.add_argument("--pacing", choices=("unpaced", "paced", "both"), default="both")
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    a = p.parse_args(argv)
    pacings = ("unpaced", "paced") if a.pacing == "both" else (a.pacing,)
    report = run_quality_benchmark(pacings, out_dir=a.out)
    return 0 if report["scores"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
