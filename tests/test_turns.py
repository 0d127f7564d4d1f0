"""Transcript building: turns, late caller words, interruptions cut at what was heard."""

from __future__ import annotations

from livecall.call.turns import TurnTracker, cut_text_at


def test_cut_text_keeps_the_heard_fraction_of_words() -> None:
    pieces = [(800, "Hello there, "), (1600, "how are you doing today?")]
    assert cut_text_at(pieces, 1600) == "Hello there, how are you doing today?"
    assert cut_text_at(pieces, 800) == "Hello there,"
    assert cut_text_at(pieces, 1200) == "Hello there, how are"
    assert cut_text_at(pieces, 0) == ""


def _speak(t: TurnTracker, start: float, end: float) -> None:
    ms = start
    while ms <= end:
        t.caller_frame(ms, True)
        ms += 20


def test_a_plain_exchange_with_latency_and_trailing_caller_words() -> None:
    t = TurnTracker("CA1")
    _speak(t, 1000, 2000)
    t.caller_transcript(1500, "Hi, I'd like ")
    t.caller_frame(2020, False)
    t.agent_audio(2600, 800)  # the agent answers 600 ms after the caller's last word
    t.caller_transcript(2650, "a table.")  # transcription lags the audio
    t.agent_transcript(2700, "Of course.")
    t.turn_complete(3000)
    caller, agent = t.drain()
    assert (caller.speaker, caller.text, caller.start_ms, caller.end_ms) == (
        "caller",
        "Hi, I'd like a table.",
        1000,
        2000,
    )
    assert agent.speaker == "agent" and agent.text == "Of course." == agent.heard_text
    assert agent.first_audio_latency_ms == 600
    assert not agent.interrupted
    assert t.latencies_ms == [600]


def test_an_interrupted_agent_turn_is_cut_at_what_was_heard() -> None:
    t = TurnTracker("CA1")
    t.agent_audio(0, 800)
    t.agent_transcript(10, "We have tables from six. ")
    t.agent_audio(100, 800)
    t.agent_transcript(110, "Would you like the terrace or inside?")
    _speak(t, 1100, 1400)
    t.interrupted(clear_ms=1300, heard_samples=1200)
    t.caller_transcript(1500, "Seven thirty please.")
    t.turn_complete(1510)
    t.finish(3000)
    agent, caller = t.drain()
    assert agent.interrupted and agent.heard_text == "We have tables from six. Would you like"
    assert agent.text.endswith("inside?")
    assert agent.barge_in_stop_ms == 200
    assert agent.first_audio_latency_ms is None  # a greeting: nobody spoke before it
    assert caller.text == "Seven thirty please." and caller.start_ms == 1100
    assert t.interruptions == 1


def test_interim_caller_words_show_live_but_never_reach_the_record() -> None:
    t = TurnTracker("CA1")
    t.caller_frame(0.0, True)
    t.caller_interim(100.0, "what time")
    assert [(ln.speaker, ln.text) for ln in t.open_lines()] == [("caller", "what time")]
    t.caller_interim(200.0, "what time do you")  # a newer guess replaces the last one
    assert [ln.text for ln in t.open_lines()] == ["what time do you"]
    t.caller_transcript(300.0, " What time do")  # the final words supersede the guess
    assert [ln.text for ln in t.open_lines()] == ["What time do"]
    t.caller_interim(350.0, "you open")
    assert [ln.text for ln in t.open_lines()] == ["What time do you open"]
    t.caller_transcript(400.0, " you open?")
    t.agent_audio(500.0, 800)
    t.turn_complete(900.0)
    assert [(r.speaker, r.text) for r in t.drain()] == [
        ("caller", "What time do you open?"),
        ("agent", ""),
    ]
    # a guess never confirmed by final words is not on record at all
    t.caller_interim(1000.0, "uh")
    t.finish(1100.0)
    assert t.drain() == []
