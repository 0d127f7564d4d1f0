"""Quality benchmark: does livecall's audio path cost anything beyond the phone codec itself?

For every carrier adapter and every codec it carries, both directions are compared, with PESQ,
against a whole-signal conversion of what was said, done once over the whole clip with soxr VHQ:

* caller -> model (PESQ-WB, 16 kHz): *reference* = the caller's clean clip, VHQ to 16 kHz;
  *ideal* = the clip as the carrier carries it (VHQ to the wire's rate, through its codec:
  μ-law, A-law or L16) decoded and VHQ to 16 kHz; *measured* = what the model received.
* model -> caller (PESQ-NB at 8 kHz, or PESQ-WB at 16 kHz for an L16 16/24 kHz playback):
  *reference* = the agent's 24 kHz clip, VHQ to the scoring rate; *ideal* = the clip VHQ to the
  playback rate, through the codec and back (all a perfect bridge may cost); *measured* = what
  the carrier plays.

Two routes:

* **call**: real calls through the real server, for the carriers with routes (Twilio, Telnyx,
  Plivo: μ-law 8 kHz, what their answers ask for), each rung from its simulated edge
  (`livecall.sim`): fake Gemini in assistant mode, the caller says the library clips, the fake
  model answers each with a scripted agent clip. *measured* = what the fake model received and
  what the simulated caller heard (its real-time playout timeline).
* **adapter**: every adapter and codec, sans I/O (`livecall.bench.wire_paths`): the carrier's
  own wire frames through the adapter's real `receive` and the core's real transcoders, and
  back through the real transcoder and the adapter's real `play`, decoded as the carrier would.
  Vonage and Exotel (not called for real here) and the codecs the routes do not ask for
  (Telnyx A-law and L16 16k in, Plivo L16, Vonage L16 8/16/24k, Exotel L16 8/16/24k) are
  measured this way.

`ideal` and `measured` are found in the received streams by cross-correlation. The target:
PESQ(reference, measured) within 0.1 of PESQ(reference, ideal), i.e. livecall's streaming
resamplers and framing cost no more than 0.1 on top of the carrier's codec. An 8 kHz caller
clip is narrowband: on a 16/24 kHz caller wire the agent's 24 kHz clips are said instead, so the
band above 4 kHz is exercised too.

G.711 here is our own (`livecall.bench.g711_ref`, Sun `g711.c` rules), not livecall's, so a
bug in the product's codec tables cannot cancel out.

Real-call agent audio comes unpaced (all of a reply at once: the codec path alone) and, for
Twilio, paced the way the fake's default scenario sends it (1.3x real time in bursts with
hiccups, as the service does); a hiccup that outlasts the caller's queued audio is a gap the
caller hears, which shows up in the paced rows and is the model's doing, not the codec's.

Run: ``livecall bench quality [--carriers twilio,telnyx,…]`` or ``python bench/quality.py``.
Writes ``bench/out/quality.json``. Needs `pesq` (dev / bench extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import soxr
from scipy import signal

from livecall.bench.g711_ref import (
    alaw_decode_ref,
    alaw_encode_ref,
    ulaw_decode_ref,
    ulaw_encode_ref,
)

if TYPE_CHECKING:
    from livecall.bench.wire_paths import PathRun, WirePath
    from livecall.sim.stack import LocalStack

__all__ = [
    "CALL_CARRIERS",
    "CARRIERS",
    "DEFAULT_SEQUENCES",
    "TARGET_DELTA",
    "ClipScore",
    "alaw_decode_ref",
    "alaw_encode_ref",
    "print_quality_table",
    "run_quality_benchmark",
    "run_quality_benchmark_async",
    "score_call",
    "score_path",
    "ulaw_decode_ref",
    "ulaw_encode_ref",
]

TARGET_DELTA = 0.1
CARRIERS = ("twilio", "telnyx", "plivo", "vonage", "exotel")
CALL_CARRIERS = ("twilio", "telnyx", "plivo")  # the carriers with routes: real calls too
CALLER_CLIPS_SAID = ("book", "time", "hours", "yes")
WIDEBAND_CALLER_CLIPS = ("greeting", "sorry", "one_moment", "apology")  # 24 kHz sources
AGENT_CLIPS = ("book_reply", "time_reply", "hours_reply", "goodbye",
               "greeting", "sorry", "one_moment", "apology")  # fmt: skip
DEFAULT_SEQUENCES: tuple[tuple[str, ...], ...] = (
    ("book_reply", "time_reply", "hours_reply", "goodbye"),
    ("greeting", "sorry", "one_moment", "apology"),
)
"""Agent replies to the four caller clips, one call each: all eight agent clips are heard."""

Float = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- scoring


@dataclass(slots=True)
class ClipScore:
    """One clip in one direction: the three PESQ numbers and where it was found."""

    direction: str  # "caller->model" | "model->caller"
    pacing: str  # "unpaced" | "paced" (real calls) | "adapter" (sans I/O)
    clip: str
    ref_vs_ideal: float | None
    ref_vs_measured: float | None
    delta: float | None  # ref_vs_ideal - ref_vs_measured; <= TARGET_DELTA passes
    ideal_vs_measured: float | None
    match: float  # normalized cross-correlation peak of ideal in the stream (1.0: same)
    offset_s: float  # where it was found in the stream
    gaps_ms: float  # silence inserted inside the clip (its end is found this much late)
    note: str = ""
    carrier: str = "twilio"
    codec: str = "mulaw 8k"
    route: str = "call"  # "call": through the real server | "adapter": sans I/O
    rate: int = 8000  # PESQ at 8 kHz (NB) or 16 kHz (WB)

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
    direction: str,
    pacing: str,
    clip: str,
    rate: int,
    ref: Float,
    ideal: Float,
    stream: Float,
    *,
    gaps: bool = True,
    **where: Any,
) -> ClipScore:
    """`gaps`: look for playout holes inside the clip (a real call's; an adapter path has no
    clock, and clips that share words can fool the search)."""
    lag, match = _find(stream, ideal)
    measured = _segment(stream, lag, len(ideal))
    a = _pesq(rate, ref, ideal)
    b = _pesq(rate, ref, measured)
    gaps_ms = _gaps_ms(stream, ideal, rate) if gaps else 0.0
    note = ""
    if abs(gaps_ms) >= 5.0:
        note = f"{gaps_ms:g} ms of gaps inside the clip"
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
        gaps_ms=gaps_ms,
        note=note,
        rate=rate,
        **where,
    )


def _f(x: npt.ArrayLike) -> Float:
    return np.asarray(x, dtype=np.float64)


def _vhq(x: Float, rate_in: int, rate_out: int) -> Float:
    return _f(soxr.resample(x, rate_in, rate_out, quality="VHQ"))


def _vhq_if(x: Float, rate_in: int, rate_out: int) -> Float:
    return x if rate_in == rate_out else _vhq(x, rate_in, rate_out)


# --------------------------------------------------------------------------- real calls

_PLIVO_TOKEN = "quality-bench-plivo-auth-token-0123"


def _edge(carrier: str) -> tuple[dict[str, Any], Callable[[LocalStack, list[Any]], Any]]:
    """The settings that open a carrier's route, and how its simulated edge rings it."""
    if carrier == "twilio":
        return {}, lambda stack, script: stack.caller(script, timeout=240.0)
    if carrier == "telnyx":
        from livecall.sim.telnyx import TelnyxSimulatedCaller, generate_keypair

        seed, public = generate_keypair()
        return {"telnyx_public_key": public}, lambda stack, script: TelnyxSimulatedCaller(
            stack.base_url, private_key=seed, webhook_path="/telnyx/texml", script=script,
            timeout=240.0,
        )  # fmt: skip
    if carrier == "plivo":
        from livecall.sim.plivo import PlivoSimulatedCaller

        return {"plivo_auth_token": _PLIVO_TOKEN}, lambda stack, script: PlivoSimulatedCaller(
            stack.base_url, auth_token=_PLIVO_TOKEN, script=script, timeout=240.0
        )
    raise ValueError(f"{carrier} has no route to call through (adapter paths only)")


