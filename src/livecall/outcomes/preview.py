"""The webhook a stored call would produce, for the demo (and anyone curious): built with the
same code the delivery worker uses, printed as an excerpt."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from rich.console import Console

from livecall.outcomes.webhook_payload import encode_payload, new_delivery_id, request_headers
from livecall.outcomes.webhooks import webhook_for_stored_call
from livecall.settings import Settings
from livecall.store.repository import Repository

__all__ = ["print_webhook", "stored_call_webhook"]

SHOWN = 3  # turns and events printed in full; the rest are counted


async def stored_call_webhook(
    repo: Repository,
    settings: Settings,
    call_sid: str,
    analysis: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The payload for a call in the records (None when there is no such call)."""
    call = await repo.get_call(call_sid)
    if call is None:
        return None
    return webhook_for_stored_call(call, settings, delivery_id=new_delivery_id(), analysis=analysis)


def excerpt(payload: dict[str, Any], shown: int = SHOWN) -> dict[str, Any]:
    """The payload with its long lists cut to `shown` items and a count of the rest."""
    out = dict(payload)
    for key in ("turns", "events"):
        items = list(payload.get(key) or [])
        if len(items) > shown:
            out[key] = [*items[:shown], f"… {len(items) - shown} more"]
    latency = dict(payload.get("latency") or {})
    if len(latency.get("turns") or []) > shown:
        latency["turns"] = [*latency["turns"][:shown], f"… {len(latency['turns']) - shown} more"]
        out["latency"] = latency
    return out


def print_webhook(console: Console, payload: dict[str, Any], secret: str) -> None:
    """Headers and an excerpt of the body, as the receiver would get them."""
    body = encode_payload(payload)
    headers = request_headers(secret, body, payload["delivery_id"])
    for name, value in headers.items():
        console.print(f"  [dim]{name}:[/dim] {value}")
    console.print_json(orjson.dumps(excerpt(payload)).decode(), indent=2)
