"""CallContext: one call's wiring, typed (it replaced the untyped `CallOptions.extra`)."""

from __future__ import annotations

import pytest

from livecall.call.bridge import CallOptions
from livecall.call.context import CallContext


def test_each_call_has_its_own_context() -> None:
    a, b = CallOptions(), CallOptions()
    a.context.log_dtmf = True
    assert a.context is not b.context
    assert b.context == CallContext()


def test_extra_is_a_read_only_view_of_the_typed_fields() -> None:
    options = CallOptions(context=CallContext(log_transcripts=True, deferred_greeting="Hi"))
    assert options.extra.get("log_transcripts") is True
    assert options.extra["deferred_greeting"] == "Hi"
    assert options.extra.get("log_dtmf", True) is False
    with pytest.raises(TypeError):
        options.extra["log_dtmf"] = True  # type: ignore[index]  # the point: it is read-only


def test_a_call_without_a_profile_says_so_instead_of_a_key_error() -> None:
    with pytest.raises(RuntimeError, match="no agent profile"):
        CallContext().profile()
