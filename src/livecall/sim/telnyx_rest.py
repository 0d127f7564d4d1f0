"""A fake of Telnyx's TeXML REST call update, close enough that the official SDK talks to it.

`POST /v2/texml/Accounts/{account_sid}/Calls/{call_sid}` as Telnyx serves it: Bearer API key
(anything else: 401, error 10009), a JSON or form body of the documented CamelCase fields
(others: 422, 10015), `Status=completed|canceled` ends the call, `Texml` replaces the running
document (a `<Dial>` moves the caller: its target is recorded), `Url` names a new document.
A call Telnyx does not know is 404 (10005), one already over 422 with error 90018 (what the
SDK-facing `TelnyxControl` reads as "already ended"); answers are the TeXML call resource.

A call is known once a test `attach`es its simulated caller (Telnyx knows its calls); a
hang-up or a transfer then ends that caller's stream with Telnyx's `stop`, as Telnyx does when
the call leaves `<Connect><Stream>`.

Outbound calls: `POST /v2/texml/Accounts/{account_sid}/Calls` with `ApplicationSid`, `To`,
`From` and `Url` (the fake knows no application's own XML URL, so `Url` is required; it
fetches with POST only) answers the call resource (`call_sid`, status `queued`); then, as
Telnyx does once the callee picks up, the fake fetches `Url` signed with the account's
Ed25519 key (`signing_key`) and runs the call: a `TelnyxSimulatedCaller` is the answered
party (`callee` holds its arguments: script, `on_script_end`…), its run in `answered[sid]`.

Warm transfers: a `Texml` whose `<Dial>` has a `<Number url>`/`<Sip url>` has its callee
pick up, as TeXML (TwiML's mirror) does: the fake fetches that URL (its `method`, POST by
default) about the new leg, signed with the account's Ed25519 key, naming the caller's call as
`ParentCallSid`, and keeps what the callee heard (`whispers`); a document holding a `<Dial>` is
refused, as TwiML refuses one on the called party's end. `end_dial` ends the dial with a
`DialCallStatus`, POSTs the `<Dial action>` signed and keeps the caller's next TeXML
(`dial_ends`).

`fail_status` makes every authorized request fail with that status (an outage), so a test
can see livecall's answer to a REST failure.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from livecall.carriers.telnyx.signatures import sign_webhook
from livecall.sim.edge import SimulatedEdge
from livecall.sim.twilio import CallResult
from livecall.sim.warm import WarmFetch, xml_reader

__all__ = [
    "FakeTelnyxState",
    "FakeTexmlCall",
    "TelnyxRequest",
    "build_fake_telnyx_rest",
]

API = "/v2/texml/Accounts/{account}/Calls/{sid}"
CREATE = "/v2/texml/Accounts/{account}/Calls"
CREATE_FIELDS = frozenset(
    {
        "ApplicationSid",
        "To",
        "From",
        "Url",
        "Method",
        "StatusCallback",
        "StatusCallbackMethod",
        "StatusCallbackEvent",
        "FallbackUrl",
        "Timeout",
        "CallerId",
    }
)
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
UPDATE_FIELDS = frozenset(
    {
        "Status",
        "Url",
        "Method",
        "FallbackUrl",
        "FallbackMethod",
        "StatusCallback",
        "StatusCallbackMethod",
        "Texml",
    }
)
ENDED = frozenset({"completed", "canceled", "failed", "busy", "no-answer"})
_ERRORS = {
    "10004": "Missing required parameter",
    "10005": "Resource not found",
    "10007": "Unexpected error",
    "10009": "Authentication failed",
    "10014": "Unsupported Media Type",
    "10015": "Bad Request",
    "90018": "Call has already ended",
}


def telnyx_error(status: int, code: str, detail: str) -> JSONResponse:
    """An error in Telnyx's shape: `{"errors": [{code, title, detail, meta}]}`."""
    error = {
        "code": code,
        "title": _ERRORS.get(code, "Error"),
        "detail": detail,
        "meta": {"url": f"https://developers.telnyx.com/docs/overview/errors/{code}"},
    }
    return JSONResponse({"errors": [error]}, status_code=status)


@dataclass
class TelnyxRequest:
    """One request as the fake saw it."""

    method: str
    path: str
    body: dict[str, str]
    authorized: bool
    status: int = 0


