"""Which Gemini Live session a call should have, and what to do when it is lost: sans-I/O.

The bridge feeds events in (a session opened, failed to open, was lost, sent a resumable
handle or a `goAway`, the model went silent, a clock tick) and carries out the actions that
come back (open a session with a handle or fresh, wait, switch to it replaying what the old
one may have lost, rotate, nudge, drop a stalled session, give up). Everything here is plain
state and arithmetic, unit tested without sockets (`tests/test_supervisor.py`): the attempts
and their backoff (`backoff.py`), a refused handle turning into a fresh seeded session, the
"failing repeatedly" window, the rotation deadline and its turn boundary (`rotation.py`), the
release of a seeded fresh session's open turn, the stall watchdog, and which handle still owes
the next session the audio replayed since.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from livecall.agent.live_protocol import turn_failed
from livecall.call.backoff import backoff_step
from livecall.call.rotation import rotation_ready

__all__ = [
    "FAILURE_WINDOW_S",
    "PERMANENT_CODES",
    "SEED_RELEASE_QUIET_MS",
    "Apologize",
    "CompleteSeed",
    "DropStalled",
    "GiveUp",
    "Live",
    "Nudge",
    "Open",
    "Replay",
    "Reprompt",
    "Rotate",
    "SessionAction",
    "SessionSupervisor",
    "Wait",
]

FAILURE_WINDOW_S = 60.0  # more than `attempts` session losses in this window: give up
# A fresh session seeded with `turnComplete: false` may wait for follow-up content (3.8): once
# the caller has spoken since the last answer, and neither the caller nor the model has made a
# sound for this long since (a model that does not wait has begun its answer by then: any
# client content would cut that answer off), the turn is completed.
SEED_RELEASE_QUIET_MS = 1000.0
# close codes of a bad setup, key, model or handle: retrying the same cannot help
PERMANENT_CODES = frozenset({1007, 1008})


@dataclass(frozen=True, slots=True)
class Open:
    """Open a session: resuming `handle`, or fresh when it is None."""

    handle: str | None
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class Wait:
    """Back off this long, then call `retry()`."""

    seconds: float
    attempt: int


@dataclass(frozen=True, slots=True)
class Replay:
    """The opened session becomes the call's: `seed` it with the transcript first (a fresh
    session after others), then replay the audio its handle lacks, then the backlog."""

    seed: bool


@dataclass(frozen=True, slots=True)
class Live:
    """The session is usable; what to log and record about it."""

    first: bool  # the call's first session
    resumed: bool
    attempt: int
    reason: str
    code: int | None
    gap_ms: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No session can be had: the caller hears the apology or is handed to a person."""

    reason: str
    why: str


@dataclass(frozen=True, slots=True)
class Rotate:
    """A `goAway` came and now is the moment to move to the next session."""


@dataclass(frozen=True, slots=True)
class CompleteSeed:
    """The seeded fresh session waits for more content: complete its turn now."""


@dataclass(frozen=True, slots=True)
class Nudge:
    """The model has been silent while the caller waits: ask it to answer."""


@dataclass(frozen=True, slots=True)
class DropStalled:
    """Still silent after the nudge: close the session, it is recovered like a lost one."""


@dataclass(frozen=True, slots=True)
class Reprompt:
    """A turn ended unanswered for a failure reason: ask the model again, at once."""

    reason: str


@dataclass(frozen=True, slots=True)
class Apologize:
    """The re-prompted turn failed too: the caller hears the recovery line; the call goes on."""

    reason: str


SessionAction = Open | Wait | GiveUp  # what a recovery step asks of the bridge


