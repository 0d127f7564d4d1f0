"""The session supervisor: every transition and its reason, without a socket."""

from __future__ import annotations

from livecall.call.supervisor import (
    Apologize,
    CompleteSeed,
    DropStalled,
    GiveUp,
    Live,
    Nudge,
    Open,
    Replay,
    Reprompt,
    Rotate,
    SessionSupervisor,
    Wait,
)


def _sup(**kw: object) -> SessionSupervisor:
    return SessionSupervisor(rand=lambda: 0.5, **kw)  # type: ignore[arg-type]  # test knobs


def _quiet(sup: SessionSupervisor, now_ms: float) -> Rotate | None:
    return sup.tick(
        now_ms,
        last_voice_ms=None,
        agent_turn_open=False,
        playout_busy_until_ms=0.0,
        tools_running=False,
    )


def test_the_first_session_opens_fresh_and_goes_live_unseeded() -> None:
    sup = _sup()
    assert sup.begin("start", None, 0.0) == Open(None, 1, "start")
    assert sup.connected() == Replay(seed=False)
    assert sup.live(12.0) == Live(
        first=True, resumed=False, attempt=1, reason="start", code=None, gap_ms=12.0
    )
    assert sup.sessions == 1


def test_a_lost_session_resumes_with_the_newest_handle() -> None:
    sup = _sup()
    sup.begin("start", None, 0.0)
    sup.connected()
    sup.live(0.0)
    sup.resumable("h1")
    sup.resumable("h2")
    assert sup.lost(100.0) is None
    assert sup.begin("session_lost", 1011, 5000.0) == Open("h2", 1, "session_lost")
    assert sup.connected() == Replay(seed=False)
    live = sup.live(5040.0)
    assert (live.first, live.resumed, live.code, live.gap_ms) == (False, True, 1011, 40.0)


def test_connect_failures_back_off_doubling_then_give_up_after_the_attempts() -> None:
    sup = _sup(attempts=3, backoff_initial_s=0.2, backoff_max_s=0.3)
    sup.begin("session_lost", 1011, 0.0)
    assert sup.connect_failed(1011) == Wait(0.2, 1)  # rand 0.5: the base delay itself
    assert sup.retry() == Open(None, 2, "session_lost")
    assert sup.connect_failed(None) == Wait(0.3, 2)  # doubled, capped at the maximum
    assert sup.retry() == Open(None, 3, "session_lost")
    assert sup.connect_failed(None) == GiveUp("gemini_failed", "3 attempts failed")


def test_a_refused_handle_is_dropped_for_a_fresh_session_seeded_with_the_transcript() -> None:
    sup = _sup()
    sup.begin("start", None, 0.0)
    sup.connected()
    sup.live(0.0)
    sup.resumable("expired")
    sup.begin("session_lost", 1011, 0.0)
    assert sup.connect_failed(1008) == Open(None, 2, "session_lost")  # at once, no backoff
    assert sup.handle is None
    assert sup.connected() == Replay(seed=True)  # a fresh session after others: seeded
    assert not sup.live(0.0).resumed


def test_a_refused_fresh_session_cannot_be_helped_by_retrying() -> None:
    sup = _sup()
    sup.begin("start", None, 0.0)
    assert sup.connect_failed(1007) == GiveUp(
        "gemini_failed", "refused (1007): retrying cannot help"
    )


def test_a_refused_handle_on_the_last_attempt_gives_up() -> None:
    sup = _sup(attempts=1)
    sup.resumable("h")
    sup.begin("go_away", None, 0.0)
    assert sup.connect_failed(1008) == GiveUp("gemini_failed", "1 attempts failed")


def test_a_session_lost_while_switching_backs_off_like_a_failed_connect() -> None:
    sup = _sup(attempts=2)
    sup.begin("go_away", None, 0.0)
    sup.connected()
    assert sup.switch_failed() == Wait(0.2, 1)
    assert sup.retry() == Open(None, 2, "go_away")
    sup.connected()
    assert sup.switch_failed() == GiveUp("gemini_failed", "2 attempts failed")


def test_sessions_failing_repeatedly_within_the_window_give_up() -> None:
    sup = _sup(attempts=2, failure_window_s=60.0)
    assert sup.lost(0.0) is None
    assert sup.lost(10.0) is None
    assert sup.lost(20.0) == GiveUp("gemini_failed", "failing repeatedly: 3 losses")
    sup2 = _sup(attempts=2, failure_window_s=60.0)
    assert sup2.lost(0.0) is None
    assert sup2.lost(10.0) is None
    assert sup2.lost(71.0) is None  # the first loss left the window


def test_only_a_handle_after_a_turn_of_its_own_settles_the_replayed_audio() -> None:
    sup = _sup()
    sup.begin("start", None, 0.0)
    sup.connected()
    assert not sup.resumable("setup")  # the state resumed from: replayed audio still owed
    sup.turn_complete(sup.sessions)
    assert sup.resumable("after-turn")
    sup.begin("go_away", None, 0.0)
    sup.connected()  # a new session: its turns start from zero
    assert not sup.resumable("setup-2")
    assert sup.handle == "setup-2"