async def score_call(
    replies: Sequence[str],
    pacing: str,
    work: Path,
    seed: int,
    carrier: str = "twilio",
    said_clips: Sequence[str] = CALLER_CLIPS_SAID,
) -> tuple[list[ClipScore], dict[str, Any]]:
    """One call from `carrier`'s edge: say the caller clips, each answered by the next agent
    clip; score what the model received and what the caller heard."""
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
    said = {name: ulaw_encode_ref(load_clip(name)[0]) for name in said_clips}
    script: list[Any] = [Pause(500)]
    for name in said_clips:
        script += [
            Say(said[name].tobytes(), rate=8000, label=name),
            WaitForAgentSilence(silence_ms=1200, timeout=40.0),
            Pause(400),
        ]
    settings, ring = _edge(carrier)
    overrides = {
        "recording_enabled": False,
        "spool_dir": work / "spool",
        "recordings_dir": work / "recordings",
        "database_url": f"sqlite+aiosqlite:///{work / 'calls.db'}",
        **settings,
    }
    async with LocalStack(scenario=scenario, settings_overrides=overrides) as stack:
        result = await ring(stack, script).run()
        gemini = stack.gemini
        assert gemini is not None
        await gemini.wait_for(lambda: all(s.closed for s in gemini.sessions), 10.0)
        sessions = list(gemini.sessions)
    received = _f(np.frombuffer(b"".join(bytes(s.received_audio) for s in sessions), "<i2"))
    heard = _f(ulaw_decode_ref(np.frombuffer(result.heard, dtype=np.uint8)))
    where: dict[str, Any] = {"carrier": carrier, "codec": "mulaw 8k", "route": "call"}
    scores = []
    for name in said_clips:
        clean, rate = load_clip(name)
        ref = _vhq(_f(clean), rate, 16000)
        ideal = _vhq(_f(ulaw_decode_ref(said[name])), rate, 16000)
        scores.append(_score("caller->model", pacing, name, 16000, ref, ideal, received, **where))
    turns = [t for s in sessions for t in s.turns]
    for name in replies:
        clean, rate = load_clip(name)
        ref = _vhq(_f(clean), rate, 8000)
        ideal = _f(ulaw_decode_ref(ulaw_encode_ref(np.clip(np.round(ref), -32768, 32767))))
        score = _score("model->caller", pacing, name, 8000, ref, ideal, heard, **where)
        turn = next((t for t in turns if t.reply_clip == name), None)
        if turn is None:
            score.note = "the model never sent it"
        elif turn.interrupted:
            score.note = "; ".join(x for x in ("reply was interrupted", score.note) if x)
        scores.append(score)
    info = {
        "route": "call",
        "carrier": carrier,
        "pacing": pacing,
        "replies": list(replies),
        "sessions": len(sessions),
        "model_turns": [(t.reply_clip, t.interrupted) for t in turns],
        "caller_script_errors": result.script_errors,
        "caller_protocol_errors": result.protocol_errors[:5],
        "marks_echoed": len(result.marks_echoed),
        "heard_s": round(len(heard) / 8000, 2),
        "received_s": round(len(received) / 16000, 2),
    }
    return scores, info


