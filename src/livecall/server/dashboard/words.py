"""The owner's words for what the records say: how a call went and why it ended, and times on
the business's clock. Pure functions, used by the templates."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

__all__ = [
    "OUTCOME_WORDS",
    "dial_number",
    "end_reason_words",
    "fmt_day",
    "fmt_when",
    "local_midnight",
    "outcome_words",
]

# outcome -> (label, badge tone)
OUTCOME_WORDS = {
    "answered": ("Answered", "ok"),
    "abandoned": ("Abandoned", "warn"),
    "failed": ("Failed", "bad"),
    "in_progress": ("In progress", "live"),
}

_END_REASONS = {
    "caller_stop": "The caller hung up",
    "caller_hangup": "The caller hung up",
    "caller_closed": "The line dropped",
    "agent_hangup": "The agent ended the call",
    "hangup": "The agent ended the call",
    "transferred": "Passed on to a person",
    "gemini_failed": "The agent could not be reached; the caller heard an apology",
    "gemini_failed_transferred": "The agent could not be reached; passed on to a person",
    "max_duration": "The call reached its time limit",
    "operator_hangup": "Ended from the dashboard",
    "api": "Ended through the API",
    "admin": "Ended by an administrator",
    "shutdown": "The service restarted during the call",
    "replaced_by_new_stream": "The call was reconnected",
    "busy": "Every line was busy",
}


def end_reason_words(reason: str | None, outcome: str | None = None) -> str:
    """Why a call ended, as the owner would say it."""
    if outcome == "abandoned":
        return "The caller hung up during the greeting"
    if not reason:
        return "Still going" if outcome == "in_progress" else "Not recorded"
    return _END_REASONS.get(reason, reason.replace("_", " ").capitalize())


def outcome_words(outcome: str) -> tuple[str, str]:
    return OUTCOME_WORDS.get(outcome, (outcome.replace("_", " ").capitalize(), "none"))


def fmt_when(value: datetime | None, zone: ZoneInfo, *, seconds: bool = False) -> str:
    """'Mon 2 Mar 2026, 21:05' on the business's clock."""
    if value is None:
        return "–"
    local = value.astimezone(zone)
    text = f"{local:%a} {local.day} {local:%b %Y, %H:%M}"
    return text + f":{local:%S}" if seconds else text


def fmt_day(day: date) -> str:
    return f"{day:%a} {day.day} {day:%b}"


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    """The UTC instant the business's `day` starts."""
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


def local_today(zone: ZoneInfo, now: datetime | None = None) -> date:
    return (now or datetime.now(UTC)).astimezone(zone).date()


def dial_number(number: str | None) -> str | None:
    """A number a phone can dial from a `tel:` link (+ and digits), or None (softphone, blank)."""
    if not number:
        return None
    digits = "".join(ch for ch in number if ch.isdigit())
    if len(digits) < 3:
        return None
    return ("+" if number.strip().startswith("+") else "") + digits