@dataclass
class FakeTexmlCall:
    """A TeXML call the fake knows, and what was done to it."""

    sid: str
    account_sid: str
    from_: str
    to: str
    caller: SimulatedEdge | None = None
    status: str = "in-progress"
    direction: str = "inbound"
    texml_history: list[str] = field(default_factory=list)
    transferred_to: str | None = None
    said: list[str] = field(default_factory=list)

    def resource(self) -> dict[str, Any]:
        return {
            "account_sid": self.account_sid,
            "direction": self.direction,
            "from": self.from_,
            "sid": self.sid,
            "status": self.status,
            "to": self.to,
            "uri": f"/v2/texml/Accounts/{self.account_sid}/Calls/{self.sid}.json",
        }


def dial_target(texml: str) -> tuple[str | None, list[str], bool]:
    """The `<Dial>`ed `<Number>`/`<Sip>` of a TeXML document, what its `<Say>`s say, and
    whether it hangs up."""
    root = ET.fromstring(texml)
    if root.tag != "Response":
        raise ValueError(f"the root is <{root.tag}>, not <Response>")
    said = [(say.text or "").strip() for say in root.iter("Say")]
    hangs_up = root.find("Hangup") is not None or root.find("Reject") is not None
    for dial in root.iter("Dial"):
        for noun in dial:
            if noun.tag in ("Number", "Sip") and (noun.text or "").strip():
                return (noun.text or "").strip(), said, hangs_up
    return None, said, hangs_up


