"""A fake of Vonage's Voice REST API for live calls: hang up, transfer, send DTMF.

`PUT /v1/calls/{uuid}` with `{"action":"hangup"}` or `{"action":"transfer","destination":
{"type":"ncco","ncco":[…]}}` (204 No Content), `PUT /v1/calls/{uuid}/dtmf` with `{"digits":…}`
(200 `{"message":"DTMF sent","uuid":…}`), as Vonage serves them, also under `REGION_PATH`
(the fake's stand-in for a call's `region_url`: requests record which base they came to).
Every request needs `Authorization: Bearer <application JWT>`, checked strictly: RS256 signed
by the application's private key (verified with its public key), `iat`, `exp` and `jti`
present, not expired, `application_id` this application's; anything else is 401. A call
Vonage does not know, or one already over, is 404; a body it cannot read is 400/422; errors
are Vonage's problem-details JSON (`type`, `title`, `detail`, `instance`).

Outbound calls: `POST /v1/calls` with `to` (one phone endpoint), `from` (a phone endpoint),
`answer_url` (one URL) and `answer_method` (GET or POST) -> 201 `{"uuid", "status": "started",
"direction": "outbound", "conversation_uuid"}`. Then, as Vonage does once the callee answers,
the fake requests `answer_url` signed with the account's signature secret (the signed-webhook
JWT) and runs the NCCO it gets with a `SimulatedVonageCaller` as the answered party (`callee`
holds its arguments; `from`/`to` as the create request named them, the call's `uuid` the one
the create answered): its run in `answered[uuid]`, its call in `dialed[uuid]`. `to`/`from`
numbers are digits, country code first (Vonage's form); an inline `ncco` is refused (the
fake runs fetched NCCOs only).

A call is known once a test `attach`es its simulated caller; a hang-up or a transfer then ends
that caller's stream (`SimulatedEdge.end_from_carrier`), as Vonage does when the call leaves
its websocket `connect`. A transfer's NCCO is recorded: its `talk` texts in `said`, the number
or SIP URI its `connect` dials in `transferred_to`. `fail_status` makes every authorized
request fail with that status (an outage).

Warm transfers: a transfer whose `connect` phone endpoint has `onAnswer` (`{"url": …}`, a
`ringbackTone` URL allowed) has its callee pick up: the fake requests that URL (GET, its query
the new leg's `uuid`, the caller's `conversation_uuid`, `from`, `to`) signed like every
webhook (the signature secret's JWT), reads the NCCO and keeps its `talk`s in `whispers`.
A connect with `eventType: "synchronous"` needs one `eventUrl`; `end_dial` POSTs that URL a
signed event with the connect's final `status` (`answered`→`completed`, or `timeout`,
`busy`, `rejected`, `unanswered`, `failed`) and keeps the NCCO the app answered
(`dial_ends`), which Vonage runs in place of the call's for a connect no one took.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import jwt
import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from livecall.carriers.vonage.signatures import VonageSignature
from livecall.sim.edge import SimulatedEdge
from livecall.sim.script import CallResult
from livecall.sim.warm import WarmFetch, ncco_said

__all__ = [
    "REGION_PATH",
    "FakeVonageCall",
    "FakeVonageState",
    "VonageRequest",
    "build_fake_vonage_rest",
    "generate_application_keys",
]

REGION_PATH = "/region-us-3"
_DTMF_RE = re.compile(r"^[0-9*#pP]{1,64}$")
_NUMBER_RE = re.compile(r"^[1-9][0-9]{5,19}$")  # Vonage's numbers: digits, no "+"
_ERROR_TYPE = "https://developer.vonage.com/api-errors#"


def generate_application_keys() -> tuple[str, str]:
    """A Vonage application's RSA key pair as PEM text: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def vonage_error(status: int, title: str, detail: str) -> JSONResponse:
    """An error in Vonage's problem-details shape."""
    body = {
        "type": _ERROR_TYPE + title.lower().replace(" ", "-"),
        "title": title,
        "detail": detail,
        "instance": str(uuid.uuid4()),
    }
    return JSONResponse(body, status_code=status)


