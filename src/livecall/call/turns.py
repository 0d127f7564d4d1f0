"""Who said what, when: the transcript of a call and its per-turn timings, as plain state.

Caller speech is timed by a cheap energy detector on the inbound frames (the model's own
VAD is not visible to us); caller words come from the model's input transcription, agent
words from its output transcription. Transcription lags the audio and may arrive after the
agent has started answering, so a caller turn stays open until the agent's turn completes.
An agent turn cut short by the caller keeps its full text and, separately, the part the
caller heard: the words whose audio was played before the `clear`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from livecall.records import TurnRecord

__all__ = ["TurnTracker", "cut_text_at"]

SILENCE_GAP_MS = 300.0  # a pause this long separates two stretches of caller speech


@dataclass(slots=True)
class _Piece:
    end_position: int  # agent samples sent in the turn when this text arrived
    text: str


@dataclass(slots=True)
class _AgentTurn:
    index: int
    start_ms: float
    latency_ms: float | None
    pieces: list[_Piece] = field(default_factory=list)
    samples: int = 0
    interrupted: bool = False
    heard_samples: int | None = None
    heard_estimated: bool = False
    barge_in_stop_ms: float | None = None


@dataclass(slots=True)
class _CallerTurn:
    index: int
    start_ms: float
    text: list[str] = field(default_factory=list)
    interim: str = ""  # the newest low-latency guess at the words after `text`: live page only

    def words_so_far(self) -> str:
        return " ".join(part for part in ("".join(self.text).strip(), self.interim.strip()) if part)


def cut_text_at(pieces: list[tuple[int, str]], heard: int) -> str:
    """The words of `pieces` (each: audio position when it arrived, text) heard by `heard`.

    A piece describes the audio sent since the previous one; when the caller stopped hearing
    in the middle of it, keep the same fraction of its words.
    """
    out: list[str] = []
    previous = 0
    for position, text in pieces:
        if position <= heard:
            out.append(text)
        else:
            span = max(1, position - previous)
            words = text.split(" ")
            keep = int(len(words) * max(0, heard - previous) / span)
            if keep:
                out.append(" ".join(words[:keep]))
            break
        previous = position
    return "".join(out).strip()


class TurnTracker:
    """Builds `TurnRecord`s as the call goes; times are ms on the call's own clock."""

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        self._next_index = 0
        self._caller: _CallerTurn | None = None
        self._agent: _AgentTurn | None = None
        self._pending_caller: _CallerTurn | None = None  # closed by an agent turn, text may trail
        self.done: list[TurnRecord] = []
        # caller voice activity
        self._speaking = False
        self.last_voice_ms: float | None = None
        self.onset_ms: float | None = None
        self._onset_since_agent: float | None = None
        self._last_agent_start_ms = float("-inf")
        # metrics
        self.turns = 0
        self.agent_turns_started = 0  # a turn that opens and closes between two looks counts
        self.interruptions = 0
        self.latencies_ms: list[float] = []

    # ---------------------------------------------------------------- caller
    def caller_frame(self, now_ms: float, voiced: bool) -> None:
        if voiced:
            if self.last_voice_ms is None or now_ms - self.last_voice_ms > SILENCE_GAP_MS:
                self.onset_ms = now_ms
                if self._onset_since_agent is None:
                    self._onset_since_agent = now_ms
            self.last_voice_ms = now_ms

    def caller_transcript(self, now_ms: float, text: str) -> None:
        turn = self._caller_turn_for(now_ms)
        turn.text.append(text)
        turn.interim = ""  # the final words supersede the guess

    def caller_interim(self, now_ms: float, text: str) -> None:
        """An interim guess at what the caller is saying: shown by `open_lines` until the next
        guess or the final words replace it, never part of the record."""
        self._caller_turn_for(now_ms).interim = text

    def _caller_turn_for(self, now_ms: float) -> _CallerTurn:
        agent = self._agent
        if agent is not None and not agent.interrupted and self._pending_caller is not None:
            return self._pending_caller  # trailing words of the turn being answered
        if self._caller is None:
            start = self._onset_since_agent if self._onset_since_agent is not None else now_ms
            if self.onset_ms is not None and agent is not None and agent.interrupted:
                start = self.onset_ms
            self._caller = _CallerTurn(self._take_index(), start)
        return self._caller

    # ---------------------------------------------------------------- agent
    def agent_audio(self, now_ms: float, samples: int) -> int:
        """Agent audio of `samples` is being sent; returns the turn index it belongs to."""
        turn = self._agent or self._open_agent_turn(now_ms)
        turn.samples += samples
        return turn.index

    def agent_transcript(self, now_ms: float, text: str) -> None:
        turn = self._agent or self._open_agent_turn(now_ms)
        turn.pieces.append(_Piece(turn.samples, text))

    def _open_agent_turn(self, now_ms: float) -> _AgentTurn:
        caller = self._caller
        self._caller = None
        self._flush_pending_caller()
        self._pending_caller = caller
        latency = None
        if self.last_voice_ms is not None and self.last_voice_ms > self._last_agent_start_ms:
            latency = max(0.0, now_ms - self.last_voice_ms)
            self.latencies_ms.append(latency)
        self._last_agent_start_ms = now_ms
        self._onset_since_agent = None
        self._agent = _AgentTurn(self._take_index(), now_ms, latency)
        self.agent_turns_started += 1
        return self._agent

    @property
    def agent_turn_open(self) -> bool:
        return self._agent is not None

    @property
    def agent_turn_index(self) -> int | None:
        return self._agent.index if self._agent is not None else None

    @property
    def agent_samples(self) -> int:
        return self._agent.samples if self._agent is not None else 0

    def interrupted(self, clear_ms: float, heard_samples: int, *, estimated: bool = False) -> None:
        """The caller cut in: `heard_samples` of the turn were heard (`estimated`: by the pacing
        model, the carrier confirms no playout); the audio stopped at `clear_ms`."""
        turn = self._agent
        if turn is None or turn.interrupted:
            return
        turn.interrupted = True
        turn.heard_samples = min(heard_samples, turn.samples)
        turn.heard_estimated = estimated
        if self.onset_ms is not None and self.onset_ms <= clear_ms:
            turn.barge_in_stop_ms = clear_ms - self.onset_ms
        self.interruptions += 1

    def turn_complete(self, now_ms: float) -> None:
        turn = self._agent
        if turn is None:
            return
        self._agent = None
        self._flush_pending_caller()
        self._emit_agent(turn, now_ms)

    def finish(self, now_ms: float) -> None:
        """The call ended: whatever is open is written as it stands."""
        if self._agent is not None:
            turn = self._agent
            self._agent = None
            self._flush_pending_caller()
            self._emit_agent(turn, now_ms)
        self._flush_pending_caller()
        if self._caller is not None:
            caller, self._caller = self._caller, None
            self._emit_caller(caller)
        self.done.sort(key=lambda t: t.index)

    # ---------------------------------------------------------------- records
    def _take_index(self) -> int:
        index = self._next_index
        self._next_index += 1
        return index

    def _flush_pending_caller(self) -> None:
        if self._pending_caller is not None:
            caller, self._pending_caller = self._pending_caller, None
            self._emit_caller(caller)

    def _emit_caller(self, turn: _CallerTurn) -> None:
        if not turn.text:
            return  # only interim guesses, never confirmed: nothing the caller is on record for
        end = self.last_voice_ms if self.last_voice_ms is not None else turn.start_ms
        self.turns += 1
        self.done.append(
            TurnRecord(
                call_sid=self.call_sid,
                index=turn.index,
                speaker="caller",
                text="".join(turn.text).strip(),
                start_ms=round(turn.start_ms),
                end_ms=round(max(end, turn.start_ms)),
            )
        )

    def _emit_agent(self, turn: _AgentTurn, now_ms: float) -> None:
        text = "".join(p.text for p in turn.pieces).strip()
        if turn.interrupted and turn.heard_samples is not None:
            heard = cut_text_at([(p.end_position, p.text) for p in turn.pieces], turn.heard_samples)
            end_ms = turn.start_ms + turn.heard_samples / 8.0
        else:
            heard = text
            end_ms = max(now_ms, turn.start_ms + turn.samples / 8.0)
        self.turns += 1
        self.done.append(
            TurnRecord(
                call_sid=self.call_sid,
                index=turn.index,
                speaker="agent",
                text=text,
                start_ms=round(turn.start_ms),
                end_ms=round(end_ms),
                interrupted=turn.interrupted,
                heard_text=heard,
                heard_estimated=turn.interrupted and turn.heard_estimated,
                first_audio_latency_ms=turn.latency_ms,
                barge_in_stop_ms=turn.barge_in_stop_ms,
            )
        )

    def open_lines(self) -> list[TurnRecord]:
        """The turns still being spoken, with their words so far (for the live page).

        Partial records: the index is the one the finished turn will have, so a watcher can
        replace the line in place when `drain` hands out the final record.
        """
        lines: list[TurnRecord] = []
        for caller in (self._pending_caller, self._caller):
            if caller is not None and (caller.text or caller.interim.strip()):
                lines.append(
                    TurnRecord(
                        call_sid=self.call_sid,
                        index=caller.index,
                        speaker="caller",
                        text=caller.words_so_far(),
                        start_ms=round(caller.start_ms),
                    )
                )
        agent = self._agent
        if agent is not None and agent.pieces:
            lines.append(
                TurnRecord(
                    call_sid=self.call_sid,
                    index=agent.index,
                    speaker="agent",
                    text="".join(p.text for p in agent.pieces).strip(),
                    start_ms=round(agent.start_ms),
                    interrupted=agent.interrupted,
                )
            )
        return lines

    def drain(self) -> list[TurnRecord]:
        done, self.done = self.done, []
        return done
