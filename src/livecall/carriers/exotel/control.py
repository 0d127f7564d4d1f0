"""Exotel REST call control, over `httpx` (Exotel has no maintained official Python SDK).

Exotel's v1 Calls API (HTTP Basic: API key as user, API token as password) can place calls
and read them back; it has no documented verb to hang up or redirect a call that is in a
flow. So:

- **outbound**: `connect_stream` ("Connect Voice AI": dial `From`, then stream it straight
  to livecall's WebSocket, `StreamType=bidirectional`) or `connect_flow` (dial, then run an
  App Bazaar flow that holds the Voicebot applet);
- **hang up**: close the stream's WebSocket; the flow's next applet (Hangup) ends the call,
  and a direct Connect Voice AI call ends with the socket;
- **transfer**: close the stream with a Connect applet next in the flow (its "Dial whom" can
  be a URL livecall answers); there is no REST transfer for a call in a Voicebot applet.

`base_url` defaults to the Mumbai cluster and is overridable (Singapore, or a fake).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "MUMBAI",
    "SINGAPORE",
    "ExotelCall",
    "ExotelClient",
    "ExotelError",
]

MUMBAI = "https://api.in.exotel.com"
SINGAPORE = "https://api.exotel.com"


class ExotelError(RuntimeError):
    """Exotel refused a request: its HTTP status and message (never the credentials)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Exotel API error {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class ExotelCall:
    """The `Call` object Exotel answers with (the fields livecall uses)."""

    sid: str
    status: str | None = None
    direction: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    raw: dict[str, Any] | None = None


def _call_from(body: Any) -> ExotelCall:
    call = body.get("Call") if isinstance(body, dict) else None
    if not isinstance(call, dict) or not isinstance(call.get("Sid"), str) or not call["Sid"]:
        raise ExotelError(502, "the answer holds no Call with a Sid")
    return ExotelCall(
        sid=call["Sid"],
        status=call.get("Status"),
        direction=call.get("Direction"),
        from_number=call.get("From"),
        to_number=call.get("To"),
        raw=call,
    )


class ExotelClient:
    """The few v1 Calls API requests livecall makes; one `httpx.AsyncClient` per client."""

    def __init__(
        self,
        account_sid: str,
        api_key: str,
        api_token: str,
        *,
        base_url: str = MUMBAI,
        timeout: float = 10.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if not account_sid or not api_key or not api_token:
            raise ValueError("Exotel needs an account SID, an API key and an API token")
        self.account_sid = account_sid
        self.base_url = base_url.rstrip("/")
        self._auth = httpx.BasicAuth(api_key, api_token)
        self._own = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout, trust_env=False)

    def __repr__(self) -> str:
        return f"ExotelClient(account_sid={self.account_sid!r}, base_url={self.base_url!r})"

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    def _url(self, path: str) -> str:
        return f"{self.base_url}/v1/Accounts/{self.account_sid}/{path}"

    async def _request(
        self, method: str, path: str, data: list[tuple[str, str]] | None = None
    ) -> Any:
        form: dict[str, str | list[str]] | None = None
        if data is not None:
            form = {}
            for key, value in data:
                prev = form.get(key)
                form[key] = (
                    value if prev is None else [*([prev] if isinstance(prev, str) else prev), value]
                )
        resp = await self._http.request(method, self._url(path), data=form, auth=self._auth)
        if resp.status_code >= 400:
            message = resp.reason_phrase
            try:
                body = resp.json()
                exc = body.get("RestException", {}) if isinstance(body, dict) else {}
                message = str(exc.get("Message") or message)[:200]
            except ValueError:
                pass
            raise ExotelError(resp.status_code, message)
        try:
            return resp.json()
        except ValueError:
            raise ExotelError(resp.status_code, "the answer is not JSON") from None

    async def connect_stream(
        self,
        to: str,
        caller_id: str,
        stream_url: str,
        *,
        record: bool = False,
        time_limit_s: int | None = None,
        status_callback: str | None = None,
        custom_field: str | None = None,
    ) -> ExotelCall:
        """Connect Voice AI: dial `to` from `caller_id` (an ExoPhone), stream it to livecall."""
        if not stream_url.startswith(("ws://", "wss://")) or len(stream_url) > 600:
            raise ValueError("StreamUrl must be a ws:// or wss:// URL of at most 600 characters")
        data: list[tuple[str, str]] = [
            ("From", to),
            ("CallerId", caller_id),
            ("StreamUrl", stream_url),
            ("StreamType", "bidirectional"),
            ("Record", "true" if record else "false"),
        ]
        data += self._common(time_limit_s, status_callback, custom_field)
        return _call_from(await self._request("POST", "Calls/connect.json", data))

    async def connect_flow(
        self,
        to: str,
        caller_id: str,
        flow_url: str,
        *,
        time_limit_s: int | None = None,
        status_callback: str | None = None,
        custom_field: str | None = None,
    ) -> ExotelCall:
        """Dial `to`, then run the App Bazaar flow at `flow_url` (its Voicebot applet streams)."""
        data: list[tuple[str, str]] = [("From", to), ("CallerId", caller_id), ("Url", flow_url)]
        data += self._common(time_limit_s, status_callback, custom_field)
        return _call_from(await self._request("POST", "Calls/connect.json", data))

    async def call_details(self, call_sid: str) -> ExotelCall:
        """The call as Exotel has it now (status, direction...)."""
        if not call_sid or "/" in call_sid:
            raise ValueError("not a call SID")
        return _call_from(await self._request("GET", f"Calls/{call_sid}.json"))

    @staticmethod
    def _common(
        time_limit_s: int | None, status_callback: str | None, custom_field: str | None
    ) -> list[tuple[str, str]]:
        data: list[tuple[str, str]] = []
        if time_limit_s is not None:
            if not 1 <= time_limit_s <= 14400:
                raise ValueError("TimeLimit is 1 to 14400 seconds")
            data.append(("TimeLimit", str(time_limit_s)))
        if status_callback:
            data.append(("StatusCallback", status_callback))
            data += [("StatusCallbackEvents[]", e) for e in ("answered", "terminal")]
        if custom_field is not None:
            if len(custom_field) > 128:
                raise ValueError("CustomField is at most 128 characters")
            data.append(("CustomField", custom_field))
        return data