# --------------------------------------------------------------------------- adapter paths


def score_path(
    path: WirePath,
    seed: int = 0,
    *,
    said: Sequence[str] | None = None,
    replies: Sequence[str] = AGENT_CLIPS,
) -> tuple[list[ClipScore], PathRun]:
    """One adapter path (`wire_paths.run_path`) scored in both directions: by default the four
    caller clips (the four 24 kHz ones on a 16/24 kHz caller wire) and all eight agent clips."""
    from livecall.bench.wire_paths import decode_wire, encode_wire, run_path
    from livecall.sim.clips import load_clip

    wire = path.inbound
    if said is None:
        said = CALLER_CLIPS_SAID if wire.sample_rate == 8000 else WIDEBAND_CALLER_CLIPS
    said_rate = load_clip(said[0])[1]
    run = run_path(
        path, [load_clip(n)[0] for n in said], said_rate, [load_clip(n)[0] for n in replies],
        seed=seed,
    )  # fmt: skip
    where = {"carrier": path.carrier, "codec": path.codec, "route": "adapter"}
    received = _f(run.model_received)
    scores = []
    for name in said:
        clean, rate = load_clip(name)
        ref = _vhq(_f(clean), rate, 16000)
        on_wire = _vhq_if(_f(clean), rate, wire.sample_rate)
        ideal = _vhq_if(_f(decode_wire(encode_wire(on_wire, wire), wire)), wire.sample_rate, 16000)
        scores.append(
            _score(
                "caller->model", "adapter", name, 16000, ref, ideal, received, gaps=False, **where
            )
        )
    out = run.playback
    score_rate = 8000 if out.sample_rate == 8000 else 16000
    played = _vhq_if(_f(run.played), out.sample_rate, score_rate)
    for name in replies:
        clean, rate = load_clip(name)
        ref = _vhq(_f(clean), rate, score_rate)
        coded = decode_wire(encode_wire(_vhq_if(_f(clean), rate, out.sample_rate), out), out)
        ideal = _vhq_if(_f(coded), out.sample_rate, score_rate)
        scores.append(
            _score(
                "model->caller",
                "adapter",
                name,
                score_rate,
                ref,
                ideal,
                played,
                gaps=False,
                **where,
            )
        )
    return scores, run


