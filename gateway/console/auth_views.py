"""Signing in and out of the console, and the one-time sign-in codes ``gateway demo`` prints."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from gateway.admin.keys_api import check_admin_token, require_admin
from gateway.console.web import (
    COOKIE_PATH,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    checked_post,
    console_sessions,
    current_session,
    new_signin_token,
    render,
    same_token,
    set_cookie,
    start_session_cookie,
    to_signin,
)
from gateway.errors import GatewayError

SIGNIN_FORM_SECONDS = 3600


async def signin_page(request: Request) -> Response:
    sessions = console_sessions(request)
    code = request.query_params.get("code")
    if code is not None:
        if not await sessions.redeem(code):
            return _signin_form(request, "This sign-in link has expired or was already used.", status=401)
        # A page, not a redirect: a SameSite=Strict cookie set in a navigation that started on another site
        # (a terminal, a chat) would not be sent on the redirect that follows it.
        response = render("signed_in.html")
        start_session_cookie(request, response, await sessions.create())
        return response
    if await current_session(request) is not None:
        return RedirectResponse("/admin/ui/usage", status_code=303, headers=SECURITY_HEADERS)
    return _signin_form(request)


def _signin_form(request: Request, error: str | None = None, *, status: int = 200) -> Response:
    token = new_signin_token()
    response = render("signin.html", status=status, csrf=token, error=error)
    set_cookie(request, response, SIGNIN_COOKIE, token, SIGNIN_FORM_SECONDS)
    return response


async def signin(request: Request) -> Response:
    sessions = console_sessions(request)
    form = await request.form(max_files=0, max_fields=8)
    if not same_token(request.cookies.get(SIGNIN_COOKIE), form.get("csrf")):
        return _signin_form(request, "The sign-in form expired; please try again.", status=403)
    given = form.get("token")
    try:
        await check_admin_token(request, given if isinstance(given, str) else None)
    except GatewayError as err:
        if err.status == 429:
            return _signin_form(request, "Too many failed sign-ins from your address; wait and try again.",
                                status=429)
        return _signin_form(request, "That is not the admin token.", status=401)
    response = RedirectResponse("/admin/ui/usage", status_code=303, headers=SECURITY_HEADERS)
    start_session_cookie(request, response, await sessions.create())
    return response


async def signout(request: Request) -> Response:
    posted = await checked_post(request)
    if posted is not None:
        await console_sessions(request).end(posted[0].token)
    response = to_signin()
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


async def issue_code(request: Request) -> Response:
    """``POST /admin/console/codes`` (admin token): a one-time sign-in link, valid for ten minutes."""
    await require_admin(request)
    code = await console_sessions(request).issue_code()
    return JSONResponse({"url": f"/admin/ui/signin?code={code}"}, status_code=201,
                        headers={"cache-control": "no-store"})
