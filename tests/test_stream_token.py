"""Per-call stream tokens (pure logic): bound to CallSid, AccountSid, expiry and purpose."""

from __future__ import annotations

import pytest

from livecall.store.claims import LocalClaims
from livecall.telephony.stream_token import (
    CALL_SID_RE,
    StreamTokens,
    derive_key,
    outbound_claim_kind,
    outbound_claim_ttl,
)

CALL = "CA" + "a" * 32
OTHER_CALL = "CA" + "b" * 32
ACCOUNT = "AC" + "1" * 32
T0 = 1_800_000_000.0


@pytest.fixture
def tokens() -> StreamTokens:
    return StreamTokens(derive_key("auth-token", "twilio-stream"), ttl_s=300)


def test_a_call_token_opens_its_own_call_only(tokens: StreamTokens) -> None:
    token = tokens.for_call(CALL, ACCOUNT, T0)
    assert tokens.check(token, CALL, ACCOUNT, T0 + 1)
    wrong_call = tokens.check(token, OTHER_CALL, ACCOUNT, T0 + 1)
    assert not wrong_call and "does not match" in wrong_call.reason
    assert not tokens.check(token, CALL, "AC" + "2" * 32, T0 + 1)


def test_expiry_bounds_the_first_start_but_not_a_live_calls_reconnect(
    tokens: StreamTokens,
) -> None:
    token = tokens.for_call(CALL, ACCOUNT, T0)
    assert tokens.check(token, CALL, ACCOUNT, T0 + 300)
    late = tokens.check(token, CALL, ACCOUNT, T0 + 301)
    assert not late and late.reason == "stream token expired"
    assert tokens.check(token, CALL, ACCOUNT, T0 + 3600, live=True)
    assert not tokens.check(token, OTHER_CALL, ACCOUNT, T0 + 1, live=True)


def test_a_token_under_another_key_or_purpose_is_refused(tokens: StreamTokens) -> None:
    other_secret = StreamTokens(derive_key("another-token", "twilio-stream"))
    other_purpose = StreamTokens(derive_key("auth-token", "softphone"))
    for minter in (other_secret, other_purpose):
        assert not tokens.check(minter.for_call(CALL, ACCOUNT, T0), CALL, ACCOUNT, T0)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "no stream token"),
        ("", "no stream token"),
        ("x" * 500, "stream token too long"),
        ("v1.123", "malformed stream token"),
        ("v2.1.-.abc", "malformed stream token"),
        ("v1.12e4.-.abc", "malformed stream token expiry"),
        ("v1.１２.-.abc", "malformed stream token expiry"),
        ("v1.99999999999.zz.abc", "malformed stream token reference"),
        ("v1.99999999999.-.ünicode", "stream token does not match this call and account"),
    ],
)
def test_malformed_tokens_are_refused_with_a_reason(
    tokens: StreamTokens, token: str | None, reason: str
) -> None:
    check = tokens.check(token, CALL, ACCOUNT, T0)
    assert not check
    assert check.reason == reason


def test_tampering_with_any_part_breaks_the_token(tokens: StreamTokens) -> None:
    token = tokens.for_call(CALL, ACCOUNT, T0)
    version, expiry, ref, mac = token.split(".")
    for forged in (
        f"{version}.{int(expiry) + 3600}.{ref}.{mac}",  # a longer life
        f"{version}.{expiry}.{'0' * 32}.{mac}",  # turned into an outbound token
        f"{version}.{expiry}.{ref}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",
    ):
        assert not tokens.check(forged, CALL, ACCOUNT, T0)


def test_outbound_tokens_are_claimed_by_their_first_call(tokens: StreamTokens) -> None:
    token = tokens.for_outbound(ACCOUNT, T0)
    first = tokens.check(token, CALL, ACCOUNT, T0 + 5)
    assert first and first.ref is not None
    assert tokens.check(token, OTHER_CALL, ACCOUNT, T0 + 5).ref == first.ref  # MAC is fine…
    claims, kind = LocalClaims(max_entries=2), outbound_claim_kind("twilio")
    until = T0 + outbound_claim_ttl(tokens, 3600)
    assert claims.claim(kind, first.ref, CALL, until, T0 + 5)
    assert claims.claim(kind, first.ref, CALL, until, T0 + 9)  # …the same call (a reconnect)
    assert not claims.claim(kind, first.ref, OTHER_CALL, until, T0 + 9)  # …another CallSid not
    assert not tokens.check(token, CALL, "AC" + "2" * 32, T0 + 5)
    assert not tokens.check(token, CALL, ACCOUNT, T0 + 301)
    claims.claim(kind, "1" * 32, CALL, until, T0 + 10)
    claims.claim(kind, "2" * 32, CALL, until, T0 + 10)
    assert len(claims) == 2  # bounded


def test_keys_and_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        derive_key("", "x")
    with pytest.raises(ValueError, match="16 bytes"):
        StreamTokens(b"short")
    with pytest.raises(ValueError, match="positive"):
        StreamTokens(derive_key("s", "p"), ttl_s=0)
    tokens = StreamTokens(derive_key("secret", "p"))
    assert "secret" not in repr(tokens) and "redacted" in repr(tokens)
    with pytest.raises(ValueError, match="CallSid"):
        tokens.for_call("", ACCOUNT, T0)


@pytest.mark.parametrize(
    ("sid", "ok"),
    [
        ("CA" + "0123456789abcdef" * 2, True),
        ("CA123", False),
        ("CA" + "A" * 32, False),  # Twilio SIDs are lower-case hex
        ("CA" + "a" * 32 + "\n", False),
        ("MZ" + "a" * 32, False),
    ],
)
def test_call_sid_shape(sid: str, ok: bool) -> None:
    assert bool(CALL_SID_RE.match(sid)) is ok