@dataclass
class VonageRequest:
    """One request as the fake saw it (`base`: "" or `REGION_PATH`, where it was sent)."""

    method: str
    path: str
    base: str
    body: dict[str, Any]
    authorized: bool
    status: int = 0
    auth_error: str = ""


@dataclass
class FakeVonageCall:
    """A live call the fake knows, and what was done to it."""

    uuid: str
    caller: SimulatedEdge | None = None
    status: str = "answered"
    said: list[str] = field(default_factory=list)
    transferred_to: str | None = None
    dtmf: list[str] = field(default_factory=list)
    connect: dict[str, Any] | None = None  # the connect its transfer ran
    conversation_uuid: str = field(default_factory=lambda: "CON-" + str(uuid.uuid4()))


def _warm_connect(ncco: list[Any]) -> dict[str, Any] | None:
    """The NCCO's `connect`, checked as Vonage would: `onAnswer` an object with a `url`
    (and maybe a `ringbackTone` URL), a synchronous `eventType` with one `eventUrl`."""
    for action in ncco:
        if action.get("action") != "connect":
            continue
        endpoint = action["endpoint"][0]
        on_answer = endpoint.get("onAnswer")
        if on_answer is not None:
            if endpoint.get("type") != "phone":
                raise ValueError("onAnswer is a phone endpoint's")
            if type(on_answer) is not dict or set(on_answer) - {"url", "ringbackTone"}:
                raise ValueError("onAnswer takes url and ringbackTone")
            if type(on_answer.get("url")) is not str or not on_answer["url"].startswith("http"):
                raise ValueError("onAnswer.url must be an absolute URL")
        kind = action.get("eventType")
        if kind is not None and kind != "synchronous":
            raise ValueError("eventType can only be synchronous")
        urls = action.get("eventUrl")
        if urls is not None and (type(urls) is not list or len(urls) != 1):
            raise ValueError("eventUrl must be an array with one URL")
        if action.get("eventMethod", "POST") not in ("GET", "POST"):
            raise ValueError("eventMethod must be GET or POST")
        return action
    return None


def _connect_target(ncco: list[Any]) -> tuple[str | None, list[str]]:
    """The number or SIP URI an NCCO's `connect` dials, and what its `talk`s say; ValueError
    for an NCCO Vonage would refuse."""
    said: list[str] = []
    for action in ncco:
        if type(action) is not dict or type(action.get("action")) is not str:
            raise ValueError("each NCCO action must be an object with an 'action'")
        if action["action"] == "talk":
            text = action.get("text")
            if type(text) is not str or not text:
                raise ValueError("talk needs a text")
            said.append(text)
        elif action["action"] == "connect":
            endpoints = action.get("endpoint")
            if type(endpoints) is not list or len(endpoints) != 1:
                raise ValueError("connect needs one endpoint")
            ep = endpoints[0]
            if type(ep) is dict and ep.get("type") == "phone" and type(ep.get("number")) is str:
                return ep["number"], said
            if type(ep) is dict and ep.get("type") == "sip" and type(ep.get("uri")) is str:
                return ep["uri"], said
            raise ValueError("connect endpoint must be a phone number or a sip uri")
    return None, said


