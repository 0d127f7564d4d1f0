"""Recorded speech for the simulators: what the fake caller says and what the fake agent answers.

The WAVs next to this module (``clips/``) are committed, so nothing here needs a speech
synthesizer; ``scripts/make_clips.py`` regenerates them with espeak-ng + sox from the texts
below, which are the single source of truth. Caller clips are 8 kHz (what a phone line carries),
agent clips 24 kHz (what Gemini Live sends). All are mono PCM16.
"""

from __future__ import annotations

import functools
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "AGENT_CLIPS",
    "AGENT_RATE",
    "CALLER_CLIPS",
    "CALLER_RATE",
    "CLIP_DIR",
    "Clip",
    "clip_duration",
    "get_clip",
    "load_clip",
    "read_wav",
]

CLIP_DIR = Path(__file__).with_name("clips")
CALLER_RATE = 8000
AGENT_RATE = 24000


@dataclass(frozen=True, slots=True)
class Clip:
    """One utterance: its words (used as transcript) and where its audio lives."""

    name: str
    text: str
    path: Path
    rate: int


def _clips(rate: int, texts: dict[str, str]) -> dict[str, Clip]:
    return {n: Clip(n, t, CLIP_DIR / f"{n}.wav", rate) for n, t in texts.items()}


CALLER_CLIPS: dict[str, Clip] = _clips(
    CALLER_RATE,
    {
        "book": "Hi, I'd like to book a table for four people tonight.",
        "time": "Seven thirty, please, under the name Garcia.",
        "hours": "What time do you open on Sundays?",
        "yes": "Yes, that's right.",
    },
)

AGENT_CLIPS: dict[str, Clip] = _clips(
    AGENT_RATE,
    {
        "greeting": "Thank you for calling Bella Vista, how can I help you?",
        "book_reply": (
            "Of course, I'd be happy to help with that. We have tables available from six "
            "o'clock onwards. Could you tell me what time you would like to come in, and the "
            "name for the booking? We also have a lovely terrace if the weather is nice."
        ),
        "time_reply": (
            "Perfect. A table for four at seven thirty tonight, under Garcia. See you then!"
        ),
        "hours_reply": "On Sundays we open at noon, and the kitchen closes at ten.",
        "goodbye": "Thank you for calling, goodbye!",
        "sorry": "Sorry, I didn't catch that. Could you say it again?",
        "apology": (
            "I'm sorry, we're having technical difficulties. Please call again later. Goodbye."
        ),
        "one_moment": "One moment, please.",
    },
)


def get_clip(name: str) -> Clip:
    """The clip called `name`, caller or agent (names are unique across both)."""
    clip = CALLER_CLIPS.get(name) or AGENT_CLIPS.get(name)
    if clip is None:
        known = ", ".join(sorted({*CALLER_CLIPS, *AGENT_CLIPS}))
        raise KeyError(f"no clip named {name!r} (known: {known})")
    return clip


def read_wav(path: Path | str) -> tuple[npt.NDArray[np.int16], int]:
    """Mono PCM16 WAV -> (samples, rate); anything else is refused rather than guessed."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected mono 16-bit PCM")
        rate = w.getframerate()
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype="<i2").astype(np.int16), rate


@functools.cache
def load_clip(name: str) -> tuple[npt.NDArray[np.int16], int]:
    """(samples, rate) of a clip. Cached and read-only: many simulated calls share one copy."""
    clip = get_clip(name)
    samples, rate = read_wav(clip.path)
    if rate != clip.rate:
        raise ValueError(f"{clip.path}: rate {rate} Hz, manifest says {clip.rate} Hz")
    samples.setflags(write=False)
    return samples, rate


def clip_duration(name: str) -> float:
    """Length of a clip in seconds."""
    samples, rate = load_clip(name)
    return len(samples) / rate