class FakeTelnyxState:
    """What the fake knows and did; `attach` a simulated caller to make its call known."""

    def __init__(
        self,
        api_key: str,
        account_sid: str,
        *,
        application_sid: str | None = None,
        signing_key: bytes | None = None,
    ) -> None:
        self.api_key = api_key
        self.account_sid = account_sid
        self.application_sid = application_sid  # None: any ApplicationSid is taken
        self.signing_key = signing_key  # the Ed25519 seed outbound calls' fetches are signed
        self.calls: dict[str, FakeTexmlCall] = {}
        self.requests: list[TelnyxRequest] = []
        self.fail_status: int | None = None
        self.callee: dict[str, Any] = {}  # TelnyxSimulatedCaller arguments of answered calls
        self.answered: dict[str, asyncio.Task[CallResult]] = {}
        self.whispers: list[WarmFetch] = []  # warm transfers' callees answering, in order
        self.dial_ends: list[WarmFetch] = []  # `<Dial action>`s asked when a dial ended
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: Any = None

    async def _post_signed(self, record: WarmFetch, method: str, *, signed: bool) -> None:
        """POST (or GET) `record.form` to `record.url` as Telnyx does, signed unless not."""
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=10, trust_env=False)
        body = urlencode(record.form).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signed:
            if self.signing_key is None:
                raise RuntimeError("the fake signs its fetches: give it signing_key")
            headers |= sign_webhook(self.signing_key, b"" if method == "GET" else body)
        http = self._http

        async def send() -> httpx.Response:
            if method == "GET":
                return await http.get(record.url, params=record.form, headers=headers)
            return await http.post(record.url, content=body, headers=headers)

        await record.fetch(send, xml_reader("Say"), "TeXML")

    async def fetch_whisper(
        self,
        call: FakeTexmlCall,
        target: str,
        url: str,
        method: str = "POST",
        *,
        signed: bool = True,
        parent: str | None = None,
    ) -> WarmFetch:
        """The dialled leg answers: fetch its `<Number url>` about the new leg (naming the
        caller's call, or `parent`) and keep what the callee heard."""
        form = {
            "AccountSid": call.account_sid,
            "CallSid": "v3:" + secrets.token_urlsafe(24),
            "ParentCallSid": parent if parent is not None else call.sid,
            "CallStatus": "in-progress",
            "Direction": "outbound-dial",
            "From": call.from_,
            "To": target,
        }
        record = WarmFetch(url, target, form)
        await self._post_signed(record, method, signed=signed)
        if "Dial" in record.verbs:  # the called party's document may not dial on
            record.error, record.said = "a <Dial> on the called party's end", []
        self.whispers.append(record)
        return record

    async def end_dial(self, call: FakeTexmlCall, dial_status: str = "completed") -> WarmFetch:
        """The call's `<Dial>` ends (`completed`, `no-answer`, `busy`, `failed`…): POST its
        `action` signed, as Telnyx does, and keep the caller's next TeXML."""
        root = ET.fromstring(call.texml_history[-1] if call.texml_history else "<Response/>")
        dial = root.find("Dial")
        if dial is None or not dial.get("action"):
            raise ValueError("the call's TeXML has no <Dial action>")
        target = next(((noun.text or "").strip() for noun in dial), "")
        form = {
            "AccountSid": call.account_sid,
            "CallSid": call.sid,
            "CallStatus": "in-progress",
            "DialCallStatus": dial_status,
            "DialCallSid": "v3:" + secrets.token_urlsafe(24),
            "From": call.from_,
            "To": call.to,
        }
        record = WarmFetch(dial.get("action", ""), target, form)
        await self._post_signed(record, dial.get("method", "POST"), signed=True)
        self.dial_ends.append(record)
        return record

    def _whisper_later(self, call: FakeTexmlCall, texml: str) -> None:
        for dial in ET.fromstring(texml).iter("Dial"):
            for noun in dial:
                url = noun.get("url")
                if noun.tag in ("Number", "Sip") and url:
                    coro = self.fetch_whisper(
                        call, (noun.text or "").strip(), url, noun.get("method", "POST")
                    )
                    task = asyncio.get_running_loop().create_task(coro)
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until every whisper fetch started so far has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def dialed(self) -> list[FakeTexmlCall]:
        """The outbound calls placed so far, in order."""
        return [c for c in self.calls.values() if c.direction == "outbound-api"]

    def _answer(self, call: FakeTexmlCall, url: str) -> None:
        """The callee picks up: Telnyx fetches `url` (signed) and runs the call."""
        from livecall.sim.telnyx import TelnyxSimulatedCaller

        if self.signing_key is None:
            raise RuntimeError("the fake signs outbound fetches: give it signing_key")
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        caller = TelnyxSimulatedCaller(
            f"{parts.scheme}://{parts.netloc}",
            private_key=self.signing_key,
            call_sid=call.sid,
            account_sid=call.account_sid,
            webhook_path=path,
            from_=call.from_,
            to=call.to,
            extra_params={"Direction": "outbound-api"},
            **self.callee,
        )
        call.caller, call.status = caller, "in-progress"

        async def run() -> CallResult:
            try:
                return await caller.run()
            finally:
                if call.status not in ENDED:
                    call.status = "completed"

        self.answered[call.sid] = asyncio.get_running_loop().create_task(run())

    async def aclose(self) -> None:
        """Wait for the answered calls to end (each has its own timeout)."""
        await asyncio.gather(*self.answered.values(), return_exceptions=True)
        await self.drain()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def attach(self, caller: SimulatedEdge) -> FakeTexmlCall:
        """The caller's call is in progress on this account (Telnyx answered it)."""
        call = FakeTexmlCall(caller.call_sid, self.account_sid, caller.from_, caller.to, caller)
        self.calls[call.sid] = call
        return call

    def updates(self, sid: str) -> list[TelnyxRequest]:
        """The authorized update requests for call `sid`, in order."""
        return [r for r in self.requests if r.authorized and r.path.endswith(f"/Calls/{sid}")]

    def authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            token.encode(), self.api_key.encode()
        )

    def _end(self, call: FakeTexmlCall, action: str, target: str | None = None) -> None:
        if call.caller is not None:
            call.caller.end_from_carrier(action, target)


async def _body(request: Request) -> dict[str, str] | JSONResponse:
    """The update's fields: a JSON object (as the SDK sends) or a form (as the docs show)."""
    raw = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            data = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError:
            return telnyx_error(400, "10015", "the body is not valid JSON")
        if type(data) is not dict or not all(type(v) is str for v in data.values()):
            return telnyx_error(400, "10015", "the body must be an object of strings")
        return data
    if ctype == "application/x-www-form-urlencoded":
        return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
    return telnyx_error(415, "10014", f"unsupported content type {ctype!r}")


