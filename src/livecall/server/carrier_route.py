"""One carrier's HTTP side as data (`CarrierRoute`: where its webhook lands, how to read it,
how to answer, how it says busy, its status webhook, its call control) and the pure helpers
every carrier's route shares: the form and query readers, per-carrier stream tokens, the
parameters packed for a carrier that carries only letters and digits. `carrier_setup` says
which carriers are configured; `carrier_routes` serves them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import structlog
from pydantic import SecretStr

from livecall.carriers.base import (
    CallStarted,
    Carrier,
    CarrierStream,
)
from livecall.telephony.stream_token import (
    TOKEN_PARAMETER,
    StreamTokens,
    derive_key,
)

if TYPE_CHECKING:
    from livecall.server.state import AppState
    from livecall.store.claims import ClaimStore
    from livecall.telephony.call_control import CallControl

__all__ = [
    "BUSY_PARAMETER",
    "CALL_MEMORY_S",
    "EXOTEL_TRANSFER_REFUSAL",
    "STREAM_PARAMETERS",
    "TRANSFER_DOCUMENT_TTL_S",
    "UPGRADE_CLOCK_SKEW_S",
    "AnswerBuilder",
    "CallMemory",
    "CarrierRoute",
    "ControlFactory",
    "ControlSite",
    "SingleUse",
    "StatusReader",
    "WarmDocuments",
    "WebhookCall",
    "WebhookReader",
    "e164",
    "pack_alnum",
    "read_exotel",
    "read_form",
    "secret_value",
    "stream_tokens_for",
    "unpack_alnum",
]

log = structlog.get_logger("livecall.carriers")


TRANSFER_DOCUMENT_TTL_S = 120.0  # the carrier fetches it right after the REST transfer
UPGRADE_CLOCK_SKEW_S = 30.0  # how far a carrier's clock may trail ours (an upgrade's issue time)
CALL_MEMORY_S = 600.0  # what a webhook said about a call is kept this long past its longest
# what the model is told when it tries to transfer an Exotel call (the Voicebot applet's
# stream cannot be moved; the flow's next applet could dial, but only after a hang-up)
EXOTEL_TRANSFER_REFUSAL = (
    "transfers are not possible on this line (the phone system cannot move this call)"
)
BUSY_PARAMETER = "busy"  # in a stream URL answered to a call turned away (no busy document)
STREAM_PARAMETERS = frozenset(("from", "to", "direction", "profile", TOKEN_PARAMETER))


@dataclass(frozen=True, slots=True)
class WebhookCall:
    """What a voice webhook says about the call, whatever the carrier's format."""

    call_id: str  # the id the stream's start repeats (the stream token is bound to it)
    from_number: str = ""
    to_number: str = ""
    direction: str = "inbound"
    native: Any = None  # the carrier's own reading, for its `answer` hook


# (method, url, body) -> the call; ValueError when the request names no call
WebhookReader = Callable[[str, str, bytes], WebhookCall]
# (public https base, parameters, call) -> (answer body, content type)
AnswerBuilder = Callable[[str, Mapping[str, str], WebhookCall], tuple[str, str]]
# headers of a signed request -> (its single-use id, seconds it stays used), or None
SingleUse = Callable[[Mapping[str, str]], "tuple[str, float] | None"]
# (method, url, body) -> (call id, status) of a status webhook; ValueError when unreadable
StatusReader = Callable[[str, str, bytes], tuple[str, str]]


@dataclass(frozen=True)
class ControlSite:
    """What a carrier's call control may need for one call."""

    state: AppState
    start: CallStarted
    public_base: str  # https://host as the carrier reaches livecall
    # keep a document (XML the carrier fetches) behind a single-use URL of this carrier's;
    # None unless the route serves documents
    publish: Callable[[str], Awaitable[str]] | None = None


ControlFactory = Callable[[ControlSite], "CallControl | None"]


class CallMemory(Protocol):
    """What a carrier's webhook learned about a call, shared across workers and instances."""

    async def share(self, claims: ClaimStore, call_id: str) -> None:
        """After the voice webhook's answer: what it learned, into the shared store."""
        ...

    async def recall(self, claims: ClaimStore, call_id: str) -> None:
        """Before the call runs: what another worker's webhook learned, if this one lacks it."""
        ...


@dataclass(frozen=True)
class WarmDocuments:
    """A carrier's side of a warm transfer: the whisper document its answered leg fetches
    (`/<carrier>/whisper/<token>`) and the caller's document once the dial ended
    (`/<carrier>/transfer-ended`), each signed by the carrier like its webhooks."""

    whisper: Callable[[str, str | None], str]  # (briefing, language) -> the document
    # (dial status, no-answer line) -> the caller's document; None: nothing (204)
    after_dial: Callable[[str, str | None], str | None]
    status_field: str  # the dial-ended request's field holding how the dial ended
    parent_field: str | None = None  # the whisper fetch's field naming the caller's call
    whisper_methods: tuple[str, ...] = ("POST",)
    content_type: str = "application/xml"


