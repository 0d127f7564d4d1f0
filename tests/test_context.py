"""CallContext: one call's wiring, typed (it replaced the untyped `CallOptions.extra`)."""

from __future__ import annotations

import pytest

from livecall.call.context import CallContext
from livecall.call.options import CallOptions


def test_each_call_has_its_own_context() -> None:
    a, b = CallOptions(), CallOptions()
    a.context.log_dtmf = True
    assert a.context is not b.context
    assert b.context == CallContext()


def test_options_carry_the_typed_fields() -> None:
    options = CallOptions(context=CallContext(log_transcripts=True, deferred_greeting="Hi"))
    assert options.context.log_transcripts is True
    assert options.context.deferred_greeting == "Hi"
    assert options.context.log_dtmf is False


def test_a_call_without_a_profile_says_so_instead_of_a_key_error() -> None:
    with pytest.raises(RuntimeError, match="no agent profile"):
        CallContext().profile()