class FakeVonageState:
    """What the fake knows and did; `attach` a simulated caller to make its call known."""

    def __init__(
        self,
        application_id: str,
        public_key: str,
        *,
        leeway_s: float = 0.0,
        signature_secret: str | None = None,
    ) -> None:
        self.application_id = application_id
        self.public_key = public_key
        self.leeway_s = leeway_s
        self.signature_secret = signature_secret  # signs the answer webhooks of placed calls
        self.calls: dict[str, FakeVonageCall] = {}
        self.requests: list[VonageRequest] = []
        self.fail_status: int | None = None
        self.callee: dict[str, Any] = {}  # SimulatedVonageCaller arguments of answered calls
        self.dialed: dict[str, FakeVonageCall] = {}  # uuid -> the call it placed
        self.answered: dict[str, asyncio.Task[CallResult]] = {}
        self.whispers: list[WarmFetch] = []  # warm transfers' callees answering, in order
        self.dial_ends: list[WarmFetch] = []  # synchronous connects' events, answered
        self.http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def _signer(self) -> VonageSignature:
        if self.signature_secret is None:
            raise RuntimeError("the fake signs its webhooks: give it signature_secret")
        return VonageSignature(self.signature_secret, application_id=self.application_id)

    async def _send(self, record: WarmFetch, method: str, *, signed: bool) -> None:
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=10, trust_env=False)
        http = self.http

        async def send() -> httpx.Response:
            if method == "GET":
                sep = "&" if "?" in record.url else "?"
                url = record.url + sep + urlencode(record.form)
                headers = {"Authorization": self._signer().sign(method="GET", url=url)}
                return await http.get(url, headers=headers if signed else {})
            body = orjson.dumps(record.form)
            headers = {"Content-Type": "application/json"}
            if signed:
                headers["Authorization"] = self._signer().sign(
                    method="POST", url=record.url, body=body
                )
            return await http.post(record.url, content=body, headers=headers)

        await record.fetch(send, ncco_said, "an NCCO")

    async def fetch_whisper(
        self,
        call: FakeVonageCall,
        target: str,
        url: str,
        *,
        signed: bool = True,
        conversation: str | None = None,
    ) -> WarmFetch:
        """The callee answers: request the endpoint's `onAnswer` URL (GET, signed) about the
        new leg and keep the `talk`s its NCCO says."""
        form = {
            "uuid": str(uuid.uuid4()),
            "conversation_uuid": conversation or call.conversation_uuid,
            "from": "",
            "to": target,
        }
        record = WarmFetch(url, target, form)
        await self._send(record, "GET", signed=signed)
        self.whispers.append(record)
        return record

    async def end_dial(self, call: FakeVonageCall, status: str = "completed") -> WarmFetch:
        """The transfer's synchronous connect ends with `status`: POST its eventUrl the
        signed event, as Vonage does, and keep the NCCO answered."""
        urls = (call.connect or {}).get("eventUrl")
        if not urls:
            raise ValueError("the call's connect has no eventUrl")
        form = {
            "uuid": str(uuid.uuid4()),
            "conversation_uuid": call.conversation_uuid,
            "status": status,
            "direction": "outbound",
            "to": call.transferred_to or "",
        }
        record = WarmFetch(urls[0], call.transferred_to or "", form)
        await self._send(record, (call.connect or {}).get("eventMethod", "POST"), signed=True)
        self.dial_ends.append(record)
        return record

    def _whisper_later(self, call: FakeVonageCall, target: str, url: str) -> None:
        task = asyncio.get_running_loop().create_task(self.fetch_whisper(call, target, url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until every whisper fetch started so far has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _answer(
        self, call_uuid: str, from_: str, to: str, url: str, method: str, region: str
    ) -> None:
        """The callee answers: Vonage requests `answer_url` (signed) and runs the NCCO."""
        from livecall.sim.vonage import SimulatedVonageCaller

        assert self.signature_secret is not None
        parts = urlsplit(url)
        caller = SimulatedVonageCaller(
            f"{parts.scheme}://{parts.netloc}",
            signature_secret=self.signature_secret,
            call_uuid=call_uuid,
            answer_path=parts.path + (f"?{parts.query}" if parts.query else ""),
            answer_method="POST" if method == "POST" else "GET",
            application_id=self.application_id,
            region_url=region,
            from_=from_,
            to=to,
            **self.callee,
        )
        call = self.attach(caller)
        self.dialed[call_uuid] = call

        async def run() -> CallResult:
            try:
                return await caller.run()
            finally:
                call.status = "completed"

        self.answered[call_uuid] = asyncio.get_running_loop().create_task(run())

    async def aclose(self) -> None:
        """Wait for the placed calls' callees to finish."""
        await asyncio.gather(*self.answered.values(), return_exceptions=True)
        await self.drain()
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    def attach(self, caller: SimulatedEdge) -> FakeVonageCall:
        """The caller's call is live on this application (Vonage answered it)."""
        call = FakeVonageCall(caller.call_sid, caller)
        self.calls[call.uuid] = call
        return call

    def check_jwt(self, header: str) -> str:
        """ "" for an application JWT this application signed; else why it is refused."""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "no bearer token"
        try:
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=["RS256"],
                options={"require": ["iat", "exp", "jti", "application_id"]},
                leeway=self.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            return "expired"
        except jwt.InvalidTokenError as exc:
            return type(exc).__name__
        if claims.get("application_id") != self.application_id:
            return "wrong application_id"
        return ""


def build_fake_vonage_rest(
    application_id: str, public_key: str, *, signature_secret: str | None = None
) -> tuple[FastAPI, FakeVonageState]:
    """The fake's ASGI app (serve it; its base URL is VONAGE_API_BASE) and its state;
    `signature_secret` (the account's) lets it place calls (`POST /v1/calls`)."""
    state = FakeVonageState(application_id, public_key, signature_secret=signature_secret)
    app = FastAPI(title="fake Vonage Voice API", openapi_url=None, docs_url=None, redoc_url=None)

    async def begin(request: Request, base: str) -> tuple[VonageRequest, Any]:
        why = state.check_jwt(request.headers.get("authorization", ""))
        record = VonageRequest(request.method, request.url.path, base, {}, not why, auth_error=why)
        state.requests.append(record)
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        if type(body) is dict:
            record.body = body
        return record, body

    def refusal(record: VonageRequest, body: Any, call_uuid: str) -> Response | None:
        if not record.authorized:
            return vonage_error(401, "Unauthorized", "Invalid Token")
        if state.fail_status is not None:
            return vonage_error(state.fail_status, "Internal Error", "An error occurred")
        if type(body) is not dict:
            return vonage_error(400, "Bad Request", "the body must be a JSON object")
        call = state.calls.get(call_uuid)
        if call is None or call.status != "answered":
            return vonage_error(404, "Not Found", f"Call {call_uuid} doesn't exist")
        return None

    def finish(record: VonageRequest, response: Response) -> Response:
        record.status = response.status_code
        return response

    async def modify(call_uuid: str, request: Request, base: str) -> Response:
        record, body = await begin(request, base)
        refused = refusal(record, body, call_uuid)
        if refused is not None:
            return finish(record, refused)
        call = state.calls[call_uuid]
        action = body.get("action")
        if action == "hangup":
            call.status = "completed"
            if call.caller is not None:
                call.caller.end_from_carrier("hangup")
            return finish(record, Response(status_code=204))
        if action != "transfer":
            return finish(record, vonage_error(422, "Invalid action", f"action {action!r}"))
        destination = body.get("destination")
        ncco = destination.get("ncco") if type(destination) is dict else None
        if (
            type(destination) is not dict
            or destination.get("type") != "ncco"
            or type(ncco) is not list
        ):
            return finish(record, vonage_error(422, "Invalid destination", "an inline ncco"))
        try:
            target, said = _connect_target(ncco)
            connect = _warm_connect(ncco)
        except ValueError as exc:
            return finish(record, vonage_error(422, "Invalid NCCO", str(exc)))
        call.said.extend(said)
        if target is not None:
            call.transferred_to = target
            call.status = "transferred"
            call.connect = connect
        if call.caller is not None:
            call.caller.end_from_carrier("transfer", target)
        on_answer = (connect or {}).get("endpoint", [{}])[0].get("onAnswer")
        if target is not None and on_answer:  # the callee picks up: its NCCO first
            state._whisper_later(call, target, on_answer["url"])
        return finish(record, Response(status_code=204))

    async def dtmf(call_uuid: str, request: Request, base: str) -> Response:
        record, body = await begin(request, base)
        refused = refusal(record, body, call_uuid)
        if refused is not None:
            return finish(record, refused)
        digits = body.get("digits")
        if type(digits) is not str or not _DTMF_RE.match(digits):
            return finish(record, vonage_error(400, "Bad Request", "digits: 0-9, *, #, p"))
        state.calls[call_uuid].dtmf.append(digits)
        return finish(record, JSONResponse({"message": "DTMF sent", "uuid": call_uuid}))

    async def create(request: Request) -> Response:
        record, body = await begin(request, "")
        if not record.authorized:
            return finish(record, vonage_error(401, "Unauthorized", "Invalid Token"))
        if state.fail_status is not None:
            return finish(
                record, vonage_error(state.fail_status, "Internal Error", "An error occurred")
            )
        if type(body) is not dict:
            return finish(record, vonage_error(400, "Bad Request", "the body must be JSON"))
        try:
            to, from_, url, method = _create_fields(body)
        except ValueError as exc:
            return finish(record, vonage_error(400, "Bad Request", str(exc)))
        if state.signature_secret is None:
            return finish(record, vonage_error(500, "Internal Error", "no signature secret"))
        call_uuid = str(uuid.uuid4())
        region = str(request.base_url).rstrip("/") + REGION_PATH
        state._answer(call_uuid, from_, to, url, method, region)
        answer = {
            "uuid": call_uuid,
            "status": "started",
            "direction": "outbound",
            "conversation_uuid": "CON-" + str(uuid.uuid4()),
        }
        return finish(record, JSONResponse(answer, status_code=201))

    app.add_api_route("/v1/calls", create, methods=["POST"])

    def routes(base: str) -> APIRouter:
        router = APIRouter(prefix=base)

        async def put_call(call_uuid: str, request: Request) -> Response:
            return await modify(call_uuid, request, base)

        async def put_dtmf(call_uuid: str, request: Request) -> Response:
            return await dtmf(call_uuid, request, base)

        router.add_api_route("/v1/calls/{call_uuid}", put_call, methods=["PUT"])
        router.add_api_route("/v1/calls/{call_uuid}/dtmf", put_dtmf, methods=["PUT"])
        return router

    app.include_router(routes(""))
    app.include_router(routes(REGION_PATH))
    return app, state


def _create_fields(body: dict[str, Any]) -> tuple[str, str, str, str]:
    """(to, from, answer_url, answer_method) of a create-call body; ValueError as Vonage's 400."""
    if "ncco" in body:
        raise ValueError("the fake runs fetched NCCOs only (answer_url)")
    to = body.get("to")
    if type(to) is not list or len(to) != 1 or type(to[0]) is not dict:
        raise ValueError("to must be an array with one endpoint")
    sender = body.get("from")
    if type(sender) is not dict:
        raise ValueError("from must be a phone endpoint (or random_from_number)")
    numbers = []
    for endpoint in (to[0], sender):
        number = endpoint.get("number")
        if endpoint.get("type") != "phone" or type(number) is not str:
            raise ValueError("to and from must be phone endpoints with a number")
        if not _NUMBER_RE.match(number):
            raise ValueError("numbers are digits, country code first (no +)")
        numbers.append(number)
    urls = body.get("answer_url")
    if type(urls) is not list or len(urls) != 1 or type(urls[0]) is not str:
        raise ValueError("answer_url must be an array with one URL")
    if not urls[0].startswith(("https://", "http://")):
        raise ValueError("answer_url must be an absolute http(s) URL")
    method = body.get("answer_method", "GET")
    if method not in ("GET", "POST"):
        raise ValueError("answer_method must be GET or POST")
    return numbers[0], numbers[1], urls[0], method
