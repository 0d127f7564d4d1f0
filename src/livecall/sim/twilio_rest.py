"""A fake of Twilio's REST Calls API, close enough that the real `twilio` client talks to it.

Outbound calls, transfers and hang-ups go through `twilio.rest.Client`; pointed at this app
(served on loopback) they can be tested without a Twilio account. It answers in Twilio's
shapes: a Call resource as JSON, ``201`` on create, Basic auth with error 20003, and ``404`` /
20404 for a call that has already ended. `FakeTwilioState` records every request and every
call's status and TwiML history for assertions, runs test hooks when a call is created or
redirected, and plays the part of the far end: `end_call` (the callee hangs up) and
`mark_answered_by` (answering-machine detection delivers its verdict to the app); a redirect
that dials a `<Number url>` (a warm transfer) has its callee answer: the fake fetches that
URL, signed like Twilio, and keeps what the callee heard (`whispers`); `end_dial` ends that
`<Dial>` and asks its `action` what the caller hears next (`dial_ends`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import secrets
import socket
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from twilio.request_validator import RequestValidator

from livecall.log import get_logger

__all__ = [
    "FakeCall",
    "FakeTwilioState",
    "RecordedRequest",
    "TwimlFetch",
    "build_fake_twilio_rest",
    "serve_fake_twilio_rest",
]

log = get_logger("livecall.sim.twilio_rest")

API = "/2010-04-01"
ENDED = frozenset({"completed", "canceled", "failed", "busy", "no-answer"})
# Which status change each StatusCallbackEvent name stands for.
_EVENT_OF_STATUS = {
    "queued": "initiated",
    "ringing": "ringing",
    "in-progress": "answered",
    **{s: "completed" for s in ENDED},
}

Hook = Callable[..., Awaitable[None] | None]


def _rfc2822(moment: datetime | None) -> str | None:
    return format_datetime(moment) if moment else None


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _formatted(number: str) -> str:
    """Twilio's ``to_formatted``: North American numbers as (415) 555-1212."""
    if number.startswith("+1") and len(number) == 12 and number[2:].isdigit():
        return f"({number[2:5]}) {number[5:8]}-{number[8:]}"
    return number


def twilio_error(status: int, code: int, message: str, **extra: Any) -> JSONResponse:
    """An error answer in Twilio's JSON shape (the `twilio` client reads code and message)."""
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
        **extra,
    }
    return JSONResponse(body, status_code=status)


@dataclass
class RecordedRequest:
    """One request as the fake saw it (form values: the last one per key, plus all of them)."""

    method: str
    path: str
    form: dict[str, str]
    form_lists: dict[str, list[str]]
    authorized: bool
    status: int = 0


@dataclass
class FakeCall:
    """One call known to the fake, with everything that happened to it."""

    sid: str
    account_sid: str
    to: str
    from_: str
    create_params: dict[str, str]
    status_callback_events: set[str]
    status: str = "queued"
    twiml: str | None = None
    url: str | None = None
    answered_by: str | None = None
    date_created: datetime = field(default_factory=_now)
    date_updated: datetime = field(default_factory=_now)
    start_time: datetime | None = None
    end_time: datetime | None = None
    status_history: list[str] = field(default_factory=list)
    twiml_history: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    # the simulated caller whose stream this call is (`FakeTwilioState.attach`): a hang-up or
    # a `<Dial>` redirect ends that stream, as Twilio does
    caller: Any = None

    @property
    def is_ended(self) -> bool:
        return self.status in ENDED

    @property
    def uri(self) -> str:
        return f"{API}/Accounts/{self.account_sid}/Calls/{self.sid}.json"

    def resource(self) -> dict[str, Any]:
        """The Call resource JSON, shaped like Twilio's."""
        duration = None
        if self.start_time and self.end_time:
            duration = str(int((self.end_time - self.start_time).total_seconds()))
        base = self.uri.removesuffix(".json")
        return {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": self.answered_by,
            "api_version": "2010-04-01",
            "caller_name": None,
            "date_created": _rfc2822(self.date_created),
            "date_updated": _rfc2822(self.date_updated),
            "direction": "outbound-api",
            "duration": duration,
            "end_time": _rfc2822(self.end_time),
            "forwarded_from": None,
            "from": self.from_,
            "from_formatted": _formatted(self.from_),
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": self.sid,
            "start_time": _rfc2822(self.start_time),
            "status": self.status,
            "subresource_uris": {
                "events": f"{base}/Events.json",
                "notifications": f"{base}/Notifications.json",
                "recordings": f"{base}/Recordings.json",
                "payments": f"{base}/Payments.json",
                "siprec": f"{base}/Siprec.json",
                "streams": f"{base}/Streams.json",
                "transcriptions": f"{base}/Transcriptions.json",
                "user_defined_message_subscriptions": (
                    f"{base}/UserDefinedMessageSubscriptions.json"
                ),
                "user_defined_messages": f"{base}/UserDefinedMessages.json",
            },
            "to": self.to,
            "to_formatted": _formatted(self.to),
            "trunk_sid": None,
            "uri": self.uri,
        }


