"""The public URLs Twilio uses to reach us, which is what its signatures are computed over.

Behind a proxy or a load balancer the URL the app sees (http://10.0.0.7:8080/twiml) is not the
one Twilio signed (https://calls.example.com/twiml). `PUBLIC_URL` says what it is; without it,
the forwarded headers a proxy sets, then the request's own Host, are used.
"""

from __future__ import annotations

from starlette.datastructures import URL, Headers

__all__ = ["public_base", "public_url_of", "ws_base"]


def public_base(url: URL, headers: Headers, configured: str | None) -> str:
    """https://host[:port] (no trailing slash) as Twilio sees this server."""
    if configured:
        return configured.rstrip("/")
    proto = headers.get("x-forwarded-proto", "").split(",")[0].strip()
    host = headers.get("x-forwarded-host", "").split(",")[0].strip() or headers.get("host", "")
    if not proto:
        proto = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    if not host:
        host = url.netloc
    return f"{proto}://{host}"


def public_url_of(url: URL, headers: Headers, configured: str | None) -> str:
    """The full public URL of this request, query string included (as Twilio signed it)."""
    base = public_base(url, headers, configured)
    full = base + url.path
    if url.query:
        full += "?" + url.query
    return full


def ws_base(http_base: str) -> str:
    if http_base.startswith("https://"):
        return "wss://" + http_base[len("https://") :]
    if http_base.startswith("http://"):
        return "ws://" + http_base[len("http://") :]
    return http_base
