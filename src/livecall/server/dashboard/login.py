"""The dashboard's login and logout handlers: one API token in, a signed session cookie out
(the checks themselves are `dashboard.auth`'s)."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, Response
from fastapi.responses import RedirectResponse

from livecall.server.dashboard.auth import (
    SESSION_COOKIE,
    LoginThrottle,
    is_https,
    safe_next,
    same_origin,
)
from livecall.server.dashboard.core import Ctx, log
from livecall.server.forwarded import client_ip

__all__ = ["login", "login_page", "logout"]


async def login_page(dash: Ctx, request: Request, next: str | None = None) -> Response:
    if dash.current(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return dash.render(request, "login.html", None, next=safe_next(next), error=None)


async def login(dash: Ctx, request: Request) -> Response:
    form = await dash.read_form(request)
    target = safe_next(form.get("next"))
    peer = request.client.host if request.client else None
    client = LoginThrottle.client_key(client_ip(peer, request.headers, dash.trusted))
    if not same_origin(request.url, request.headers, dash.settings.public_url, required=False):
        raise HTTPException(403, "cross-origin request refused")
    if dash.throttle.blocked(client):
        log.warning("dashboard.login_throttled", client=client)
        return dash.render(
            request,
            "login.html",
            None,
            429,
            next=target,
            error="Too many failed attempts. Wait a few minutes and try again.",
        )
    given = form.get("token", "")
    if dash.token:
        ok = hmac.compare_digest(given.encode(), dash.token.encode())
    else:  # local-only: loopback clients only, no token to check
        ok = dash.local.is_local(request.scope, request.headers)
    if not ok:
        dash.throttle.failed(client)
        log.warning("dashboard.login_failed", client=client)
        return dash.render(
            request, "login.html", None, 401, next=target, error="That token is not right."
        )
    dash.throttle.succeeded(client)
    log.info("dashboard.login", client=client)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        dash.sessions.issue(),
        max_age=int(dash.sessions.ttl_s),
        path="/",
        httponly=True,
        secure=is_https(request.url, request.headers),
        samesite="strict",
    )
    return response


async def logout(dash: Ctx, request: Request) -> Response:
    form = await dash.read_form(request)
    session = dash.current(request)
    if session is not None:
        dash.check_post(request, session, form)
        dash.sessions.revoke(session)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