@dataclass
class Callback:
    """A webhook the fake sent to the app (status or AMD), and how the app answered."""

    kind: str  # "status" | "amd"
    url: str
    form: dict[str, str]
    status_code: int | None = None
    error: str | None = None


@dataclass
class TwimlFetch:
    """TwiML the fake asked the app for mid-call (a warm transfer's whisper, a `<Dial>`'s
    action), and what it got: what the callee, or the caller, heard next."""

    url: str
    target: str
    form: dict[str, str]
    status_code: int | None = None
    twiml: str | None = None
    error: str | None = None

    @property
    def verbs(self) -> list[str]:
        if not self.twiml:
            return []
        try:
            return [child.tag for child in ET.fromstring(self.twiml)]
        except ET.ParseError:
            return []

    @property
    def said(self) -> list[str]:
        """The text of each `<Say>` in the answer."""
        if not self.twiml:
            return []
        try:
            root = ET.fromstring(self.twiml)
        except ET.ParseError:
            return []
        return [say.text or "" for say in root.iter("Say")]


def whisper_targets(twiml: str) -> list[tuple[str, str]]:
    """(target, url) of each `<Dial>`ed `<Number url>`/`<Sip url>` in `twiml`."""
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError:
        return []
    found = []
    for dial in root.iter("Dial"):
        for noun in list(dial):
            url = noun.get("url")
            if noun.tag in ("Number", "Sip") and url:
                found.append(((noun.text or "").strip(), url))
    return found


