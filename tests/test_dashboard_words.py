"""The owner's words and clock (server/dashboard/words.py): pure functions."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from livecall.server.dashboard.words import (
    dial_number,
    end_reason_words,
    fmt_when,
    local_midnight,
    local_today,
    outcome_words,
)

NY = ZoneInfo("America/New_York")


def test_end_reasons_in_plain_words() -> None:
    assert end_reason_words("caller_stop") == "The caller hung up"
    assert end_reason_words("caller_closed") == "The line dropped"
    assert end_reason_words("operator_hangup") == "Ended from the dashboard"
    assert "apology" in end_reason_words("gemini_failed")
    assert end_reason_words("caller_stop", "abandoned") == "The caller hung up during the greeting"
    assert end_reason_words("something_new") == "Something new"  # unknown: still readable
    assert end_reason_words(None, "in_progress") == "Still going"
    assert outcome_words("abandoned") == ("Abandoned", "warn")


def test_times_on_the_business_clock() -> None:
    evening = datetime(2026, 3, 3, 2, 30, tzinfo=UTC)  # 21:30 the day before in New York
    assert fmt_when(evening, NY) == "Mon 2 Mar 2026, 21:30"
    assert fmt_when(evening, NY, seconds=True) == "Mon 2 Mar 2026, 21:30:00"
    assert fmt_when(None, NY) == "–"
    assert local_today(NY, evening) == date(2026, 3, 2)
    # the business's midnight in UTC, on both sides of the spring DST change
    assert local_midnight(date(2026, 3, 7), NY) == datetime(2026, 3, 7, 5, 0, tzinfo=UTC)
    assert local_midnight(date(2026, 3, 9), NY) == datetime(2026, 3, 9, 4, 0, tzinfo=UTC)


def test_numbers_a_phone_can_dial() -> None:
    assert dial_number("+1 (555) 010-2030") == "+15550102030"
    assert dial_number("020 7946 0000") == "02079460000"
    assert dial_number("softphone") is None and dial_number(None) is None
    assert dial_number("javascript:alert(1)") is None  # only + and digits reach a tel: link
