"""The public URLs Twilio uses to reach us, which is what its signatures are computed over.

Behind a proxy or a load balancer the URL the app sees (http://10.0.0.7:8080/twiml) is not the
one Twilio signed (https://calls.example.com/twiml). `PUBLIC_URL` says what it is. Forwarded
headers (`X-Forwarded-Proto/-Host`) are believed only from a peer in `TRUSTED_PROXIES`
(`livecall.server.forwarded`): from anyone else they are ignored, so a client cannot choose the
host the TwiML's stream URL or an outbound call's callbacks point at. Without either, the
request's own scheme and Host are used.
"""

from __future__ import annotations

from starlette.datastructures import URL, Headers

from livecall.server.forwarded import TrustedProxies, forwarded_base

__all__ = ["public_base", "public_url_of", "signature_urls", "ws_base"]

_NOBODY = TrustedProxies()


def _own_base(url: URL, headers: Headers) -> str:
    proto = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    return f"{proto}://{headers.get('host', '') or url.netloc}"


def public_base(
    url: URL,
    headers: Headers,
    configured: str | None,
    *,
    peer: str | None = None,
    trusted: TrustedProxies = _NOBODY,
) -> str:
    """https://host[:port] (no trailing slash) as Twilio sees this server."""
    if configured:
        return configured.rstrip("/")
    return forwarded_base(url, headers, peer, trusted) or _own_base(url, headers)


def _with_path(base: str, url: URL) -> str:
    full = base + url.path
    if url.query:
        full += "?" + url.query
    return full


def public_url_of(
    url: URL,
    headers: Headers,
    configured: str | None,
    *,
    peer: str | None = None,
    trusted: TrustedProxies = _NOBODY,
) -> str:
    """The full public URL of this request, query string included (as Twilio signed it)."""
    return _with_path(public_base(url, headers, configured, peer=peer, trusted=trusted), url)


def signature_urls(
    url: URL,
    headers: Headers,
    configured: str | None,
    *,
    peer: str | None,
    trusted: TrustedProxies,
) -> list[str]:
    """Every URL a genuine signature of this request may be over, most likely first.

    `PUBLIC_URL` when set, and the forwarded URL when a trusted proxy says what the client
    asked for (a second public name, a proxy in front of the configured one); with neither,
    the request's own URL. ws(s):// for a WebSocket request, as Twilio signs the upgrade.
    """
    bases: list[str] = []
    if configured:
        bases.append(configured.rstrip("/"))
    forwarded = forwarded_base(url, headers, peer, trusted)
    if forwarded:
        bases.append(forwarded)
    if not bases:
        bases.append(_own_base(url, headers))
    websocket = url.scheme in ("ws", "wss")
    out: list[str] = []
    for base in bases:
        full = _with_path(ws_base(base) if websocket else base, url)
        if full not in out:
            out.append(full)
    return out


def ws_base(http_base: str) -> str:
    if http_base.startswith("https://"):
        return "wss://" + http_base[len("https://") :]
    if http_base.startswith("http://"):
        return "ws://" + http_base[len("http://") :]
    return http_base
