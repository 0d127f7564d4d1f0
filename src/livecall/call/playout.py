"""What the caller has actually heard, reconstructed from what was sent and the marks echoed.

Twilio plays the agent audio we send in order, as soon as it arrives, and echoes a `mark` once
everything sent before it has been played; a `clear` empties its queue. So each agent chunk
is followed by a mark, and this tracker keeps a model of the carrier's playout queue: when
each chunk started and stopped playing, corrected by the mark echoes as they come back. At a
barge-in it answers "how much of this turn did the caller hear?", which cuts the transcript
and places agent audio in the recording.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["Chunk", "PlayoutTracker"]

UNDERRUN_MS = 40.0  # an echo this much later than modelled: the carrier ran dry and resumed


@dataclass(slots=True)
class Chunk:
    mark: str
    turn: int
    samples: int  # at the carrier's rate
    turn_end: int  # samples of this turn sent up to and including this chunk
    start_ms: float  # estimated playout start
    end_ms: float  # estimated playout end (exact once the mark has been echoed)
    played: bool = False
    stretch: int = 0  # chunks of one stretch play back to back
    audio: bytes | None = None  # what was sent (for the recording), dropped once placed


class PlayoutTracker:
    """A model of the carrier's playout queue, in milliseconds of a monotonic clock."""

    def __init__(self, rate: int = 8000) -> None:
        self.rate = rate
        self._ms_per_sample = 1000.0 / rate
        self._pending: deque[Chunk] = deque()  # sent, mark not yet echoed
        self._by_mark: dict[str, Chunk] = {}
        self._cursor_ms = 0.0  # when the queue (as we model it) runs dry
        self._seq = 0
        self.sent_samples = 0  # all turns
        self.played_samples = 0  # confirmed by marks
        self.marks_echoed = 0
        self.unknown_marks = 0
        self._last_played: Chunk | None = None
        self.just_played: list[Chunk] = []  # confirmed by the last mark echo, in order
        self._stretch = 0
        self._anchored = 0  # the latest stretch whose timing a mark echo has fixed

    def next_mark(self) -> str:
        self._seq += 1
        return f"a{self._seq}"

    def sent(
        self,
        now_ms: float,
        turn: int,
        samples: int,
        turn_end: int,
        mark: str | None,
        audio: bytes | None = None,
    ) -> Chunk:
        """A chunk of `samples` went to the carrier at `now_ms`, followed by `mark` if any.

        Not every chunk needs its own mark: one echo confirms everything sent before it.
        """
        if now_ms >= self._cursor_ms:  # the carrier's queue has run dry: a new stretch
            self._stretch += 1
        start = max(now_ms, self._cursor_ms)
        end = start + samples * self._ms_per_sample
        self._cursor_ms = end
        chunk = Chunk(
            mark or "", turn, samples, turn_end, start, end, stretch=self._stretch, audio=audio
        )
        self._pending.append(chunk)
        if mark:
            self._by_mark[mark] = chunk
        self.sent_samples += samples
        return chunk

    def mark_echoed(self, now_ms: float, name: str) -> Chunk | None:
        """The carrier played everything up to `name`; later chunks shift if it ran late."""
        chunk = self._by_mark.pop(name, None)
        if chunk is None:
            self.unknown_marks += 1
            return None
        self.marks_echoed += 1
        # Marks come back in order; anything before this one has been played too.
        confirmed: list[Chunk] = []
        while self._pending:
            head = self._pending.popleft()
            if not head.played:
                head.played = True
                self.played_samples += head.samples
                self._last_played = head
                confirmed.append(head)
            if head.mark:
                self._by_mark.pop(head.mark, None)
            if head is chunk:
                break
        # The first echo of a stretch fixes when that stretch really played (the carrier
        # echoes on its own frame clock, so later echoes only move things on a real underrun).
        late = now_ms - chunk.end_ms
        if chunk.stretch > self._anchored:
            self._anchored = chunk.stretch
            for moved in (*confirmed, *self._pending):
                if moved.stretch == chunk.stretch:
                    moved.start_ms += late
                    moved.end_ms += late
        elif late > UNDERRUN_MS:
            for moved in self._pending:
                moved.start_ms += late
                moved.end_ms += late
        # The carrier plays in order: nothing can start before the audio ahead of it ended.
        previous_end = chunk.end_ms
        for later in self._pending:
            if later.start_ms < previous_end:
                overlap = previous_end - later.start_ms
                later.start_ms += overlap
                later.end_ms += overlap
            previous_end = later.end_ms
        self._cursor_ms = previous_end  # the end of the last chunk still queued, or this one
        self.just_played = confirmed
        return chunk

    def heard_in_turn(self, turn: int, now_ms: float) -> int:
        """Samples of `turn` the caller has heard by `now_ms` (played marks + the playing part)."""
        last = self._last_played
        heard = last.turn_end if last is not None and last.turn == turn else 0
        for chunk in self._pending:
            if chunk.turn != turn:
                continue
            if chunk.start_ms >= now_ms:
                break
            played = min(chunk.samples, int((now_ms - chunk.start_ms) / self._ms_per_sample))
            heard = chunk.turn_end - chunk.samples + played
            if played < chunk.samples:
                break
        return heard

    def attach_mark(self, mark: str) -> bool:
        """Marks the last chunk sent, if it has no mark yet; False when there is nothing to mark."""
        if not self._pending or self._pending[-1].mark:
            return False
        self._pending[-1].mark = mark
        self._by_mark[mark] = self._pending[-1]
        return True

    def pending(self) -> list[Chunk]:
        return list(self._pending)

    def clear(self, now_ms: float) -> list[Chunk]:
        """A `clear` went out at `now_ms`: the queue is gone; returns the chunks dropped."""
        dropped = list(self._pending)
        self._pending.clear()
        self._by_mark.clear()
        self._cursor_ms = now_ms
        return dropped

    @property
    def queued_ms(self) -> float:
        """Audio sent but (as modelled) not yet played, from the last chunk's estimated end."""
        if not self._pending:
            return 0.0
        return max(0.0, self._pending[-1].end_ms - self._pending[0].start_ms)

    def busy_until_ms(self) -> float:
        return self._cursor_ms

    def has_pending(self) -> bool:
        return bool(self._pending)
