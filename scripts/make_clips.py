"""Regenerate the simulator's speech clips (src/livecall/sim/clips/*.wav) from their texts.

The texts live in `livecall.sim.clips` (CALLER_CLIPS / AGENT_CLIPS); this script only turns them
into audio. The WAVs are committed, so you need this only after changing a text or a voice.

Requirements: `espeak-ng` and `sox` on PATH (Debian/Ubuntu: `apt-get install espeak-ng sox`).

    .venv/bin/python scripts/make_clips.py            # all clips
    .venv/bin/python scripts/make_clips.py book greeting

Two voices keep the parties apart by ear: the caller is a female US voice at 8 kHz (a phone
line), the agent a male voice at 24 kHz (Gemini Live's output rate). Both speak a little slower
than espeak's default for naturalness. sox trims the synthesizer's silence to 50 ms either
side and shortens pauses inside a sentence to 120 ms (espeak pauses ~200 ms at a comma, which a
VAD tuned to 200 ms of silence would take for the end of the utterance), normalizes the peak to
-3 dBFS and resamples with its high-quality filter; dither is off so a rerun gives identical
files.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from livecall.sim.clips import AGENT_CLIPS, CALLER_CLIPS, CLIP_DIR, Clip

CALLER_VOICE = ("en-us+f3", 150, 55)  # espeak voice, words per minute, pitch 0-99
AGENT_VOICE = ("en+m3", 168, 40)


def synthesize(clip: Clip, voice: tuple[str, int, int], workdir: Path) -> None:
    """espeak-ng -> raw WAV -> sox trim/normalize/resample -> clip.path."""
    name, speed, pitch = voice
    raw = workdir / f"{clip.name}.raw.wav"
    subprocess.run(
        ["espeak-ng", "-v", name, "-s", str(speed), "-p", str(pitch), "-w", str(raw), clip.text],
        check=True,
    )
    effects = [
        *("silence", "-l", "1", "0.02", "0.3%", "-1", "0.12", "0.6%"),  # trim, shorten pauses
        *("reverse", "silence", "1", "0.02", "0.3%", "reverse"),  # trim the end
        *("pad", "0.05", "0.05", "gain", "-n", "-3", "rate", "-v", str(clip.rate)),
    ]
    subprocess.run(
        ["sox", "-D", str(raw), "-b", "16", "-c", "1", str(clip.path), *effects], check=True
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="clip names (default: all)")
    args = parser.parse_args(argv)
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install espeak-ng sox", file=sys.stderr)
            return 2
    jobs = [(c, CALLER_VOICE) for c in CALLER_CLIPS.values()]
    jobs += [(c, AGENT_VOICE) for c in AGENT_CLIPS.values()]
    if args.names:
        unknown = set(args.names) - {c.name for c, _ in jobs}
        if unknown:
            print(f"unknown clip(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        jobs = [(c, v) for c, v in jobs if c.name in args.names]
    CLIP_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for clip, voice in jobs:
            synthesize(clip, voice, Path(tmp))
            size = clip.path.stat().st_size
            secs = (size - 44) / 2 / clip.rate
            print(f"{clip.name:12s} {clip.rate:5d} Hz {secs:5.2f} s {size / 1024:6.1f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