class FakeTwilioState:
    """What the fake knows and did; also how a test plays the far end of a call."""

    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.calls: dict[str, FakeCall] = {}
        self.requests: list[RecordedRequest] = []
        self.callbacks: list[Callback] = []
        self.whispers: list[TwimlFetch] = []  # warm transfers' callees answering, in order
        self.dial_ends: list[TwimlFetch] = []  # `<Dial action>`s asked when a dial ended
        self.hook_errors: list[BaseException] = []
        self.on_create: Hook | None = None  # on_create(call)
        self.on_update: Hook | None = None  # on_update(call, twiml_or_None)
        self.auto_answer = True  # a created call goes straight to in-progress
        self.fail_status: int | None = None  # every authorized request fails so (an outage)
        # a call update's answer comes this long after its effect (the stream already ended),
        # as across a real network: the caller's `stop` can beat the REST response
        self.update_answer_delay_s = 0.0
        self.http: httpx.AsyncClient | None = None  # for callbacks; one is made when needed
        self.created = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---------------------------------------------------------- bookkeeping

    def _spawn(self, coro: Awaitable[Any], what: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                self.hook_errors.append(exc)
                log.exception("fake_twilio.hook_failed", hook=what)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _run_hook(self, hook: Hook | None, what: str, *args: Any) -> None:
        if hook is None:
            return

        async def call() -> None:
            result = hook(*args)
            if inspect.isawaitable(result):
                await result

        self._spawn(call(), what)

    async def drain(self) -> None:
        """Wait until every hook and callback started so far has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    def call(self, sid: str) -> FakeCall:
        return self.calls[sid]

    def attach(self, caller: Any) -> FakeCall:
        """An inbound call in progress whose stream is `caller`'s (a `SimulatedCaller`)."""
        call = FakeCall(
            sid=caller.call_sid,
            account_sid=self.account_sid,
            to=caller.to,
            from_=caller.from_,
            create_params={},
            status_callback_events=set(),
            status="in-progress",
            status_history=["in-progress"],
            caller=caller,
        )
        self.calls[call.sid] = call
        return call

    def last_call(self) -> FakeCall:
        return list(self.calls.values())[-1]

    async def wait_for_call(self, count: int = 1) -> FakeCall:
        """The `count`-th created call, once it exists (wrap in `asyncio.timeout`)."""
        async with self.created:
            await self.created.wait_for(lambda: len(self.calls) >= count)
        return list(self.calls.values())[count - 1]

    def _set_status(self, call: FakeCall, status: str) -> None:
        if call.status == status and call.status_history:
            return
        call.status = status
        call.status_history.append(status)
        call.date_updated = _now()
        if status == "in-progress" and call.start_time is None:
            call.start_time = _now()
        if status in ENDED:
            call.end_time = _now()
            call.ended.set()
            if call.caller is not None:
                call.caller.end_from_carrier("hangup")
        event = _EVENT_OF_STATUS.get(status)
        url = call.create_params.get("StatusCallback")
        if url and event in call.status_callback_events:
            form = {
                "AccountSid": call.account_sid,
                "ApiVersion": "2010-04-01",
                "CallSid": call.sid,
                "CallStatus": status,
                "Direction": "outbound-api",
                "From": call.from_,
                "To": call.to,
                "Timestamp": _rfc2822(_now()) or "",
            }
            if status in ENDED and call.start_time and call.end_time:
                form["CallDuration"] = str(int((call.end_time - call.start_time).total_seconds()))
            self._spawn(self._post_callback("status", url, form), "status_callback")

    async def _post_callback(self, kind: str, url: str, form: dict[str, str]) -> Callback:
        """POST a signed webhook to the app, like Twilio does."""
        record = Callback(kind, url, form)
        self.callbacks.append(record)
        signature = RequestValidator(self.auth_token).compute_signature(url, form)
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=10)
        try:
            response = await self.http.post(
                url, data=form, headers={"X-Twilio-Signature": signature}
            )
            record.status_code = response.status_code
        except httpx.HTTPError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            log.warning("fake_twilio.callback_failed", url=url, error=record.error)
        return record

    async def _fetch_twiml(self, record: TwimlFetch, *, signed: bool) -> TwimlFetch:
        headers = {}
        if signed:
            signature = RequestValidator(self.auth_token).compute_signature(record.url, record.form)
            headers["X-Twilio-Signature"] = signature
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=10)
        try:
            response = await self.http.post(record.url, data=record.form, headers=headers)
            record.status_code = response.status_code
            if response.status_code == 200:
                record.twiml = response.text
        except httpx.HTTPError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        return record

    async def fetch_whisper(
        self,
        call: FakeCall,
        target: str,
        url: str,
        *,
        signed: bool = True,
        parent: str | None = None,
    ) -> TwimlFetch:
        """The dialled party answers: fetch the `<Number url>` like Twilio (a signed POST
        about the new leg, naming the caller's call, or `parent`, as ParentCallSid) and keep
        what came back. Unsigned, to test that it is refused."""
        form = {
            "AccountSid": call.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": "CA" + secrets.token_hex(16),
            "ParentCallSid": parent if parent is not None else call.sid,
            "CallStatus": "in-progress",
            "Direction": "outbound-dial",
            "From": call.from_,
            "To": target,
        }
        record = await self._fetch_twiml(TwimlFetch(url, target, form), signed=signed)
        self.whispers.append(record)
        return record

    async def end_dial(self, call: FakeCall, dial_status: str = "completed") -> TwimlFetch:
        """The call's current `<Dial>` ends (``completed`` after a conversation, ``no-answer``,
        ``busy``, ``failed``…): POST its `action` like Twilio and keep the caller's next TwiML."""
        root = ET.fromstring(call.twiml or "<Response/>")
        dial = root.find("Dial")
        if dial is None or not dial.get("action"):
            raise ValueError("the call's TwiML has no <Dial action>")
        target = next(((noun.text or "").strip() for noun in dial), "")
        form = {
            "AccountSid": call.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": call.sid,
            "CallStatus": "in-progress",
            "DialCallStatus": dial_status,
            "DialCallSid": "CA" + secrets.token_hex(16),
            "DialCallDuration": "42" if dial_status == "completed" else "0",
            "From": call.from_,
            "To": call.to,
        }
        record = await self._fetch_twiml(
            TwimlFetch(dial.get("action", ""), target, form), signed=True
        )
        self.dial_ends.append(record)
        return record

    # ---------------------------------------------------- playing the far end

    def answer(self, sid: str) -> None:
        """The callee picks up (when `auto_answer` is off)."""
        call = self.calls[sid]
        if not call.is_ended:
            self._set_status(call, "ringing")
            self._set_status(call, "in-progress")

    def end_call(self, sid: str, status: str = "completed") -> None:
        """The other party hangs up (or the call fails: ``busy``, ``no-answer``, ``failed``)."""
        if status not in ENDED:
            raise ValueError(f"{status!r} is not an ended status ({', '.join(sorted(ENDED))})")
        call = self.calls[sid]
        if not call.is_ended:
            self._set_status(call, status)

    async def mark_answered_by(
        self, sid: str, answered_by: str, detection_ms: int = 2300
    ) -> Callback | None:
        """Deliver an answering-machine-detection verdict (``human``, ``machine_end_beep``…).

        Posts it to the call's ``AsyncAmdStatusCallback`` when the create request asked for
        asynchronous AMD; returns that callback (None when there was nowhere to send it).
        """
        call = self.calls[sid]
        call.answered_by = answered_by
        call.date_updated = _now()
        url = call.create_params.get("AsyncAmdStatusCallback")
        if call.create_params.get("AsyncAmd", "").lower() != "true" or not url:
            return None
        form = {
            "AccountSid": call.account_sid,
            "AnsweredBy": answered_by,
            "CallSid": call.sid,
            "MachineDetectionDuration": str(detection_ms),
        }
        return await self._post_callback("amd", url, form)

    # ------------------------------------------------------------- requests

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, self.account_sid) and secrets.compare_digest(
            password, self.auth_token
        )


