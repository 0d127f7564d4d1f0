"""Recorded lines livecall plays itself, when the model cannot speak for it.

`apology.ulaw` is raw G.711 μ-law at 8 kHz ("I'm sorry, we're having technical difficulties.
Please call again later. Goodbye."), made from the simulator's speech clips by
`scripts/make_clips.py` and resampled with livecall's own resampler.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def apology_ulaw() -> bytes:
    return resources.files(__package__).joinpath("apology.ulaw").read_bytes()
