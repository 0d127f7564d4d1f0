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

A call is known once a test `attach`es its simulated caller; a hang-up or a transfer then ends
that caller's stream (`SimulatedEdge.end_from_carrier`), as Vonage does when the call leaves
its websocket `connect`. A transfer's NCCO is recorded: its `talk` texts in `said`, the number
or SIP URI its `connect` dials in `transferred_to`. `fail_status` makes every authorized
request fail with that status (an outage).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from livecall.sim.edge import SimulatedEdge

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

    def __init__(self, application_id: str, public_key: str, *, leeway_s: float = 0.0) -> None:
        self.application_id = application_id
        self.public_key = public_key
        self.leeway_s = leeway_s
        self.calls: dict[str, FakeVonageCall] = {}
        self.requests: list[VonageRequest] = []
        self.fail_status: int | None = None

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


def build_fake_vonage_rest(application_id: str, public_key: str) -> tuple[FastAPI, FakeVonageState]:
    """The fake's ASGI app (serve it; its base URL is VONAGE_API_BASE) and its state."""
    state = FakeVonageState(application_id, public_key)
    app = FastAPI(title="fake Vonage Voice API", openapi_url=None, docs_url=None, redoc_url=None)

    async def begin(request: Request, base: str) -> tuple[VonageRequest, Any]:
        why = state.check_jwt(request.headers.get("authorization", ""))
        record = VonageRequest("PUT", request.url.path, base, {}, not why, auth_error=why)
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
        except ValueError as exc:
            return finish(record, vonage_error(422, "Invalid NCCO", str(exc)))
        call.said.extend(said)
        if target is not None:
            call.transferred_to = target
            call.status = "transferred"
        if call.caller is not None:
            call.caller.end_from_carrier("transfer", target)
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
