"""What a call id may look like, wherever one is read (webhooks, the API, the dashboard).

Every carrier's id fits: Twilio `CA…` (34), Telnyx `v3:…` call control ids (about 60), Plivo
and Vonage UUIDs, Exotel's hex sids. The store keeps ids in 64-character columns, so a longer
id is refused at the webhook rather than lost at the database.
"""

from __future__ import annotations

import re

__all__ = ["CALL_ID_PATTERN", "MAX_CALL_ID", "is_call_id"]

MAX_CALL_ID = 64
CALL_ID_PATTERN = r"^[A-Za-z0-9_:.-]{1,64}$"
_CALL_ID = re.compile(CALL_ID_PATTERN)


def is_call_id(value: str) -> bool:
    return _CALL_ID.fullmatch(value) is not None