# --------------------------------------------------------------------------- the run


async def run_quality_benchmark_async(
    pacings: Sequence[str] = ("unpaced", "paced"),
    sequences: Sequence[Sequence[str]] = DEFAULT_SEQUENCES,
    carriers: Sequence[str] = CARRIERS,
    *,
    calls: bool = True,
) -> dict[str, Any]:
    """Adapter paths first (sans I/O, fast), then real calls one after the other: stacks
    started side by side in one process share Alembic's global migration context (their store
    falls over), and a stalled loop would show up as playout gaps that are not the codec's.
    Carriers other than Twilio are called unpaced only (pacing is the model's, not theirs)."""
    from livecall.bench.wire_paths import PATHS

    unknown = set(carriers) - set(CARRIERS)
    if unknown:
        raise ValueError(f"unknown carrier(s) {sorted(unknown)}; one of {CARRIERS}")
    done: list[tuple[list[ClipScore], dict[str, Any]]] = []
    for i, path in enumerate(p for p in PATHS if p.carrier in carriers):
        scores, run = score_path(path, seed=i)
        done.append((scores, {
            "route": "adapter", "carrier": path.carrier, "codec": path.codec,
            "adapter": run.stream_type, "started_format": str(run.started.media_format),
            "playback_format": str(run.playback), "frames_in": run.frames_in,
            "frames_out": run.frames_out, "marks": run.marks, "frames_sent": run.kinds,
            "note": path.note,
        }))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="livecall-quality-") as tmp:
        for carrier in (c for c in CALL_CARRIERS if calls and c in carriers):
            for pacing in pacings if carrier == "twilio" else ("unpaced",):
                for i, seq in enumerate(sequences):
                    work = Path(tempfile.mkdtemp(prefix=f"{carrier}-{pacing}-{i}-", dir=tmp))
                    done.append(await score_call(seq, pacing, work, seed=i, carrier=carrier))
    scores = [s for batch, _ in done for s in batch]
    from livecall.audio import g711

    all_int16 = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    codes = np.arange(256, dtype=np.uint8)
    same_codec = bool(
        np.array_equal(g711.ulaw_encode(all_int16), ulaw_encode_ref(all_int16))
        and np.array_equal(g711.ulaw_decode(codes.tobytes()), ulaw_decode_ref(codes))
        and np.array_equal(g711.alaw_encode(all_int16), alaw_encode_ref(all_int16))
        and np.array_equal(g711.alaw_decode(codes.tobytes()), alaw_decode_ref(codes))
    )
    return {
        "benchmark": "quality",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target_delta": TARGET_DELTA,
        "livecall_g711_matches_reference_g711": same_codec,
        "runs": [info for _, info in done],
        "scores": [{**asdict(s), "ok": s.ok} for s in scores],
        "summary": _summary(scores),
    }


