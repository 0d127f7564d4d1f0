"""The simulated edges are built from parts: each carrier has exactly the hooks it uses.

SimulatedEdge once had hooks that raised NotImplementedError for the carriers whose own
webhook or flush never called them; now a carrier without a form webhook has no form hooks at
all, and every simulator is concrete (no abstract hook left unimplemented).
"""

from __future__ import annotations

import pytest

from livecall.sim.edge import SimulatedEdge
from livecall.sim.edge_parts import FormAnswerEdge, FrameMediaEdge, JsonEnvelopeEdge, OneSocketEdge
from livecall.sim.exotel import SimulatedExotelCaller
from livecall.sim.plivo import PlivoSimulatedCaller
from livecall.sim.telnyx import TelnyxSimulatedCaller
from livecall.sim.twilio import SimulatedCaller
from livecall.sim.vonage import SimulatedVonageCaller

PARTS = (FormAnswerEdge, OneSocketEdge, FrameMediaEdge, JsonEnvelopeEdge)
CARRIERS: dict[type[SimulatedEdge], set[type[SimulatedEdge]]] = {
    SimulatedCaller: set(PARTS),
    TelnyxSimulatedCaller: set(PARTS),
    PlivoSimulatedCaller: set(PARTS),
    SimulatedVonageCaller: {OneSocketEdge, FrameMediaEdge},
    SimulatedExotelCaller: {JsonEnvelopeEdge},
}


@pytest.mark.parametrize("cls", list(CARRIERS), ids=lambda c: c.__name__)
def test_every_simulator_is_concrete_and_has_only_its_parts(cls: type[SimulatedEdge]) -> None:
    assert not cls.__abstractmethods__
    assert {part for part in PARTS if issubclass(cls, part)} == CARRIERS[cls]


@pytest.mark.parametrize("cls", [SimulatedVonageCaller, SimulatedExotelCaller])
def test_carriers_with_their_own_webhook_have_no_form_hooks(cls: type[SimulatedEdge]) -> None:
    for hook in ("_call_params", "_signature", "_read_document", "_post", "_read_xml"):
        assert not hasattr(cls, hook), hook
    assert not hasattr(cls, "_envelope") or cls is SimulatedExotelCaller
    assert not hasattr(cls, "_media_message") or cls is SimulatedVonageCaller
