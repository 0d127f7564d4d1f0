"""REST call control as the call core sees it, whatever the carrier: hang up, transfer.

The agent's `end_call` and `transfer_call` (`call/actions.py:BridgeActions`) and a profile's
`on_failure` transfer speak only `CallControl`. Each carrier maps it onto its own API:
Twilio's Calls resource (`telephony/twilio_rest.py`, which conforms as it is), Telnyx's TeXML
call update (`carriers/telnyx/control.py:TelnyxCallControl`), Plivo's call transfer to a URL
livecall serves (`carriers/plivo/control.py:PlivoCallControl`). A carrier whose stream's end is
the call's end and that cannot move a call elsewhere (Exotel's Voicebot applet) uses
`StreamEndControl`: hanging up is closing the stream (the bridge does that first anyway) and a
transfer is refused with a sentence the model can say.

A control that can also play keys into the call over REST (Vonage's `PUT …/dtmf`: its stream
cannot carry them) is a `DtmfControl` too; the agent's `send_dtmf` uses it where the stream has
no DTMF message of its own, before falling back to in-band tones.

Errors are `CallControlError` (each carrier's error derives from it or is wrapped into it), so
the core tells the model "that did not work" the same way for every carrier; a call that is
already over is not an error: `hangup`/`transfer` return False.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["CallControl", "CallControlError", "DtmfControl", "StreamEndControl"]


class CallControlError(RuntimeError):
    """The carrier refused a control request or could not be reached; the message says why
    (status, the carrier's own error text), never a credential."""


class CallControl(Protocol):
    """Hang up or move one live call through the carrier's REST API, by its call id.

    `warm_transfer`: the carrier plays a briefing to the person answering before it bridges
    (`whisper_url`, `dial_action`; only Twilio). `transfer_refusal`: why this line cannot
    transfer at all, said to the model instead of trying (None: it can).
    """

    warm_transfer: bool
    transfer_refusal: str | None

    def briefs(self, number: str) -> bool:
        """Whether a warm transfer to `number` plays the person answering a briefing (some
        targets, e.g. a SIP URI on Vonage, can only be connected cold)."""
        ...

    async def hangup(self, call_id: str) -> bool:
        """End the call; False when it had already ended."""
        ...

    async def transfer(
        self,
        call_id: str,
        number: str,
        say: str | None = None,
        *,
        whisper_url: str | None = None,
        dial_action: str | None = None,
    ) -> bool:
        """Say `say` to the caller (when given), then dial `number` (E.164 or ``sip:``) in
        place of the stream, which ends. False when the call had already ended."""
        ...


@runtime_checkable
class DtmfControl(Protocol):
    """A call control that sends DTMF into the call over the carrier's REST API."""

    async def send_dtmf(self, call_id: str, digits: str) -> bool:
        """Play `digits` to the far end; False when the call had already ended; a
        `CallControlError` for keys the carrier cannot send or a refusal."""
        ...


class StreamEndControl:
    """A line whose call ends with its media stream and cannot be moved over REST.

    `hangup` has nothing left to do (the bridge closes the stream before it asks) and
    `transfer` is refused up front with `transfer_refusal`.
    """

    warm_transfer = False

    def __init__(self, transfer_refusal: str) -> None:
        if not transfer_refusal:
            raise ValueError("say why this line cannot transfer: the model tells the caller")
        self.transfer_refusal: str | None = transfer_refusal

    def __repr__(self) -> str:
        return "StreamEndControl()"

    def briefs(self, number: str) -> bool:
        return False

    async def hangup(self, call_id: str) -> bool:
        return True  # closing the stream was the hang-up

    async def transfer(
        self,
        call_id: str,
        number: str,
        say: str | None = None,
        *,
        whisper_url: str | None = None,
        dial_action: str | None = None,
    ) -> bool:
        raise CallControlError(self.transfer_refusal or "this line cannot transfer calls")
