"""`livecall demo`: one whole phone call, offline, in a few seconds.

The real livecall server runs on loopback between a simulated Gemini Live (over TLS, driven
by the real SDK) and a simulated Twilio caller who books a table, talks over the agent's
long answer, and hangs up after the confirmation. The conversation is printed as it happens
and the caller's side is written to a WAV file, so a newcomer sees (and hears) the product;
then the post-call analysis (summary, the booking's details, success) is printed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console

from livecall.log import configure_logging
from livecall.outcomes.preview import print_webhook, stored_call_webhook
from livecall.records import CallEventRecord, CallInfo, CallSummary, TurnRecord
from livecall.sim.clips import load_clip
from livecall.sim.gemini import Scenario
from livecall.sim.stack import LocalStack
from livecall.sim.twilio import HangUp, Pause, Say, WaitForAgentAudio, WaitForAgentSilence

console = Console(highlight=False)


class PrintingObserver:
    """Prints the call's records the moment the bridge produces them."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.summary: CallSummary | None = None
        self.turns: list[TurnRecord] = []

    def _at(self) -> str:
        return f"[dim]{time.monotonic() - self.t0:6.2f}s[/dim]"

    def call_started(self, info: CallInfo) -> None:
        console.print(
            f"{self._at()}  [bold]call[/bold] {info.call_sid} from {info.from_number} "
            f"answered by livecall (model {info.model})"
        )

    def turn(self, turn: TurnRecord) -> None:
        self.turns.append(turn)
        if turn.speaker == "caller":
            console.print(f"{self._at()}  [cyan]caller[/cyan]: {turn.text}")
            return
        latency = (
            f"  [dim](answered {turn.first_audio_latency_ms:.0f} ms after the caller stopped)[/dim]"
            if turn.first_audio_latency_ms is not None
            else ""
        )
        if turn.interrupted:
            console.print(
                f"{self._at()}  [green]agent[/green]: {turn.heard_text} "
                f"[yellow]— cut off by the caller[/yellow]{latency}"
            )
            rest = turn.text[len(turn.heard_text or "") :]
            console.print(f"           [dim](it would have gone on: …{rest})[/dim]")
        else:
            console.print(f"{self._at()}  [green]agent[/green]: {turn.text}{latency}")

    def event(self, event: CallEventRecord) -> None:
        if event.kind == "interrupted":
            console.print(
                f"{self._at()}  [yellow]barge-in[/yellow]: the caller talks over the "
                "agent; livecall sends Twilio a clear"
            )

    def call_ended(self, summary: CallSummary) -> None:
        self.summary = summary
        console.print(
            f"{self._at()}  [bold]call ended[/bold] ({summary.end_reason}, "
            f"{summary.duration_s:.1f} s)"
        )


# The demo's agent: a restaurant whose calls are analysed afterwards (summary, the booking's
# details, whether a table was booked) and whose callers are remembered.
DEMO_PROFILE: dict[str, Any] = {
    "name": "bella-vista",
    "default": True,
    "analysis": {
        "enabled": True,
        "goal": "A table is booked with a name, a party size and a time.",
        "fields": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "the name of the booking"},
                "party_size": {"type": "integer"},
                "time": {"type": "string"},
                "callback_number": {"type": ["string", "null"]},
            },
            "required": ["name", "party_size", "time"],
        },
    },
    "memory": {"enabled": True, "max_calls": 3, "max_age_days": 90},
}


def _print_analysis(analysis: dict[str, Any] | None) -> None:
    console.print("[bold]Post-call analysis[/bold] (after the call, off its path)")
    if analysis is None:
        console.print("  [red]no analysis arrived[/red]")
        return
    if analysis["status"] != "done":
        console.print(f"  {analysis['status']}: {analysis.get('error') or ''}")
        return
    console.print(f"  summary: {analysis['summary']}")
    for key, value in (analysis.get("fields") or {}).items():
        console.print(f"  {key.replace('_', ' ')}: {value}")
    verdict = "goal reached" if analysis["success"] else "goal not reached"
    console.print(f"  {verdict}: {analysis['success_reason']}  [dim]({analysis['model']})[/dim]")


