"""The pure parts of session recovery: reconnect backoff with jitter, and when a goAway
rotation may switch sessions (a turn boundary, or the deadline)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from livecall.call.backoff import backoff_step
from livecall.call.options import CallOptions
from livecall.call.rotation import CALLER_QUIET_MS, rotation_ready

# ---------------------------------------------------------------- backoff


def test_the_base_delay_doubles_up_to_the_maximum() -> None:
    options = CallOptions()
    delay, bases = options.backoff_initial_s, []
    for _ in range(8):
        bases.append(delay)
        _, delay = backoff_step(delay, options.backoff_max_s, rand=lambda: 0.5)
    assert bases == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 4.0, 4.0, 4.0])


@pytest.mark.parametrize(("draw", "factor"), [(0.0, 0.5), (0.5, 1.0), (0.999, 1.499)])
def test_each_pause_is_the_base_delay_times_a_factor_from_half_to_one_and_a_half(
    draw: float, factor: float
) -> None:
    pause, _ = backoff_step(0.8, 4.0, rand=lambda: draw)
    assert pause == pytest.approx(0.8 * factor)


def test_jitter_spreads_the_retries_of_calls_that_failed_together() -> None:
    rng = random.Random(12)
    pauses = [backoff_step(1.0, 4.0, rand=rng.random)[0] for _ in range(1000)]
    assert all(0.5 <= p < 1.5 for p in pauses)
    assert min(pauses) < 0.55 and max(pauses) > 1.45  # the whole range is used
    # a thousand calls retrying within the same 100 ms would be a stampede: they spread out
    assert max(sum(1 for p in pauses if a <= p < a + 0.1) for a in (0.5, 0.8, 1.1, 1.4)) < 150


def test_the_default_draw_is_random() -> None:
    assert len({backoff_step(1.0, 4.0)[0] for _ in range(20)}) > 1


# ---------------------------------------------------------------- rotation at a turn boundary

QUIET: dict[str, Any] = {
    "last_voice_ms": None,
    "agent_turn_open": False,
    "playout_busy_until_ms": 0.0,
    "tools_running": False,
}


def test_no_rotation_without_a_go_away() -> None:
    assert not rotation_ready(10_000.0, None, **QUIET)
    assert not rotation_ready(10_000.0, None, **{**QUIET, "last_voice_ms": 1.0})


def test_rotation_at_a_quiet_turn_boundary_before_the_deadline() -> None:
    assert rotation_ready(10_000.0, 60_000.0, **QUIET)
    # the caller spoke, but long enough ago to be a pause
    assert rotation_ready(10_000.0, 60_000.0, **{**QUIET, "last_voice_ms": 9_000.0})


@pytest.mark.parametrize(
    "busy",
    [
        {"last_voice_ms": 10_000.0 - CALLER_QUIET_MS + 1},  # the caller is speaking
        {"agent_turn_open": True},  # the agent is answering
        {"playout_busy_until_ms": 10_500.0},  # its audio is still playing at the carrier
        {"tools_running": True},  # a tool call is in flight on this session
    ],
    ids=["caller_speaking", "agent_turn_open", "agent_audio_playing", "tool_running"],
)
def test_no_rotation_while_anyone_speaks_or_a_tool_runs(busy: dict[str, Any]) -> None:
    now, deadline = 10_000.0, 60_000.0
    assert not rotation_ready(now, deadline, **{**QUIET, **busy})
    # ... but at the deadline the rotation happens whatever is going on
    assert rotation_ready(deadline, deadline, **{**QUIET, **busy})
    assert rotation_ready(deadline + 1.0, deadline, **{**QUIET, **busy})


def test_the_caller_counts_as_quiet_after_the_pause_threshold() -> None:
    now, deadline = 10_000.0, 60_000.0
    at_threshold = {**QUIET, "last_voice_ms": now - CALLER_QUIET_MS}
    past_threshold = {**QUIET, "last_voice_ms": now - CALLER_QUIET_MS - 1}
    assert not rotation_ready(now, deadline, **at_threshold)
    assert rotation_ready(now, deadline, **past_threshold)
