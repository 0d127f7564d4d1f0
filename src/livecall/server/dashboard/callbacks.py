""" "Needs a call back": the failed, abandoned and very short calls nobody has dealt with yet,
with when, who, what the caller heard and said, a tap-to-call link and a "handled" mark kept
in the database (so every device and every instance sees the same list)."""

from __future__ import annotations

from fastapi import HTTPException, Request, Response
from fastapi.responses import RedirectResponse

from livecall.server.dashboard.auth import safe_next
from livecall.server.dashboard.core import (
    SID_RE,
    Ctx,
    Unavailable,
    database_errors,
    json_bytes,
    log,
)
from livecall.server.dashboard.words import dial_number
from livecall.store import owner


async def callbacks_page(dash: Ctx, request: Request, show: str | None = None) -> Response:
    session = dash.current(request)
    if session is None:
        return dash.login_redirect(request)
    handled = show == "handled"
    try:
        with database_errors():
            items = await owner.callbacks(dash.repo.sessions, handled=handled)
        await dash.count_callbacks(fresh=True)  # this page and its nav count agree
    except Unavailable:
        return dash.unavailable(request, session)
    rows = []
    for item in items:
        call = item.call
        remote = call.to_number if call.direction == "outbound" else call.from_number
        rows.append({"item": item, "number": remote, "dial": dial_number(remote)})
    return dash.render(
        request,
        "callbacks.html",
        session,
        nav="callbacks",
        rows=rows,
        handled=handled,
        short_s=owner.SHORT_S,
        abandon_s=owner.ABANDON_S,
    )


async def mark_handled(dash: Ctx, request: Request, sid: str) -> Response:
    """Marks a call handled (`handled=1`) or back on the list (`handled=0`)."""
    session = dash.require(request)
    form = await dash.read_form(request)
    dash.check_post(request, session, form)
    if not SID_RE.match(sid):
        raise HTTPException(404, "no such call")
    handled = form.get("handled", "1") != "0"
    try:
        with database_errors():
            found = await owner.mark_handled(dash.repo.sessions, sid, handled)
    except Unavailable as error:
        raise HTTPException(503, "call records database unavailable") from error
    if not found:
        raise HTTPException(404, "no such call")
    await dash.count_callbacks(fresh=True)
    log.info("dashboard.callback_marked", call_sid=sid, handled=handled)
    if "application/json" in request.headers.get("accept", ""):
        return Response(
            json_bytes({"call_sid": sid, "handled": handled, "waiting": dash.callbacks_waiting}),
            200,
            media_type="application/json",
        )
    return RedirectResponse(safe_next(form.get("next") or "/callbacks"), status_code=303)