def build_fake_telnyx_rest(
    api_key: str,
    account_sid: str,
    *,
    application_sid: str | None = None,
    signing_key: bytes | None = None,
) -> tuple[FastAPI, FakeTelnyxState]:
    """The fake's ASGI app (serve it; its base URL + "/v2" is TELNYX_API_BASE) and state."""
    state = FakeTelnyxState(
        api_key, account_sid, application_sid=application_sid, signing_key=signing_key
    )
    app = FastAPI(title="fake Telnyx TeXML API", openapi_url=None, docs_url=None, redoc_url=None)

    @app.post(CREATE)
    async def create_call(account: str, request: Request) -> Response:
        record = TelnyxRequest("POST", request.url.path, {}, state.authorized(request))
        state.requests.append(record)
        response = await _create(account, request, record)
        record.status = response.status_code
        return response

    async def _create(account: str, request: Request, record: TelnyxRequest) -> Response:
        body = await _body(request)
        if not isinstance(body, Response):
            record.body = body
        if not record.authorized:
            return telnyx_error(401, "10009", "The required authentication headers were invalid")
        if isinstance(body, Response):
            return body
        if state.fail_status is not None:
            return telnyx_error(state.fail_status, "10007", "An unexpected error occurred")
        if account != state.account_sid:
            return telnyx_error(404, "10005", "The requested resource could not be found")
        unknown = sorted(set(body) - CREATE_FIELDS)
        if unknown:
            return telnyx_error(422, "10015", f"unknown parameters {unknown}")
        missing = [k for k in ("ApplicationSid", "To", "From", "Url") if not body.get(k)]
        if missing:
            return telnyx_error(422, "10004", f"missing {missing}")
        if state.application_sid is not None and body["ApplicationSid"] != state.application_sid:
            return telnyx_error(422, "10015", "ApplicationSid is not a TeXML application here")
        if not _E164.match(body["To"]) or not _E164.match(body["From"]):
            return telnyx_error(422, "10015", "To and From must be E.164 numbers")
        url = body["Url"]
        if not url.startswith(("https://", "http://")):
            return telnyx_error(422, "10015", "Url must be an absolute http(s) URL")
        if body.get("Method", "POST") != "POST":
            return telnyx_error(422, "10015", "the fake fetches Url with POST only")
        call = FakeTexmlCall(
            "v3:" + secrets.token_urlsafe(33),
            state.account_sid,
            body["From"],
            body["To"],
            status="queued",
            direction="outbound-api",
        )
        state.calls[call.sid] = call
        state._answer(call, url)
        return JSONResponse(
            {"call_sid": call.sid, "from": call.from_, "status": "queued", "to": call.to}
        )

    @app.post(API)
    async def update_call(account: str, sid: str, request: Request) -> Response:
        record = TelnyxRequest("POST", request.url.path, {}, state.authorized(request))
        state.requests.append(record)
        response = await _update(account, sid, request, record)
        record.status = response.status_code
        return response

    async def _update(account: str, sid: str, request: Request, record: TelnyxRequest) -> Response:
        body = await _body(request)
        if not isinstance(body, Response):
            record.body = body  # kept even when refused: what livecall tried to do
        if not record.authorized:
            return telnyx_error(401, "10009", "The required authentication headers were invalid")
        if isinstance(body, Response):
            return body
        if state.fail_status is not None:
            return telnyx_error(state.fail_status, "10007", "An unexpected error occurred")
        call = state.calls.get(sid)
        if account != state.account_sid or call is None:
            return telnyx_error(404, "10005", "The requested resource could not be found")
        unknown = sorted(set(body) - UPDATE_FIELDS)
        if unknown:
            return telnyx_error(422, "10015", f"unknown parameters {unknown}")
        if call.status in ENDED:
            return telnyx_error(422, "90018", "Call has already ended")
        status, texml, url = body.get("Status"), body.get("Texml"), body.get("Url")
        if sum(v is not None for v in (status, texml, url)) != 1:
            return telnyx_error(422, "10004", "give one of Status, Texml or Url")
        if status is not None:
            if status not in ("completed", "canceled"):
                return telnyx_error(422, "10015", "Status must be completed or canceled")
            call.status = "completed" if status == "completed" else "canceled"
            state._end(call, "hangup")
        elif texml is not None:
            try:
                target, said, hangs_up = dial_target(texml)
            except (ET.ParseError, ValueError) as exc:
                return telnyx_error(422, "10015", f"Texml is not a TeXML document: {exc}")
            call.texml_history.append(texml)
            call.said.extend(said)
            if target is not None:
                call.transferred_to = target
                state._end(call, "transfer", target)
                state._whisper_later(call, texml)  # a warm dial's callee picks up
            elif hangs_up:
                call.status = "completed"
                state._end(call, "hangup")
        else:
            assert url is not None
            if not url.startswith(("https://", "http://")):
                return telnyx_error(422, "10015", "Url must be an absolute http(s) URL")
        return JSONResponse(call.resource())

    return app, state
