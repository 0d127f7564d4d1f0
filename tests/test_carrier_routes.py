"""The generic carrier routes' pure parts: which carriers are on, tokens, Plivo's parameters."""

from __future__ import annotations

import time

import pytest
from pydantic import SecretStr

from livecall.carriers.plivo.answer import extra_headers
from livecall.server.carrier_route import pack_alnum, stream_tokens_for, unpack_alnum
from livecall.server.carrier_setup import configured_routes
from livecall.settings import Settings
from livecall.sim.telnyx import generate_keypair
from livecall.telephony.stream_token import TOKEN_PARAMETER


def test_a_carrier_is_on_only_when_its_credentials_are_set() -> None:
    assert configured_routes(Settings()) == []
    assert configured_routes(Settings(plivo_auth_token=SecretStr(""))) == []
    _, public = generate_keypair()
    plivo, exotel = "plivo-auth-token-0123", "exotel-url-secret-0123456789"
    routes = configured_routes(
        Settings(
            telnyx_public_key=SecretStr(public),
            plivo_auth_token=SecretStr(plivo),
            exotel_url_secret=SecretStr(exotel),
        )
    )
    assert [(r.name, r.webhook_path, r.stream_path) for r in routes] == [
        ("telnyx", "/telnyx/texml", "/ws/telnyx"),
        ("plivo", "/plivo/answer", "/ws/plivo"),
        ("exotel", "/exotel/voicebot", "/ws/exotel"),
    ]
    assert plivo not in repr(routes) and exotel not in repr(routes)  # no credential in a repr


def test_one_carriers_token_opens_no_other_carriers_stream() -> None:
    secret = b"s" * 32
    now = time.time()
    token = stream_tokens_for(secret, "telnyx").for_call("v3:abc", "", now)
    assert stream_tokens_for(secret, "telnyx").check(token, "v3:abc", "", now)
    assert not stream_tokens_for(secret, "plivo").check(token, "v3:abc", "", now)
    assert not stream_tokens_for(secret, "telnyx").check(token, "v3:other", "", now)


def test_plivo_parameters_survive_extra_headers_letters_and_digits_only() -> None:
    params = {"from": "+15550001111", "profile": "front-desk", TOKEN_PARAMETER: "v1.9.-.a_b-c"}
    packed = pack_alnum(params)
    extra_headers(packed)  # Plivo's own rules accept it (raises otherwise)
    assert unpack_alnum(packed) == params
    with pytest.raises(ValueError):
        unpack_alnum({"profile": "zz"})  # not hex: the stream is refused
