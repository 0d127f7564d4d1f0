"""Outbound calls on Telnyx, Plivo, Vonage and Exotel, as plain logic: the answer URL the
carrier fetches (Exotel's stream URL), what a carrier lacks before it may dial, and the
concurrency cap following a Plivo call from its request id to the CallUUID it is answered
as."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from livecall.server.outbound_carriers import answer_url, dialer_problem, exotel_stream_url
from livecall.server.outbound_limits import OutboundLimits
from livecall.settings import Settings


def test_answer_url_is_the_carriers_webhook_with_token_and_profile() -> None:
    url = urlsplit(answer_url("https://calls.example.com/", "/plivo/answer", "v1.9.ab.cd", "a b"))

    assert (url.scheme, url.netloc, url.path) == ("https", "calls.example.com", "/plivo/answer")
    assert parse_qs(url.query) == {"outbound": ["v1.9.ab.cd"], "profile": ["a b"]}


def test_exotels_stream_url_carries_the_token_in_its_three_parameters() -> None:
    token = "v1.1767225600." + "ab" * 16 + "." + "cd" * 16
    url = urlsplit(exotel_stream_url("https://calls.example.in/", token, "outreach"))

    assert (url.scheme, url.netloc, url.path) == ("wss", "calls.example.in", "/ws/exotel")
    assert parse_qs(url.query) == {
        "sample-rate": ["16000"],  # EXOTEL_SAMPLE_RATE's default
        "profile": ["outreach"],
        "direction": ["outbound-api"],
        "lc_token": [token],
    }
    for rate in (8000, 24000):
        at = exotel_stream_url("https://calls.example.in/", token, "outreach", sample_rate=rate)
        assert parse_qs(urlsplit(at).query)["sample-rate"] == [str(rate)]
    with pytest.raises(ValueError, match="256"):  # Exotel's limit on custom parameters
        exotel_stream_url("https://calls.example.in", token, "p" * 200)


def test_a_carrier_dials_only_with_its_webhook_and_rest_credentials() -> None:
    bare = Settings(_env_file=None)  # type: ignore[call-arg]
    telnyx = dialer_problem(bare, "telnyx")
    assert telnyx is not None
    for name in ("TELNYX_PUBLIC_KEY", "TELNYX_API_KEY", "TELNYX_ACCOUNT_SID"):
        assert name in telnyx
    assert "TELNYX_APPLICATION_SID" in telnyx
    assert dialer_problem(bare, "plivo") == (
        "outbound calls on plivo need PLIVO_AUTH_TOKEN, PLIVO_AUTH_ID"
    )
    assert dialer_problem(bare, "vonage") == (
        "outbound calls on vonage need VONAGE_SIGNATURE_SECRET, VONAGE_APPLICATION_ID, "
        "VONAGE_PRIVATE_KEY"
    )
    assert dialer_problem(bare, "exotel") == (
        "outbound calls on exotel need EXOTEL_URL_SECRET, EXOTEL_ACCOUNT_SID, EXOTEL_API_KEY, "
        "EXOTEL_API_TOKEN"
    )
    assert "no outbound calls on 'bandwidth'" in (dialer_problem(bare, "bandwidth") or "")
    ready = bare.model_copy(
        update={"plivo_auth_token": SecretStr("token"), "plivo_auth_id": "MA0123456789"}
    )
    assert dialer_problem(ready, "plivo") is None


def test_a_plivo_call_counts_under_the_call_id_it_is_answered_as() -> None:
    limits = OutboundLimits(10, 100, 1, ring_s=90.0)
    assert limits.admit(0.0, set()) is None
    limits.placed("request-uuid", 0.0, ref="ref1")

    limits.answered("ref1", "call-uuid")

    # live under its CallUUID: still counted after the ring window
    assert limits.in_progress(200.0, {"call-uuid"}) == 1
    assert limits.admit(200.0, {"call-uuid"}) is not None
    # once its stream is gone the slot is free
    assert limits.in_progress(300.0, set()) == 0
    limits.answered("ref1", "again")  # a second answer of the same ref changes nothing
    assert limits.in_progress(300.0, {"again"}) == 0
