"""The playout model: what the caller heard, from chunks sent and marks echoed."""

from __future__ import annotations

from livecall.call.playout import PlayoutTracker


def test_chunks_queue_back_to_back_and_marks_confirm_them() -> None:
    p = PlayoutTracker(rate=8000)
    a = p.sent(0.0, turn=1, samples=800, turn_end=800, mark="a1")  # 100 ms
    b = p.sent(10.0, turn=1, samples=800, turn_end=1600, mark="a2")
    assert (a.start_ms, a.end_ms) == (0.0, 100.0)
    assert (b.start_ms, b.end_ms) == (100.0, 200.0)
    assert p.heard_in_turn(1, 150.0) == 1200
    p.mark_echoed(100.0, "a1")
    assert p.played_samples == 800
    assert p.heard_in_turn(1, 100.0) == 800


def test_a_late_mark_shifts_what_follows() -> None:
    p = PlayoutTracker()
    p.sent(0.0, 1, 800, 800, "a1")
    p.sent(0.0, 1, 800, 1600, "a2")
    p.mark_echoed(140.0, "a1")  # played 40 ms later than modelled
    assert p.heard_in_turn(1, 150.0) == 800 + 80
    assert p.busy_until_ms() == 240.0


def test_clear_drops_the_queue_and_marks_after_it_are_unknown() -> None:
    p = PlayoutTracker()
    p.sent(0.0, 1, 8000, 8000, "a1")  # a second of audio
    heard = p.heard_in_turn(1, 250.0)
    assert heard == 2000
    dropped = p.clear(250.0)
    assert [c.mark for c in dropped] == ["a1"]
    assert not p.has_pending()
    assert p.mark_echoed(251.0, "a1") is None  # echoed by the clear, never played
    assert p.played_samples == 0
    nxt = p.sent(300.0, 2, 160, 160, "a2")
    assert nxt.start_ms == 300.0


def test_marks_echoed_out_of_order_confirm_everything_before() -> None:
    p = PlayoutTracker()
    for i in range(3):
        p.sent(0.0, 1, 160, 160 * (i + 1), f"a{i + 1}")
    p.mark_echoed(60.0, "a3")
    assert p.played_samples == 480
    assert p.mark_echoed(61.0, "a1") is None
    assert p.heard_in_turn(1, 70.0) == 480


def test_turns_are_kept_apart() -> None:
    p = PlayoutTracker()
    p.sent(0.0, 1, 800, 800, p.next_mark())
    p.sent(0.0, 2, 800, 800, p.next_mark())
    assert p.heard_in_turn(2, 150.0) == 400
    assert p.heard_in_turn(1, 150.0) == 800


def test_the_first_echo_anchors_a_stretch_and_carrier_tick_jitter_does_not_move_it() -> None:
    p = PlayoutTracker()
    for i in range(4):  # 4 x 100 ms sent at once: one stretch played back to back
        p.sent(0.0, 1, 800, 800 * (i + 1), f"a{i + 1}", audio=b"\xff" * 800)
    p.mark_echoed(130.0, "a1")  # the stretch really started 30 ms later than sent
    assert [c.start_ms for c in p.just_played] == [30.0]
    p.mark_echoed(245.0, "a2")  # 15 ms late: the carrier echoes on its 20 ms frame clock
    assert [c.start_ms for c in p.just_played] == [130.0]
    p.mark_echoed(390.0, "a3")  # 60 ms late: a real underrun, what follows moves
    assert [c.start_ms for c in p.just_played] == [230.0]
    assert p.pending()[0].start_ms == 390.0


def test_a_new_stretch_starts_when_the_queue_ran_dry() -> None:
    p = PlayoutTracker()
    first = p.sent(0.0, 1, 160, 160, "a1")
    second = p.sent(500.0, 2, 160, 160, "a2")  # sent after the first had played out
    assert second.stretch == first.stretch + 1
    p.mark_echoed(45.0, "a1")
    p.mark_echoed(540.0, "a2")  # anchored on its own echo, not on the first stretch
    assert p.just_played[0].start_ms == 520.0


def test_one_mark_confirms_the_unmarked_chunks_before_it() -> None:
    p = PlayoutTracker()
    p.sent(0.0, 1, 160, 160, None)
    p.sent(0.0, 1, 160, 320, None)
    assert p.attach_mark("a1")
    assert not p.attach_mark("a2")  # the last chunk already has a mark
    p.mark_echoed(40.0, "a1")
    assert p.played_samples == 320 and not p.has_pending()
    assert [c.start_ms for c in p.just_played] == [0.0, 20.0]