@dataclass(frozen=True)
class CarrierRoute:
    """One carrier's HTTP side: where its webhook lands, how it names things, how it says busy."""

    carrier: Carrier
    webhook_path: str
    call_id_field: str  # the webhook form field holding the id the stream's start repeats
    # (message, reject) -> the answer body; None: the carrier has no busy document, so the
    # answer is a stream that is closed at its start (the carrier's flow then moves on)
    busy: Callable[[str | None, bool], str] | None
    content_type: str = "application/xml"
    control: ControlFactory | None = None  # REST call control (hangup/transfer), when set up
    documents: bool = False  # serves transfer documents the carrier fetches (see module doc)
    warm: WarmDocuments | None = None  # serves warm transfers' whispers and dial ends
    alnum_parameters: bool = False  # the carrier carries only [A-Za-z0-9] names and values
    methods: tuple[str, ...] = ("POST",)  # what the voice webhook accepts (HEAD: auth only)
    read_webhook: WebhookReader | None = None  # None: a POSTed form (`call_id_field`, From…)
    answer: AnswerBuilder | None = None  # None: `carrier.answer_document(ws url, parameters)`
    status_path: str | None = None  # the carrier's status (event) webhook, if it has one
    read_status: StatusReader | None = None
    # a signed request's single-use id and how long it must stay used (Vonage's `jti`,
    # Plivo's nonce, Telnyx's signature), read after its signature checked out; claimed in the
    # store every worker and instance shares, so a replay to another worker is refused too
    single_use: SingleUse | None = None
    # what the voice webhook learned about a call that its control needs later (Vonage's
    # region), shared with the worker its stream reaches
    memory: CallMemory | None = field(default=None, compare=False)
    status_methods: tuple[str, ...] = ("POST",)
    # the per-call parameters ride the stream URL's query string (Exotel): read them from the
    # upgrade request (the start's custom parameters, which echo them, when it has none)
    parameters_in_url: bool = False
    # an outbound call streams straight to the URL it was dialled with (Exotel's Connect Voice
    # AI): the stream, not a webhook, claims the outbound token that URL carries
    outbound_streams: bool = False
    # the WebSocket upgrade's own credential, checked before the socket is accepted (Vonage's
    # signed handshake): its headers -> when the credential was issued (unix s); ValueError
    # (reason) refuses the upgrade. A credential issued before the call's stream token was
    # minted belongs to another call and closes the stream at its start.
    verify_upgrade: Callable[[Mapping[str, str]], float] | None = field(default=None, compare=False)
    # told each stream's start once its token is checked, before the call runs (Exotel: warns
    # when the start's rate is not the one its stream URL asked for)
    on_start: Callable[[CarrierStream, CallStarted], None] | None = field(
        default=None, compare=False
    )
    # closes the REST clients behind `control` (at shutdown, once the calls are over)
    aclose: Callable[[], Awaitable[None]] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.carrier.name

    @property
    def stream_path(self) -> str:
        return f"/ws/{self.carrier.name}"


def stream_tokens_for(secret: bytes, carrier: str) -> StreamTokens:
    """A carrier's stream tokens: its own key, so one carrier's token opens no other's stream."""
    return StreamTokens(derive_key(secret, f"{carrier}-stream"))


def pack_alnum(parameters: Mapping[str, str]) -> dict[str, str]:
    """Per-call parameters for a carrier that carries only letters and digits (Plivo's
    `extraHeaders`): names lose their other characters, values travel as hex of UTF-8."""
    return {
        "".join(c for c in name if c.isascii() and c.isalnum()): value.encode().hex()
        for name, value in parameters.items()
    }


def unpack_alnum(parameters: Mapping[str, str]) -> dict[str, str]:
    """`pack_alnum` undone (ValueError for a value that is not its hex)."""
    names = {"".join(c for c in n if c.isalnum()): n for n in (TOKEN_PARAMETER,)}
    return {
        names.get(name, name): bytes.fromhex(value).decode() for name, value in parameters.items()
    }


def read_form(call_id_field: str) -> WebhookReader:
    """The default webhook reader: a urlencoded form naming the call in `call_id_field`."""

    def read(method: str, url: str, body: bytes) -> WebhookCall:
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        return WebhookCall(
            call_id=params.get(call_id_field, ""),
            from_number=params.get("From", ""),
            to_number=params.get("To", ""),
            direction=params.get("Direction", "inbound") or "inbound",
        )

    return read


def read_exotel(method: str, url: str, body: bytes) -> WebhookCall:
    """Exotel's dynamic-URL GET: `CallSid`, `CallFrom`/`CallTo` (or `From`/`To`) and a
    `Direction` of `incoming`, `outbound-dial` or `outbound-api` in the query string."""
    query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    direction = query.get("Direction", "")
    return WebhookCall(
        query.get("CallSid", ""),
        query.get("CallFrom") or query.get("From", ""),
        query.get("CallTo") or query.get("To", ""),
        "outbound" if direction.startswith("outbound") else "inbound",
    )


def e164(number: str) -> str:
    """A number as E.164 (Plivo writes them as bare digits)."""
    return "+" + number if number.isascii() and number.isdigit() else number


def secret_value(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""