def test_go_away_sets_the_deadline_a_margin_before_the_end() -> None:
    sup = _sup(rotation_margin_s=5.0)
    assert sup.go_away(1000.0, 30.0) == 1000.0 + 25000.0
    assert sup.go_away(1000.0, 4.0) == 1000.0 + 2000.0  # less time left: half of it
    assert sup.go_away(0.0, None) == 5000.0  # no time given: 10 s assumed


def test_rotation_waits_for_a_turn_boundary_until_the_deadline() -> None:
    sup = _sup(rotation_margin_s=5.0)
    assert _quiet(sup, 0.0) is None  # no goAway, no rotation
    sup.go_away(0.0, 20.0)  # deadline at 15 s
    talking = {
        "last_voice_ms": 900.0,
        "agent_turn_open": True,
        "playout_busy_until_ms": 2000.0,
        "tools_running": True,
    }
    assert sup.tick(1000.0, **talking) is None  # type: ignore[arg-type]
    assert _quiet(sup, 1000.0) == Rotate()
    assert sup.tick(15000.0, **talking) == Rotate()  # type: ignore[arg-type]
    assert sup.begin("go_away", None, 15000.0).reason == "go_away"
    assert sup.rotation_deadline_ms is None  # the rotation under way clears it
    assert _quiet(sup, 16000.0) is None


def test_a_silent_model_is_nudged_once_then_dropped() -> None:
    sup = _sup(stall_timeout_s=10.0)
    assert sup.watchdog(50_000.0, None) is None  # nothing expected
    sup.awaiting_reply(1000.0)
    assert sup.watchdog(10_999.0, None) is None
    assert sup.watchdog(11_000.0, 2000.0) is None  # the caller spoke since: counted from then
    assert sup.watchdog(12_000.0, 2000.0) == Nudge()
    assert sup.nudged and sup.expect_reply_at == 12_000.0
    assert sup.watchdog(21_999.0, 2000.0) is None
    assert sup.watchdog(22_000.0, 2000.0) == DropStalled()
    assert (sup.expect_reply_at, sup.nudged) == (None, False)


def test_the_agent_speaking_or_a_new_session_stops_the_watchdog() -> None:
    sup = _sup(stall_timeout_s=1.0)
    sup.awaiting_reply(0.0)
    assert sup.watchdog(1000.0, None) == Nudge()
    sup.agent_spoke()
    assert (sup.expect_reply_at, sup.nudged) == (None, False)
    assert sup.watchdog(5000.0, None) is None
    sup.awaiting_reply(6000.0)
    sup.begin("go_away", None, 6000.0)
    sup.connected()
    sup.live(6100.0)
    assert sup.watchdog(60_000.0, None) is None


def test_a_handle_from_the_outgoing_session_while_the_next_opens_is_ignored() -> None:
    sup = _sup()
    sup.begin("start", None, 0.0)
    sup.connected()
    sup.turn_complete(1)
    assert sup.resumable("h1")
    assert sup.begin("go_away", None, 0.0) == Open("h1", 1, "go_away")
    sup.turn_complete(1)  # the old session answers while the next one connects (overlap)
    assert not sup.resumable("h-late")  # the audio since h1 is still owed to the next session
    assert sup.handle == "h1"
    assert sup.connected() == Replay(seed=False)
    assert not sup.resumable("setup-2")
    assert sup.handle == "setup-2"


def test_a_turn_of_a_replaced_session_does_not_count_for_the_new_one() -> None:
    sup = _sup()
    sup.begin("start", None, 0.0)
    sup.connected()
    started_in = sup.sessions  # a turn completes on session 1 ...
    sup.begin("go_away", None, 0.0)
    sup.connected()  # ... while the switch to session 2 happens
    sup.turn_complete(started_in)
    assert sup.session_turns == 0
    assert not sup.resumable("setup-2")  # so its setup handle still owes the replayed audio


def test_with_reconnects_off_the_first_loss_gives_up_but_the_first_connect_happens() -> None:
    sup = _sup(attempts=0)
    assert sup.begin("start", None, 0.0) == Open(None, 1, "start")
    assert sup.connect_failed(1011) == GiveUp("gemini_failed", "1 attempts failed")
    assert sup.lost(1.0) == GiveUp("gemini_failed", "failing repeatedly: 1 losses")


def _seeded_session(sup: SessionSupervisor, ready_ms: float) -> None:
    sup.begin("start", None, 0.0)
    sup.connected()
    sup.live(0.0)
    sup.answered(500.0)  # the greeting
    sup.begin("session_lost", 1007, 1000.0)
    sup.connect_failed(1008)
    assert sup.connected() == Replay(seed=True)
    sup.seeded()
    sup.live(ready_ms)


def _at(sup: SessionSupervisor, now_ms: float, voice: float | None, agent: bool = False) -> object:
    return sup.tick(
        now_ms,
        last_voice_ms=voice,
        agent_turn_open=agent,
        playout_busy_until_ms=0.0,
        tools_running=False,
    )


