"""Recorded lines livecall plays itself, when the model cannot speak for it.

Raw G.711 μ-law at 8 kHz, made from the simulator's speech clips (`scripts/make_clips.py`)
and resampled with livecall's own resampler (`OutboundTranscoder`):

* `apology.ulaw`: "I'm sorry, we're having technical difficulties. Please call again later.
  Goodbye." (Gemini cannot be had, or the call failed)
* `goodbye.ulaw`: "Thank you for calling, goodbye!" (the agent hung up without a word)
* `one_moment.ulaw`: "One moment, please." (the agent transfers the call without a word)
* `sorry.ulaw`: "Sorry, I didn't catch that. Could you say it again?" (the model failed to
  answer twice in a row; the call goes on)
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def apology_ulaw() -> bytes:
    return _asset("apology.ulaw")


def goodbye_ulaw() -> bytes:
    return _asset("goodbye.ulaw")


def handoff_ulaw() -> bytes:
    return _asset("one_moment.ulaw")


def recovery_ulaw() -> bytes:
    return _asset("sorry.ulaw")
