"""A fake of Plivo's Call API for live calls: hang up, and transfer to a URL it then fetches.

As Plivo documents it (https://www.plivo.com/docs/voice/api/call), HTTP Basic with the Auth
ID and Auth Token (anything else: 401 "authentication failed"):

- `DELETE /v1/Account/{auth_id}/Call/{call_uuid}/` -> 204; a call not live -> 404 "not found";
- `POST /v1/Account/{auth_id}/Call/{call_uuid}/` with `legs` (aleg|bleg|both), `aleg_url`
  (absolute http(s), required for aleg/both), `aleg_method` (GET|POST) -> 202
  `{"message": "call transferred"}`; unknown fields or bad values -> 400 with Plivo's `error`.

Then, as Plivo does, the fake fetches `aleg_url` (a POST about the call, signed V3 with the
auth token) and runs what comes back: a `<Dial>` moves the caller (its `<Number>`/`<User>` is
recorded in `FakePlivoCall.transferred_to`), anything it cannot run hangs the call up. Each
fetch is kept in `fetches`. A call is known once a test `attach`es its simulated caller;
hanging up or transferring ends that caller's stream with Plivo's `stop`. `fail_status`
makes every authorized request fail with that status (an outage).

Warm transfers: when the transferred XML's `<Dial>` has a `confirmSound`, the called party
picks up and Plivo fetches that URL (POST, signed V3) about the called leg, naming the
caller's as `ALegUUID`; only `<Play>`, `<Wait>` and `<Speak>` are played (others ignored, as
Plivo documents), the `<Speak>` texts kept in `whispers`. `end_dial` ends the dial with a
`DialStatus`, POSTs the `<Dial action>` signed and keeps the caller's next XML (`dial_ends`).

Outbound calls: `POST /v1/Account/{auth_id}/Call/` with `from`, `to` (digits, no "+") and
`answer_url` (`answer_method` POST: the fake fetches with POST only) -> 201 `{"message":
"call fired", "request_uuid": …}`. Then, as Plivo does once the callee answers, the fake
fetches `answer_url` signed V3 about a new call whose CallUUID differs from the request's
(`Direction=outbound`, `RequestUUID` naming the request): a `PlivoSimulatedCaller` is the
answered party (`callee` holds its arguments), its run in `answered[request_uuid]`,
its call in `dialed[request_uuid]`.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from livecall.carriers.plivo.signatures import PlivoSignature, new_nonce
from livecall.sim.edge import SimulatedEdge
from livecall.sim.twilio import CallResult
from livecall.sim.warm import WarmFetch, xml_reader

__all__ = [
    "DocumentFetch",
    "FakePlivoCall",
    "FakePlivoState",
    "PlivoRequest",
    "build_fake_plivo_rest",
]

CALL = "/v1/Account/{auth_id}/Call/{call_uuid}/"
CALLS = "/v1/Account/{auth_id}/Call/"
DIAL_FIELDS = frozenset(
    {
        "from",
        "to",
        "answer_url",
        "answer_method",
        "ring_url",
        "ring_method",
        "hangup_url",
        "hangup_method",
        "ring_timeout",
        "time_limit",
        "caller_name",
    }
)
_NUMBER = re.compile(r"^[1-9][0-9]{5,19}$")
TRANSFER_FIELDS = frozenset(
    {"legs", "aleg_url", "aleg_method", "bleg_url", "bleg_method", "blegs_url", "blegs_method"}
)


def plivo_error(status: int, error: str) -> JSONResponse:
    """An error in Plivo's shape: `{"api_id": …, "error": …}`."""
    return JSONResponse({"api_id": str(uuid.uuid4()), "error": error}, status_code=status)


@dataclass
class PlivoRequest:
    """One request as the fake saw it."""

    method: str
    path: str
    body: dict[str, Any]
    authorized: bool
    status: int = 0


@dataclass
class DocumentFetch:
    """The fake fetching a transfer's `aleg_url`, and what came back."""

    url: str
    form: dict[str, str]
    status_code: int | None = None
    xml: str | None = None
    error: str | None = None


@dataclass
class FakePlivoCall:
    """A live call the fake knows, and what was done to it."""

    uuid: str
    from_: str
    to: str
    caller: SimulatedEdge | None = None
    status: str = "in-progress"
    transferred_to: str | None = None
    said: list[str] = field(default_factory=list)
    dial_xml: str | None = None  # the XML its transfer ran (its `<Dial>`)