class SessionSupervisor:
    """One call's session policy. Times: `now_ms` on the call clock, `now_s` monotonic."""

    def __init__(
        self,
        *,
        attempts: int = 5,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 4.0,
        rotation_margin_s: float = 5.0,
        stall_timeout_s: float = 10.0,
        failure_window_s: float = FAILURE_WINDOW_S,
        permanent_codes: frozenset[int] = PERMANENT_CODES,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.attempts = max(1, attempts)  # per recovery: the first connect always happens
        self.max_losses = max(0, attempts)  # 0: reconnecting is off, the first loss ends it
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.rotation_margin_ms = rotation_margin_s * 1000.0
        self.stall_ms = stall_timeout_s * 1000.0
        self.failure_window_s = failure_window_s
        self.permanent_codes = permanent_codes
        self._rand = rand
        self.handle: str | None = None  # the newest resumable handle
        self.sessions = 0  # sessions the call has had (switched to)
        self.session_turns = 0  # turns the current session completed
        self.rotation_deadline_ms: float | None = None
        self.expect_reply_at: float | None = None  # the caller waits for an answer since
        self.nudged = False
        self.seed_open = False  # a fresh session seeded with partial content waits for more
        # the last turnComplete said IN_PROGRESS: more output may follow, the model is not idle
        self.in_progress = False
        self.failed_turns = 0  # turns in a row that ended unanswered for a failure reason
        self.ready_at_ms = 0.0  # when the current session became usable
        self.last_answered_ms = float("-inf")  # when the agent last completed a turn
        self._failures: deque[float] = deque()
        # the recovery under way
        self._attempt = 0
        self._delay = backoff_initial_s
        self._reason = "start"
        self._code: int | None = None
        self._opening: str | None = None  # the handle the pending Open used
        self._switching = False  # between begin() and connected(): the old session is outgoing
        self._down_since_ms = 0.0

    # ------------------------------------------------------------------ recovery
    def lost(self, now_s: float) -> GiveUp | None:
        """A session was lost (closed, stalled): GiveUp when sessions keep dying at once."""
        self._failures.append(now_s)
        while self._failures and now_s - self._failures[0] > self.failure_window_s:
            self._failures.popleft()
        if len(self._failures) > self.max_losses:
            return GiveUp("gemini_failed", f"failing repeatedly: {len(self._failures)} losses")
        return None

    def begin(self, reason: str, code: int | None, now_ms: float) -> Open:
        """Starts opening a session: `start`, `go_away`, `session_lost`, `stalled`."""
        self._attempt = 0
        self._delay = self.backoff_initial_s
        self._reason = reason
        self._code = code
        self._down_since_ms = now_ms
        self.rotation_deadline_ms = None
        self._switching = True
        return self._open()

    def _open(self) -> Open:
        self._attempt += 1
        self._opening = self.handle
        return Open(self.handle, self._attempt, self._reason)

    def retry(self) -> Open:
        """After a Wait."""
        return self._open()

    def connect_failed(self, code: int | None) -> Open | Wait | GiveUp:
        """The pending Open failed before the session was set up."""
        if code in self.permanent_codes:
            if self._opening is None:
                return GiveUp("gemini_failed", f"refused ({code}): retrying cannot help")
            if self.handle == self._opening:
                self.handle = None  # the handle was refused: a fresh session, seeded
            if self._attempt < self.attempts:
                return self._open()
            return GiveUp("gemini_failed", f"{self._attempt} attempts failed")
        return self._backoff()

    def switch_failed(self) -> Wait | GiveUp:
        """The opened session died while being seeded, replayed to or flushed."""
        return self._backoff()

    def _backoff(self) -> Wait | GiveUp:
        if self._attempt >= self.attempts:
            return GiveUp("gemini_failed", f"{self._attempt} attempts failed")
        pause, self._delay = backoff_step(self._delay, self.backoff_max_s, self._rand)
        return Wait(pause, self._attempt)

    def connected(self) -> Replay:
        """The pending Open succeeded: the call switches to that session."""
        seed = self._opening is None and self.sessions > 0
        self.sessions += 1
        self.session_turns = 0
        self._switching = False
        self.seed_open = False
        self.in_progress = False  # the old session's background work is not this one's
        return Replay(seed=seed)

    def live(self, now_ms: float) -> Live:
        """The switch is done: the session is the call's, ready for the caller's audio."""
        self.expect_reply_at = None
        self.ready_at_ms = now_ms
        return Live(
            first=self.sessions == 1,
            resumed=self._opening is not None,
            attempt=self._attempt,
            reason=self._reason,
            code=self._code,
            gap_ms=round(now_ms - self._down_since_ms, 1),
        )

    # ------------------------------------------------------------------ session events
    def resumable(self, handle: str) -> bool:
        """A resumable handle from the current session. True: it holds everything sent so far,
        so the audio kept for replay can go. The handle a session sends at its setup holds only
        the state it resumed from, not the audio replayed to it since: that stays owed until a
        turn of its own. A handle the outgoing session sends while the next one is being opened
        (a rotation overlaps them) is ignored: the next one resumes from the handle it was
        opened with, so everything since that handle is still owed to it."""
        if self._switching:
            return False
        self.handle = handle
        return self.session_turns > 0

    def seeded(self) -> None:
        """The new session was seeded with the transcript as an open turn."""
        self.seed_open = True

    def answered(self, now_ms: float) -> None:
        """The agent completed a turn it spoke in."""
        self.last_answered_ms = now_ms

    def turn_complete(self, session: int) -> None:
        """Session number `session` (`sessions` when its turn began) completed a turn; a turn
        of a session already replaced is not the new one's."""
        if session == self.sessions:
            self.session_turns += 1

    def go_away(self, now_ms: float, time_left_s: float | None) -> float:
        """Sets the rotation deadline: at the latest `rotation_margin_s` before the session's
        end (half the time left when less remains). Returns the deadline."""
        left_ms = (time_left_s if time_left_s is not None else 10.0) * 1000.0
        margin = min(self.rotation_margin_ms, left_ms / 2)
        self.rotation_deadline_ms = now_ms + max(0.0, left_ms - margin)
        return self.rotation_deadline_ms

    def awaiting_reply(self, now_ms: float) -> None:
        """The caller finished speaking (or was interrupted, or a tool answered): a reply is
        expected from now."""
        self.expect_reply_at = now_ms

    def agent_spoke(self) -> None:
        self.expect_reply_at = None
        self.nudged = False

    def turn_ended(
        self, now_ms: float, *, spoke: bool, reason: str | None, in_progress: bool
    ) -> Reprompt | Apologize | None:
        """A `turnComplete` of the current session: `spoke` whether the turn had agent audio,
        `reason` its `turnCompleteReason`, `in_progress` its `interactionStatus`.

        A turn that ended unanswered for a failure reason (`turn_failed`) is re-prompted at
        once rather than left to the watchdog's `stall_timeout_s`; when the re-prompted turn
        fails too, the caller hears the recovery line and it is their turn again. A failed
        turn with IN_PROGRESS is left to the watchdog: the service is still at work (it may
        regenerate) and output may follow. NEED_MORE_INPUT is no failure: the model waits for
        the caller, the watchdog keeps its normal time."""
        self.in_progress = in_progress
        if spoke:
            self.failed_turns = 0
            return None
        if reason is None or not turn_failed(reason) or in_progress:
            return None
        self.failed_turns += 1
        if self.failed_turns == 1:
            self.expect_reply_at = now_ms  # the watchdog still stands behind the re-prompt
            self.nudged = True  # ... and its next step is dropping the session, not a nudge
            return Reprompt(reason)
        self.failed_turns = 0
        self.expect_reply_at = None  # the caller was asked to say it again: their turn
        self.nudged = False
        return Apologize(reason)

    def tick(
        self,
        now_ms: float,
        *,
        last_voice_ms: float | None,
        agent_turn_open: bool,
        playout_busy_until_ms: float,
        tools_running: bool,
    ) -> Rotate | CompleteSeed | None:
        """Rotate once a `goAway`'s rotation is due at a turn boundary (or its deadline); else
        complete a seeded session's open turn once the caller spoke since the agent last
        answered and all has been quiet `SEED_RELEASE_QUIET_MS` (since the session began)."""
        agent_turn_open = agent_turn_open or self.in_progress  # more output is coming
        if rotation_ready(
            now_ms,
            self.rotation_deadline_ms,
            last_voice_ms=last_voice_ms,
            agent_turn_open=agent_turn_open,
            playout_busy_until_ms=playout_busy_until_ms,
            tools_running=tools_running,
        ):
            return Rotate()
        if (
            self.seed_open
            and last_voice_ms is not None
            and last_voice_ms > self.last_answered_ms
            and not agent_turn_open
            and now_ms - max(last_voice_ms, self.ready_at_ms) >= SEED_RELEASE_QUIET_MS
        ):
            self.seed_open = False
            return CompleteSeed()
        return None

    def watchdog(self, now_ms: float, last_voice_ms: float | None) -> Nudge | DropStalled | None:
        """The model silent `stall_timeout_s` since a reply was expected (and since the caller's
        last sound): nudge it once, then drop the session."""
        since = self.expect_reply_at
        if since is None or now_ms - max(since, last_voice_ms or 0.0) < self.stall_ms:
            return None
        if not self.nudged:
            self.nudged = True
            self.expect_reply_at = now_ms
            return Nudge()
        self.expect_reply_at = None
        self.nudged = False
        return DropStalled()