def _write_wav(path: Path, pcm: np.ndarray, rate: int = 8000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())


async def run_demo(out: Path, *, verbose: bool = False) -> int:
    configure_logging("info" if verbose else "warning")
    if not verbose:
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    t0 = time.monotonic()
    observer = PrintingObserver(t0)
    book, book_rate = load_clip("book")
    when, when_rate = load_clip("time")
    script = [
        Pause(400),
        Say(book, rate=book_rate, label="book"),
        WaitForAgentAudio(min_heard_ms=2500, timeout=15),
        Say(when, rate=when_rate, label="time"),
        WaitForAgentSilence(silence_ms=900, timeout=20),
        HangUp(),
    ]
    console.print(
        "[bold]livecall demo[/bold]: a simulated caller rings a livecall server; "
        "the agent runs on a simulated Gemini Live (no keys, no network).\n"
    )
    settled: dict[str, dict[str, Any]] = {}
    analysed = asyncio.Event()

    def on_settled(call_sid: str, analysis: dict[str, Any]) -> None:
        settled[call_sid] = analysis
        analysed.set()

    with tempfile.TemporaryDirectory(prefix="livecall-demo-") as home:
        profiles = Path(home) / "profiles.yaml"
        profiles.write_text(yaml.safe_dump({"profiles": [DEMO_PROFILE]}, sort_keys=False))
        async with LocalStack(
            scenario=Scenario(),
            settings_overrides={
                "vad_silence_duration_ms": 400,
                "profiles_file": profiles,
                "recording_link_secret": secrets.token_hex(16),  # the webhook's recording link
            },
            observer_factory=lambda _sid: observer,
        ) as stack:
            assert stack.app is not None and stack.settings is not None
            state = stack.app.state.livecall
            state.analysis.on_settled.append(on_settled)
            result = await stack.caller(script, from_="+15551230000", to="+15559870000").run()
            try:
                async with asyncio.timeout(20):
                    await analysed.wait()
            except TimeoutError:
                pass
            await state.registry.wait_idle(10)
            await state.store.flush()
            analysis = settled.get(result.call_sid)
            webhook = await stored_call_webhook(
                state.store.repo, stack.settings, result.call_sid, analysis=analysis
            )
    console.print()
    recording = out / "caller-heard.wav"
    _write_wav(recording, result.heard_pcm())
    latencies = [f"{x:.0f} ms" for x in result.response_latencies_ms]
    console.print("[bold]What the caller experienced[/bold]")
    console.print(
        f"  end of caller speech → first agent audio heard: {', '.join(latencies) or 'n/a'}"
    )
    if result.barge_in_stop_ms:
        stops = ", ".join(f"{x:.0f} ms" for x in result.barge_in_stop_ms)
        console.print(
            f"  agent audio kept playing after the caller started talking over it: {stops}"
        )
    console.print(
        f"  frames sent {result.frames_sent}, marks echoed {len(result.marks_echoed)}, "
        f"clears {len(result.clears)}, protocol errors {len(result.protocol_errors)}"
    )
    console.print(f"  what the caller heard: {recording}")
    console.print()
    _print_analysis(analysis)
    if webhook is not None:
        console.print()
        console.print(
            "[bold]The end-of-call webhook livecall would POST[/bold] "
            "(set CALL_WEBHOOK_URL and CALL_WEBHOOK_SECRET; signed here with 'demo-secret')"
        )
        print_webhook(console, webhook, "demo-secret")
    ok = (
        observer.summary is not None
        and webhook is not None
        and not result.protocol_errors
        and len(result.response_latencies_ms) >= 2
        and len(result.clears) >= 1
        and analysis is not None
        and analysis["status"] == "done"
    )
    if not ok:
        console.print("[red]the demo call did not go as expected[/red]")
        return 1
    return 0