async def _form(request: Request) -> dict[str, list[str]]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return parse_qs(body, keep_blank_values=True)


def _not_found(path: str) -> JSONResponse:
    return twilio_error(404, 20404, f"The requested resource {path} was not found")


def _dial_target(twiml: str) -> str | None:
    """The first `<Dial>`ed `<Number>`/`<Sip>` of `twiml`, if any."""
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError:
        return None
    for dial in root.iter("Dial"):
        for noun in dial:
            if noun.tag in ("Number", "Sip") and (noun.text or "").strip():
                return (noun.text or "").strip()
    return None


def _has_hangup(twiml: str) -> bool:
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError:
        return False
    return root.find("Hangup") is not None or root.find("Reject") is not None


def build_fake_twilio_rest(account_sid: str, auth_token: str) -> tuple[FastAPI, FakeTwilioState]:
    """The fake's ASGI app and its state (serve the app; assert on and drive the state)."""
    state = FakeTwilioState(account_sid, auth_token)
    app = FastAPI(title="fake Twilio REST API", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.fake_twilio = state

    @app.middleware("http")
    async def record_and_authenticate(request: Request, call_next: Any) -> Response:
        lists = await _form(request) if request.method == "POST" else {}
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            form={k: v[-1] for k, v in lists.items()},
            form_lists=lists,
            authorized=state._authorized(request),
        )
        state.requests.append(record)
        request.state.form = lists
        if not record.authorized:
            response: Response = twilio_error(
                401,
                20003,
                "Authenticate",
                detail="Your AccountSid or AuthToken was incorrect.",
            )
        elif state.fail_status is not None:
            response = twilio_error(state.fail_status, 20500, "Internal Server Error")
        else:
            response = await call_next(request)
        record.status = response.status_code
        return response

    def _account_ok(account: str) -> bool:
        return account == state.account_sid

    @app.post(API + "/Accounts/{account}/Calls.json")
    async def create_call(account: str, request: Request) -> Response:
        if not _account_ok(account):
            return _not_found(request.url.path)
        lists: dict[str, list[str]] = request.state.form
        form = {k: v[-1] for k, v in lists.items()}
        if not form.get("To"):
            return twilio_error(400, 21201, "No 'To' number is specified")
        if not form.get("From"):
            return twilio_error(400, 21213, "No 'From' number is specified")
        if not (form.get("Twiml") or form.get("Url") or form.get("ApplicationSid")):
            return twilio_error(400, 21205, "Url parameter is required.")
        events = {e.strip().lower() for e in lists.get("StatusCallbackEvent", []) if e.strip()}
        call = FakeCall(
            sid="CA" + secrets.token_hex(16),
            account_sid=account,
            to=form["To"],
            from_=form["From"],
            create_params=form,
            status_callback_events=events or {"completed"},
            twiml=form.get("Twiml"),
            url=form.get("Url"),
        )
        if call.twiml:
            call.twiml_history.append(call.twiml)
        state.calls[call.sid] = call
        state._set_status(call, "queued")
        body = call.resource()
        if state.auto_answer:
            state.answer(call.sid)
        async with state.created:
            state.created.notify_all()
        state._run_hook(state.on_create, "on_create", call)
        return JSONResponse(body, status_code=201)

    @app.get(API + "/Accounts/{account}/Calls/{sid}.json")
    async def fetch_call(account: str, sid: str, request: Request) -> Response:
        call = state.calls.get(sid)
        if not _account_ok(account) or call is None:
            return _not_found(request.url.path)
        return JSONResponse(call.resource())

    @app.post(API + "/Accounts/{account}/Calls/{sid}.json")
    async def update_call(account: str, sid: str, request: Request) -> Response:
        call = state.calls.get(sid)
        if not _account_ok(account) or call is None or call.is_ended:
            return _not_found(request.url.path)
        form = {k: v[-1] for k, v in request.state.form.items()}
        status = form.get("Status")
        if status is not None:
            status = status.lower()
            if status == "completed":
                state._set_status(call, "completed" if call.status == "in-progress" else "canceled")
            elif status == "canceled":
                if call.status in ("queued", "ringing"):
                    state._set_status(call, "canceled")
            else:
                return twilio_error(
                    400, 21218, f"Invalid Status '{form['Status']}': use completed or canceled"
                )
            return JSONResponse(call.resource())
        twiml, url = form.get("Twiml"), form.get("Url")
        if twiml:
            call.twiml = twiml
            call.twiml_history.append(twiml)
            call.date_updated = _now()
            state._run_hook(state.on_update, "on_update", call, twiml)
            for target, whisper_url in whisper_targets(twiml):  # the callee picks up
                state._spawn(state.fetch_whisper(call, target, whisper_url), "whisper")
            dialled = _dial_target(twiml)
            if call.caller is not None and dialled is not None:  # the call leaves the stream
                call.caller.end_from_carrier("transfer", dialled)
            if _has_hangup(twiml):
                state._set_status(call, "completed")
            if state.update_answer_delay_s > 0:
                await asyncio.sleep(state.update_answer_delay_s)
        elif url:
            call.url = url
            call.date_updated = _now()
            state._run_hook(state.on_update, "on_update", call, None)
        return JSONResponse(call.resource())

    return app, state


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serve_fake_twilio_rest(
    account_sid: str, auth_token: str
) -> AsyncIterator[tuple[FakeTwilioState, str]]:
    """Serve the fake on a free loopback port: ``async with … as (state, base_url)``."""
    import uvicorn

    app, state = build_fake_twilio_rest(account_sid, auth_token)
    sock = _loopback_socket()
    port = sock.getsockname()[1]
    # log_config=None: a simulator must not reconfigure the process's uvicorn loggers
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", access_log=False, log_config=None
    )
    server = uvicorn.Server(config)
    # The socket is already listening, so clients can connect at once: the kernel queues
    # them until uvicorn accepts.
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield state, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await state.aclose()
        sock.close()