def run_transfer_xml(xml: str) -> tuple[str | None, list[str]]:
    """What Plivo does with a transfer's XML: the `<Dial>`ed target (None: the XML cannot
    connect the caller, so the call ends) and what its `<Speak>`s say."""
    root = ET.fromstring(xml)
    if root.tag != "Response":
        raise ValueError(f"the root is <{root.tag}>, not <Response>")
    said = [(speak.text or "").strip() for speak in root.iter("Speak")]
    for dial in root.iter("Dial"):
        for noun in dial:
            if noun.tag in ("Number", "User") and (noun.text or "").strip():
                return (noun.text or "").strip(), said
    return None, said


class FakePlivoState:
    """What the fake knows and did; `attach` a simulated caller to make its call known."""

    def __init__(self, auth_id: str, auth_token: str) -> None:
        self.auth_id = auth_id
        self.auth_token = auth_token
        self.calls: dict[str, FakePlivoCall] = {}
        self.requests: list[PlivoRequest] = []
        self.fetches: list[DocumentFetch] = []
        self.fail_status: int | None = None
        self.http: httpx.AsyncClient | None = None
        self._signer = PlivoSignature(auth_token)
        self._tasks: set[asyncio.Task[None]] = set()
        self.callee: dict[str, Any] = {}  # PlivoSimulatedCaller arguments of answered calls
        self.dialed: dict[str, FakePlivoCall] = {}  # request_uuid -> the call it placed
        self.answered: dict[str, asyncio.Task[CallResult]] = {}
        self.whispers: list[WarmFetch] = []  # warm transfers' called parties answering
        self.dial_ends: list[WarmFetch] = []  # `<Dial action>`s asked when a dial ended

    async def _post_signed(self, record: WarmFetch, *, signed: bool = True) -> None:
        headers = {"User-Agent": "PlivoHTTP/1.0"}
        if signed:
            nonce = new_nonce()
            headers["X-Plivo-Signature-V3-Nonce"] = nonce
            headers["X-Plivo-Signature-V3"] = self._signer.sign(
                "POST", record.url, record.form, nonce
            )
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=10, trust_env=False)
        http = self.http
        await record.fetch(
            lambda: http.post(record.url, data=record.form, headers=headers),
            xml_reader("Speak"),
            "Plivo XML",
        )

    async def fetch_whisper(
        self,
        call: FakePlivoCall,
        target: str,
        url: str,
        *,
        signed: bool = True,
        parent: str | None = None,
    ) -> WarmFetch:
        """The called party answers: fetch the `<Dial confirmSound>` (POST) about the called
        leg, naming the caller's (or `parent`) as ALegUUID; keep what it was played."""
        form = {
            "CallUUID": str(uuid.uuid4()),
            "ALegUUID": parent if parent is not None else call.uuid,
            "CallStatus": "in-progress",
            "Direction": "outbound",
            "From": call.from_,
            "To": target,
        }
        record = WarmFetch(url, target, form)
        await self._post_signed(record, signed=signed)
        self.whispers.append(record)
        return record

    async def end_dial(self, call: FakePlivoCall, dial_status: str = "completed") -> WarmFetch:
        """The transfer's `<Dial>` ends (`completed`, `no-answer`, `busy`, `timeout`…): POST
        its `action` signed, as Plivo does, and keep the caller's next XML."""
        dial = ET.fromstring(call.dial_xml or "<Response/>").find("Dial")
        if dial is None or not dial.get("action"):
            raise ValueError("the call's XML has no <Dial action>")
        target = next(((noun.text or "").strip() for noun in dial), "")
        form = {
            "CallUUID": call.uuid,
            "DialStatus": dial_status,
            "DialALegUUID": call.uuid,
            "DialBLegUUID": str(uuid.uuid4()),
            "DialHangupCause": "NORMAL_CLEARING",
            "From": call.from_,
            "To": call.to,
        }
        record = WarmFetch(dial.get("action", ""), target, form)
        await self._post_signed(record)
        self.dial_ends.append(record)
        return record

    def _answer(self, request_uuid: str, from_: str, to: str, url: str) -> FakePlivoCall:
        """The callee answers: Plivo fetches `answer_url` (signed) and runs the call."""
        from livecall.sim.plivo import PlivoSimulatedCaller

        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        caller = PlivoSimulatedCaller(
            f"{parts.scheme}://{parts.netloc}",
            auth_token=self.auth_token,
            auth_id=self.auth_id,
            webhook_path=path,
            from_=from_,
            to=to,
            extra_params={
                "Direction": "outbound",
                "RequestUUID": request_uuid,
                "ALegRequestUUID": request_uuid,
            },
            **self.callee,
        )
        call = self.attach(caller)
        self.dialed[request_uuid] = call

        async def run() -> CallResult:
            try:
                return await caller.run()
            finally:
                call.status = "completed"

        self.answered[request_uuid] = asyncio.get_running_loop().create_task(run())
        return call

    def attach(self, caller: SimulatedEdge) -> FakePlivoCall:
        """The caller's call is live on this account (Plivo answered it)."""
        call = FakePlivoCall(caller.call_sid, caller.from_, caller.to, caller)
        self.calls[call.uuid] = call
        return call

    def requests_for(self, call_uuid: str) -> list[PlivoRequest]:
        """The authorized requests about call `call_uuid`, in order."""
        return [r for r in self.requests if r.authorized and f"/Call/{call_uuid}/" in r.path]

    def authorized(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user.encode(), self.auth_id.encode()) and (
            secrets.compare_digest(password.encode(), self.auth_token.encode())
        )

    async def drain(self) -> None:
        """Wait until every document fetch started so far has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        await asyncio.gather(*self.answered.values(), return_exceptions=True)
        await self.drain()
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    def _end(self, call: FakePlivoCall, action: str, target: str | None = None) -> None:
        call.status = "completed" if action == "hangup" else call.status
        if call.caller is not None:
            call.caller.end_from_carrier(action, target)

    def _fetch_later(self, call: FakePlivoCall, url: str, method: str) -> None:
        task = asyncio.get_running_loop().create_task(self._transfer(call, url, method))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def fetch_document(
        self, call: FakePlivoCall, url: str, method: str = "POST", *, signed: bool = True
    ) -> DocumentFetch:
        """Fetch a transfer's XML as Plivo does (a request about the call, signed V3 unless
        `signed` is False) and keep the fetch in `fetches`."""
        form = {
            "CallUUID": call.uuid,
            "CallStatus": "in-progress",
            "Direction": "inbound",
            "Event": "Transfer",
            "From": call.from_,
            "To": call.to,
        }
        fetch = DocumentFetch(url, form)
        self.fetches.append(fetch)
        headers = {"User-Agent": "PlivoHTTP/1.0"}
        if signed:
            nonce = new_nonce()
            headers["X-Plivo-Signature-V3-Nonce"] = nonce
            headers["X-Plivo-Signature-V3"] = self._signer.sign(method, url, form, nonce)
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=10, trust_env=False)
        try:
            if method == "GET":
                response = await self.http.get(url, params=form, headers=headers)
            else:
                response = await self.http.post(url, data=form, headers=headers)
        except httpx.HTTPError as exc:
            fetch.error = f"{type(exc).__name__}: {exc}"
            return fetch
        fetch.status_code = response.status_code
        if response.status_code == 200:
            fetch.xml = response.text
        return fetch

    async def _transfer(self, call: FakePlivoCall, url: str, method: str) -> None:
        """The caller's leg runs the XML at `url`: a `<Dial>` moves it, else it hangs up."""
        fetch = await self.fetch_document(call, url, method)
        target: str | None = None
        if fetch.xml is not None:
            try:
                target, said = run_transfer_xml(fetch.xml)
                call.said.extend(said)
            except (ET.ParseError, ValueError) as exc:
                fetch.error = f"{type(exc).__name__}: {exc}"
        if target is None:  # nothing to connect the caller to: Plivo hangs up
            self._end(call, "hangup")
            return
        call.transferred_to = target
        call.dial_xml = fetch.xml
        self._end(call, "transfer", target)
        dial = ET.fromstring(fetch.xml or "<Response/>").find("Dial")
        confirm = dial.get("confirmSound") if dial is not None else None
        if confirm:  # a warm dial: the called party picks up and is played the sound
            await self.fetch_whisper(call, target, confirm)