def _summary(scores: list[ClipScore]) -> dict[str, Any]:
    """Per carrier, codec, route/pacing and direction: mean and worst Δ."""
    out: dict[str, Any] = {}
    groups: dict[tuple[str, str, str, str], list[ClipScore]] = {}
    for s in scores:
        groups.setdefault((s.carrier, s.codec, s.pacing, s.direction), []).append(s)
    for (carrier, codec, pacing, direction), group in groups.items():
        deltas = [s.delta for s in group if s.delta is not None]
        clean = [s for s in group if abs(s.gaps_ms) < 5.0 and "interrupted" not in s.note]
        clean_deltas = [s.delta for s in clean if s.delta is not None]
        out[f"{carrier} | {codec} | {pacing} | {direction}"] = {
            "carrier": carrier,
            "codec": codec,
            "pacing": pacing,
            "direction": direction,
            "pesq": "WB" if group[0].rate == 16000 else "NB",
            "clips": len(group),
            "mean_ref_vs_ideal": round(float(np.mean([s.ref_vs_ideal or 0 for s in group])), 3),
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
    carriers: Sequence[str] = CARRIERS,
    calls: bool = True,
    out_dir: Path | str = Path("bench/out"),
    quiet: bool = False,
    clips: bool = False,
) -> dict[str, Any]:
    """Run the paths and calls, print the tables, write quality.json; returns what it holds."""
    from livecall.log import configure_logging

    configure_logging("warning")  # the calls' info lines would bury the table
    report = asyncio.run(run_quality_benchmark_async(pacings, carriers=carriers, calls=calls))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    if not quiet:
        print_quality_table(report, clips=clips)
    return report


def print_quality_table(report: dict[str, Any], *, clips: bool = False) -> None:
    """One row per carrier/codec/route/direction (and, with `clips`, one per clip)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, Console().width))
    if clips:
        t = Table(title="PESQ per clip")
        for c in ("carrier", "codec", "route", "direction", "clip", "ref→ideal", "ref→measured",
                  "Δ", "ideal→measured", "match", "gaps ms", "ok", "note"):  # fmt: skip
            t.add_column(c, justify="right" if c[0] in "rΔigmo" and c != "route" else "left")
        for s in report["scores"]:
            t.add_row(
                s["carrier"], s["codec"], s["pacing"],
                s["direction"] + (" WB" if s["rate"] == 16000 else " NB"), s["clip"],
                str(s["ref_vs_ideal"]), str(s["ref_vs_measured"]), str(s["delta"]),
                str(s["ideal_vs_measured"]), f"{s['match']:.3f}", f"{s['gaps_ms']:g}",
                "yes" if s["ok"] else "NO", s["note"],
            )  # fmt: skip
        console.print(t)
    t = Table(
        title="PESQ through each carrier adapter vs a whole-signal ideal (soxr VHQ one-shot + the "
        f"carrier's codec); target Δ ≤ {report['target_delta']}"
    )
    for c in ("carrier", "codec", "route", "direction", "PESQ", "clips", "ref→ideal", "Δ mean",
              "Δ worst", "ok", "note"):  # fmt: skip
        t.add_column(c, justify="left" if c in ("carrier", "codec", "route", "direction", "note",
                                                 "PESQ") else "right")  # fmt: skip
    for v in report["summary"].values():
        note = ""
        if v["clips_with_gaps"]:
            note = (
                f"{v['clips_with_gaps']} clip(s) with playout gaps ({v['gaps_ms_total']:g} ms); "
                f"worst Δ of the others {v['worst_delta_without_gaps']}"
            )
        t.add_row(
            v["carrier"], v["codec"], v["pacing"], v["direction"], v["pesq"], str(v["clips"]),
            f"{v['mean_ref_vs_ideal']:.2f}", str(v["mean_delta"]), str(v["worst_delta"]),
            "yes" if v["all_ok"] else "NO", note,
        )  # fmt: skip
    console.print(t)
    if not report["livecall_g711_matches_reference_g711"]:
        console.print("  note: livecall's G.711 tables differ from the reference G.711 here")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/quality.py", description=__doc__.split("\n")[0])
    p.add_argument("--pacing", choices=("unpaced", "paced", "both"), default="both")
    p.add_argument("--carriers", default=",".join(CARRIERS), help="comma-separated")
    p.add_argument("--adapters-only", action="store_true", help="no real calls (fast)")
    p.add_argument("--clips", action="store_true", help="also print one row per clip")
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    a = p.parse_args(argv)
    pacings = ("unpaced", "paced") if a.pacing == "both" else (a.pacing,)
    carriers = tuple(c.strip() for c in a.carriers.split(",") if c.strip())
    report = run_quality_benchmark(
        pacings, carriers=carriers, calls=not a.adapters_only, out_dir=a.out, clips=a.clips
    )
    return 0 if report["scores"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
