"""The end-of-call webhook contract without I/O: payload shape, signature, backoff, links."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from livecall.outcomes.webhook_payload import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    backoff_delay,
    derive_link_key,
    encode_payload,
    new_delivery_id,
    next_attempt,
    recording_link,
    request_headers,
    sample_payload,
    sign_body,
    verify_body,
    verify_link,
)

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
SECRET = "whsec-test-0123"

FIELDS = {
    "event", "version", "delivery_id", "call_sid", "carrier", "direction", "from", "to",
    "profile", "started_at", "answered_at", "ended_at", "duration_s", "end_reason", "status",
    "turns", "events", "latency", "usage", "analysis", "recording",
}  # fmt: skip


def test_payload_has_every_contract_field() -> None:
    payload = sample_payload("dlv_1", NOW)
    assert set(payload) == FIELDS
    assert payload["carrier"] == "twilio" and payload["event"] == "call.ended"
    assert payload["delivery_id"] == "dlv_1"
    assert payload["ended_at"] == "2026-12-01T12:00:00.000Z"
    assert payload["started_at"] == "2026-12-01T11:59:18.000Z"
    assert payload["analysis"] is None and payload["recording"] is None
    assert payload["latency"] == {
        "answer_ms": 850,
        "turns": [
            {"index": 0, "first_audio_latency_ms": None, "barge_in_stop_ms": None},
            {"index": 2, "first_audio_latency_ms": 520.0, "barge_in_stop_ms": None},
        ],
    }
    turn = payload["turns"][1]
    assert set(turn) == {
        "index", "speaker", "text", "heard_text", "interrupted", "start_ms", "end_ms",
        "first_audio_latency_ms", "barge_in_stop_ms",
    }  # fmt: skip
    assert payload["usage"]["total_tokens"] == 976
    assert orjson.loads(encode_payload(payload)) == payload


def test_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = encode_payload(sample_payload("dlv_2", NOW))
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert sign_body(SECRET, body) == f"sha256={expected}"
    assert verify_body(SECRET, body, f"sha256={expected}")
    assert not verify_body(SECRET, body + b" ", f"sha256={expected}")
    assert not verify_body("other", body, f"sha256={expected}")
    assert not verify_body(SECRET, body, None)
    headers = request_headers(SECRET, body, "dlv_2")
    assert headers[SIGNATURE_HEADER] == f"sha256={expected}"
    assert headers[DELIVERY_HEADER] == "dlv_2"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("livecall-webhooks/")


def test_delivery_ids_are_unique_and_opaque() -> None:
    ids = {new_delivery_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(i.startswith("dlv_") and len(i) == 36 for i in ids)


def test_backoff_doubles_from_about_a_second_with_jitter_and_a_cap() -> None:
    mid = [backoff_delay(n, 1.0, 3600.0, lambda: 0.5) for n in range(1, 16)]
    assert mid[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert mid[-1] == 3600.0 and max(mid) == 3600.0
    assert backoff_delay(1, 1.0, 3600.0, lambda: 0.0) == 0.75
    assert backoff_delay(1, 1.0, 3600.0, lambda: 1.0) == 1.25
    assert backoff_delay(20, 1.0, 3600.0, lambda: 1.0) == 3600.0  # jitter never exceeds the cap
    assert backoff_delay(10_000, 1.0, 60.0, lambda: 0.5) == 60.0  # no overflow


def test_retries_span_a_day_then_give_up() -> None:
    give_up = NOW + timedelta(hours=24)
    at, attempt = NOW, 0
    while True:
        attempt += 1
        nxt = next_attempt(attempt, at, give_up, 1.0, 3600.0, lambda: 0.5)
        if nxt is None:
            break
        at = nxt
    assert give_up - timedelta(hours=1) <= at <= give_up
    assert 25 <= attempt <= 40  # about 12 doublings, then hourly


def test_recording_links_expire_and_cannot_be_forged() -> None:
    key = derive_link_key("server-secret")
    assert key != derive_link_key("another-secret") and b"server-secret" not in key
    link = recording_link(key, "https://calls.example.com/", "CA1", NOW, 3600)
    assert link["url"].startswith("https://calls.example.com/recordings/CA1?exp=")
    assert link["expires_at"] == "2026-12-01T13:00:00.000Z"
    query = dict(p.split("=") for p in link["url"].split("?", 1)[1].split("&"))
    exp, sig = query["exp"], query["sig"]
    assert verify_link(key, "CA1", exp, sig, NOW) == "ok"
    assert verify_link(key, "CA1", exp, sig, NOW + timedelta(seconds=3601)) == "expired"
    assert verify_link(key, "CA2", exp, sig, NOW) == "bad"  # another call
    assert verify_link(key, "CA1", str(int(exp) + 86400), sig, NOW) == "bad"  # extended
    assert verify_link(derive_link_key("x"), "CA1", exp, sig, NOW) == "bad"
    for bad_exp, bad_sig in ((None, sig), (exp, None), ("-1", sig), ("1e9", sig), (exp, "00")):
        assert verify_link(key, "CA1", bad_exp, bad_sig, NOW) == "bad"


@pytest.mark.parametrize("attempt", [0, -3])
def test_backoff_for_odd_attempt_numbers_is_the_first_delay(attempt: int) -> None:
    assert backoff_delay(attempt, 1.0, 10.0, lambda: 0.5) == 1.0


def test_delivery_urls_are_shown_without_path_or_query() -> None:
    from livecall.outcomes.webhooks import redact_url

    assert redact_url("https://hooks.slack.com/services/T0/B0/XXXX") == "https://hooks.slack.com/…"
    assert redact_url("http://127.0.0.1:8080/h?token=abc") == "http://127.0.0.1:8080/…"
    assert redact_url("https://crm.example.com") == "https://crm.example.com"