def build_fake_plivo_rest(auth_id: str, auth_token: str) -> tuple[FastAPI, FakePlivoState]:
    """The fake's ASGI app (serve it; its base URL is PLIVO_API_BASE) and its state."""
    state = FakePlivoState(auth_id, auth_token)
    app = FastAPI(title="fake Plivo Call API", openapi_url=None, docs_url=None, redoc_url=None)

    def refused(auth: str, record: PlivoRequest) -> Response | None:
        if not record.authorized or auth != state.auth_id:
            return plivo_error(401, "authentication failed")
        if state.fail_status is not None:
            return plivo_error(state.fail_status, "internal server error")
        return None

    def live(call_uuid: str) -> FakePlivoCall | None:
        call = state.calls.get(call_uuid)
        return call if call is not None and call.status == "in-progress" else None

    @app.post(CALLS)
    async def make_call(auth_id: str, request: Request) -> Response:
        record = PlivoRequest("POST", request.url.path, {}, state.authorized(request))
        state.requests.append(record)
        response = refused(auth_id, record) or await _dial(request, record)
        record.status = response.status_code
        return response

    async def _dial(request: Request, record: PlivoRequest) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            return plivo_error(400, "the body is not valid JSON")
        if type(body) is not dict:
            return plivo_error(400, "the body must be a JSON object")
        record.body = body
        unknown = sorted(set(body) - DIAL_FIELDS)
        if unknown:
            return plivo_error(400, f"unknown parameters {unknown}")
        missing = [k for k in ("from", "to", "answer_url") if not body.get(k)]
        if missing:
            return plivo_error(400, f"missing mandatory parameters {missing}")
        from_, to, url = body["from"], body["to"], body["answer_url"]
        if not all(type(v) is str for v in (from_, to, url)):
            return plivo_error(400, "from, to and answer_url must be strings")
        if not _NUMBER.match(from_) or not _NUMBER.match(to):
            return plivo_error(400, "from and to must be numbers (digits, country code first)")
        if not url.startswith(("https://", "http://")):
            return plivo_error(400, "answer_url must be an absolute http(s) URL")
        if body.get("answer_method", "POST") != "POST":
            return plivo_error(400, "the fake fetches answer_url with POST only")
        request_uuid = str(uuid.uuid4())
        state._answer(request_uuid, from_, to, url)
        return JSONResponse(
            {"api_id": str(uuid.uuid4()), "message": "call fired", "request_uuid": request_uuid},
            status_code=201,
        )

    @app.delete(CALL)
    async def hang_up(auth_id: str, call_uuid: str, request: Request) -> Response:
        record = PlivoRequest("DELETE", request.url.path, {}, state.authorized(request))
        state.requests.append(record)
        response = refused(auth_id, record)
        if response is None:
            call = live(call_uuid)
            if call is None:
                response = plivo_error(404, "not found")
            else:
                state._end(call, "hangup")
                response = Response(status_code=204)
        record.status = response.status_code
        return response

    @app.post(CALL)
    async def transfer(auth_id: str, call_uuid: str, request: Request) -> Response:
        record = PlivoRequest("POST", request.url.path, {}, state.authorized(request))
        state.requests.append(record)
        response = refused(auth_id, record) or await _transfer(call_uuid, request, record)
        record.status = response.status_code
        return response

    async def _transfer(call_uuid: str, request: Request, record: PlivoRequest) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            return plivo_error(400, "the body is not valid JSON")
        if type(body) is not dict:
            return plivo_error(400, "the body must be a JSON object")
        record.body = body
        unknown = sorted(set(body) - TRANSFER_FIELDS)
        if unknown:
            return plivo_error(400, f"unknown parameters {unknown}")
        legs = body.get("legs", "aleg")
        if legs not in ("aleg", "bleg", "both"):
            return plivo_error(400, "legs must be aleg, bleg or both")
        url, method = body.get("aleg_url"), body.get("aleg_method", "POST")
        if legs in ("aleg", "both") and (
            type(url) is not str or not url.startswith(("https://", "http://"))
        ):
            return plivo_error(400, "aleg_url must be an absolute http(s) URL for aleg")
        if method not in ("GET", "POST"):
            return plivo_error(400, "aleg_method must be GET or POST")
        call = live(call_uuid)
        if call is None:
            return plivo_error(404, "not found")
        if legs in ("aleg", "both"):
            assert isinstance(url, str)
            state._fetch_later(call, url, method)
        return JSONResponse(
            {"api_id": str(uuid.uuid4()), "message": "call transferred"}, status_code=202
        )

    return app, state