def test_a_seeded_session_has_its_turn_completed_once_the_caller_spoke_and_all_went_quiet() -> None:
    sup = _sup()
    _seeded_session(sup, ready_ms=2000.0)
    assert _at(sup, 5000.0, voice=400.0) is None  # the caller has not spoken since the answer
    assert _at(sup, 3500.0, voice=2600.0) is None  # quiet only 900 ms
    assert _at(sup, 3600.0, voice=2600.0, agent=True) is None  # the model is answering
    assert _at(sup, 3600.0, voice=2600.0) == CompleteSeed()
    assert not sup.seed_open
    assert _at(sup, 9000.0, voice=2600.0) is None  # once


def test_the_seed_quiet_counts_from_when_the_session_began() -> None:
    sup = _sup()
    _seeded_session(sup, ready_ms=3000.0)
    assert _at(sup, 3900.0, voice=2600.0) is None  # the caller spoke before the session began
    assert _at(sup, 4000.0, voice=2600.0) == CompleteSeed()


def test_a_rotation_comes_before_the_seed_and_a_new_session_is_unseeded() -> None:
    sup = _sup()
    _seeded_session(sup, ready_ms=2000.0)
    sup.resumable("fresh-setup")  # the fresh session's own handle
    sup.go_away(2000.0, 1.0)
    assert _at(sup, 9000.0, voice=2600.0) == Rotate()
    assert sup.begin("go_away", None, 9000.0).handle == "fresh-setup"
    assert sup.connected() == Replay(seed=False)  # resumed: the seed is in its state already
    assert not sup.seed_open


def test_an_unanswered_failed_turn_is_reprompted_at_once_then_apologized_for() -> None:
    sup = _sup(stall_timeout_s=10.0)
    sup.awaiting_reply(1000.0)  # the caller asked something
    first = sup.turn_ended(1500.0, spoke=False, reason="MALFORMED_FUNCTION_CALL", in_progress=False)
    assert first == Reprompt("MALFORMED_FUNCTION_CALL")
    # the watchdog still stands behind the re-prompt, and drops rather than nudges again
    assert sup.watchdog(11_000.0, None) is None
    assert sup.watchdog(11_500.0, None) == DropStalled()
    sup.awaiting_reply(20_000.0)
    second = sup.turn_ended(20_100.0, spoke=False, reason="RESPONSE_REJECTED", in_progress=False)
    assert second == Apologize("RESPONSE_REJECTED")
    # the caller was asked to say it again: no nudge while they think
    assert sup.watchdog(60_000.0, None) is None
    # and the count starts over: the next failure is re-prompted again
    again = sup.turn_ended(61_000.0, spoke=False, reason="SOMETHING_NEW", in_progress=False)
    assert again == Reprompt("SOMETHING_NEW")


def test_an_answer_between_two_failures_starts_the_count_over() -> None:
    sup = _sup()
    assert isinstance(sup.turn_ended(0.0, spoke=False, reason="MALFORMED_FUNCTION_CALL",
                                     in_progress=False), Reprompt)  # fmt: skip
    assert sup.turn_ended(1.0, spoke=True, reason=None, in_progress=False) is None
    assert isinstance(sup.turn_ended(2.0, spoke=False, reason="MALFORMED_FUNCTION_CALL",
                                     in_progress=False), Reprompt)  # fmt: skip


def test_turns_that_are_no_failure_leave_the_watchdog_its_time() -> None:
    sup = _sup(stall_timeout_s=10.0)
    sup.awaiting_reply(0.0)
    for reason in (None, "NEED_MORE_INPUT", "TURN_COMPLETE_REASON_UNSPECIFIED"):
        assert sup.turn_ended(500.0, spoke=False, reason=reason, in_progress=False) is None
    # spoke in the turn, whatever the reason: answered
    assert sup.turn_ended(600.0, spoke=True, reason="MALFORMED_FUNCTION_CALL",
                          in_progress=False) is None  # fmt: skip
    # failed while the service is still at work: output may follow, the watchdog decides
    assert sup.turn_ended(700.0, spoke=False, reason="MALFORMED_FUNCTION_CALL",
                          in_progress=True) is None  # fmt: skip
    assert sup.failed_turns == 0
    assert sup.watchdog(9_999.0, None) is None
    assert sup.watchdog(10_000.0, None) == Nudge()


def test_in_progress_holds_a_rotation_until_idle_or_its_deadline() -> None:
    sup = _sup(rotation_margin_s=5.0)
    sup.begin("start", None, 0.0)
    sup.connected()
    sup.live(0.0)
    sup.turn_ended(100.0, spoke=True, reason=None, in_progress=True)
    deadline = sup.go_away(1000.0, 20.0)  # rotate by 16 s
    assert _quiet(sup, 2000.0) is None  # nobody speaks, but the model is not done
    sup.turn_ended(3000.0, spoke=True, reason=None, in_progress=False)  # IDLE
    assert _quiet(sup, 3100.0) == Rotate()
    sup.turn_ended(3200.0, spoke=True, reason=None, in_progress=True)
    assert _quiet(sup, deadline) == Rotate()  # the deadline wins whatever is happening
    sup.connected()  # a new session: the old one's background work is not its own
    assert not sup.in_progress
