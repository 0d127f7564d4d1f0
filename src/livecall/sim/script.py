"""What a simulated call does and what it measured, the same for every carrier's edge.

The script is a list of small actions (`Say`, `Pause`, `WaitForAgentAudio`,
`WaitForAgentSilence`, `PressDigit`, `SendRaw`, `HangUp`, `Probe`); `CallResult` holds what was
sent, heard and measured (response latency, barge-in stop time, echo round trips). Kept apart
from the engine (`livecall.sim.edge`) so a suite written against one carrier's simulator
drives any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from livecall.audio.g711 import ulaw_decode

__all__ = [
    "SAMPLE_RATE",
    "CallResult",
    "HangUp",
    "Pause",
    "PressDigit",
    "Probe",
    "Say",
    "ScriptAction",
    "SendRaw",
    "TimedName",
    "TimelineEvent",
    "Utterance",
    "WaitForAgentAudio",
    "WaitForAgentSilence",
]

SAMPLE_RATE = 8000  # what a phone line carries: the caller's side is μ-law 8 kHz throughout


# --------------------------------------------------------------------------- script
@dataclass(slots=True)
class Say:
    """Speak a clip: int16 PCM at `rate`, or μ-law bytes at `rate` (8 kHz normally)."""

    audio: npt.NDArray[np.int16] | bytes
    rate: int = SAMPLE_RATE
    label: str = ""


@dataclass(slots=True)
class Pause:
    """Stay silent (silence frames keep flowing) for `ms`."""

    ms: int


@dataclass(slots=True)
class WaitForAgentAudio:
    """Wait until this much agent audio was heard in the current reply, while it plays.

    A reply is agent audio without a silence of `agent_reply_gap_ms` (1 s); the wait ends
    while audio is actually playing, so the next `Say` interrupts the agent mid-reply.
    """

    min_heard_ms: int = 300
    timeout: float = 10.0


@dataclass(slots=True)
class WaitForAgentSilence:
    """Wait until the agent was heard after the caller's last words, then silent this long."""

    silence_ms: int = 600
    timeout: float = 15.0


@dataclass(slots=True)
class PressDigit:
    """Send a `dtmf` event (track inbound_track)."""

    digit: str


@dataclass(slots=True)
class SendRaw:
    """Send this exactly (str -> text frame, bytes -> binary frame): for malformed-frame tests."""

    data: str | bytes


@dataclass(slots=True)
class HangUp:
    """The caller hangs up: `stop` then close, or just close (or drop TCP with `abrupt`)."""

    send_stop: bool = True
    abrupt: bool = False


@dataclass(slots=True)
class Probe:
    """Send one frame of a loud 1.8 kHz tone and time its echo in the incoming media."""


ScriptAction = (
    Say | Pause | WaitForAgentAudio | WaitForAgentSilence | PressDigit | SendRaw | HangUp | Probe
)


# --------------------------------------------------------------------------- result


@dataclass(slots=True)
class TimedName:
    """A named thing (mark, digit) and when it happened (monotonic seconds)."""

    name: str
    t: float


@dataclass(slots=True)
class TimelineEvent:
    """One entry of the call's timeline (monotonic seconds)."""

    t: float
    kind: str
    detail: str = ""


@dataclass(slots=True)
class Utterance:
    """One `Say`: when speech started/ended on the wire and how the agent reacted.

    `start`/`end` are the send times of the frames holding the clip's first and last audible
    sample (so leading/trailing silence in a clip does not skew latency).
    `response_latency_ms`: first agent audio heard after `end`.
    `barge_in_stop_ms`: if agent audio was playing at `start`, how long until it stopped.
    """

    label: str
    start: float | None = None
    end: float | None = None
    barged_in: bool = False
    response_latency_ms: float | None = None
    barge_in_stop_ms: float | None = None


@dataclass
class CallResult:
    """Everything one simulated call sent, heard and measured (times: loop monotonic seconds)."""

    call_sid: str
    account_sid: str
    stream_sid: str | None = None
    twiml: str = ""
    webhook_status: int | None = None
    rejected: bool = False
    reject_reason: str | None = None
    said: list[str] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    stream_url: str | None = None
    action_twiml: str | None = None
    started: float = 0.0
    stream_started: float | None = None
    ended: float = 0.0
    ended_by: Literal["caller", "server"] | None = None
    close_code: int | None = None
    close_reason: str = ""
    frames_sent: int = 0
    frames_dropped: int = 0
    clock_late_ticks: int = 0  # ticks run >10 ms late: the simulator's own loop was too busy
    clock_late_max_ms: float = 0.0
    heard: bytes = b""
    received_media_bytes: int = 0
    marks_received: list[TimedName] = field(default_factory=list)
    marks_echoed: list[TimedName] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    digits_sent: list[TimedName] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)
    timeline: list[TimelineEvent] = field(default_factory=list)
    utterances: list[Utterance] = field(default_factory=list)
    agent_stretches: list[tuple[float, float]] = field(default_factory=list)
    probe_rtts_ms: list[float] = field(default_factory=list)
    probes_sent: int = 0
    probes_lost: int = 0
    # what the carrier did to the call over its REST API (a fake carrier API tells the
    # caller through `end_from_carrier`): "hangup" or "transfer", and the transfer's target
    carrier_action: str | None = None
    transferred_to: str | None = None

    def heard_pcm(self) -> npt.NDArray[np.int16]:
        """The playout timeline as int16 PCM at 8 kHz."""
        return ulaw_decode(self.heard)

    @property
    def heard_ms(self) -> float:
        return len(self.heard) / 8.0

    @property
    def response_latencies_ms(self) -> list[float]:
        return [u.response_latency_ms for u in self.utterances if u.response_latency_ms is not None]

    @property
    def barge_in_stop_ms(self) -> list[float]:
        return [u.barge_in_stop_ms for u in self.utterances if u.barge_in_stop_ms is not None]

    @property
    def duration_s(self) -> float:
        return self.ended - self.started
