"""What of a caller's personal data may leave the call records: keypad digits, transcript text
and phone numbers, as shown in logs, call events and traces.

Keypad digits are PINs and card numbers: by default a log line, an event and a span say a key
was pressed, not which (`LOG_DTMF=true` keeps them). Transcript text belongs to the call
records, not to logs: a log line says how long a turn was (`LOG_TRANSCRIPTS=true` keeps the
text). Numbers in log lines keep their last four digits. The model itself always gets the
real digits: masking is about what is kept, not what the agent may know.
"""

from __future__ import annotations

__all__ = ["DTMF_MASK", "keypad", "mask_number", "transcript_fields"]

DTMF_MASK = "•"


def keypad(digit: str, keep: bool) -> str:
    """The digit as logs, events and traces show it."""
    return digit if keep else DTMF_MASK


def transcript_fields(text: str, keep: bool) -> dict[str, object]:
    """Log fields for a piece of transcript: the text itself, or only its length."""
    return {"text": text} if keep else {"chars": len(text)}


def mask_number(number: str | None) -> str:
    """`+15557654321` -> `+*******4321`: enough to tell calls apart, not to dial."""
    if not number:
        return ""
    digits = [i for i, c in enumerate(number) if c.isdigit()]
    hidden = set(digits[:-4])
    return "".join("*" if i in hidden else c for i, c in enumerate(number))[:32]
