"""Reconnect backoff with jitter: how long to wait before the next attempt to open a session.

Pure arithmetic, so it is unit tested; the bridge sleeps. The jitter (each pause is the base
delay times a uniform factor in [0.5, 1.5)) spreads the retries of many calls that lost their
sessions at the same moment (a backend restart), instead of having them all retry together.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["backoff_step"]


def backoff_step(
    delay_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> tuple[float, float]:
    """(this pause, the next base delay): the pause is `delay_s` jittered, the base doubles up
    to `max_s`. `rand` draws from [0, 1)."""
    return delay_s * (0.5 + rand()), min(delay_s * 2.0, max_s)
