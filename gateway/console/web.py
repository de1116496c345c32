"""Rendering and protection shared by every console page: templates, security headers, session, CSRF."""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.console.charts import money, thousands
from gateway.console.sessions import SESSION_SECONDS, ConsoleSessions, Session
from gateway.errors import GatewayError, NotFound
from gateway.http.context import gateway_of
from gateway.redisdb.keys import RedisKeys

SESSION_COOKIE = "igw_console"
SIGNIN_COOKIE = "igw_signin"  # CSRF for the sign-in form itself (there is no session yet)
COOKIE_PATH = "/admin/ui"
# No inline script or style anywhere: every page works under this policy.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

templates = Environment(loader=PackageLoader("gateway.console", "templates"),
                        autoescape=select_autoescape(default=True, default_for_string=True))
templates.filters["thousands"] = thousands
templates.filters["usd"] = lambda text: money(round(float(text) * 1_000_000))


class CsrfRefused(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "csrf_token_invalid"


def console_sessions(request: Request) -> ConsoleSessions:
    """The session store, or the gateway's usual 404 when the admin API (and so the console) is off."""
    gw = gateway_of(request)
    if gw.settings.admin_token is None or gw.redis is None:
        raise NotFound(f"Invalid URL ({request.method} {request.url.path})")
    return ConsoleSessions(gw.redis, RedisKeys(gw.settings.redis.key_prefix))


def render(template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    html = templates.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


async def current_session(request: Request) -> Session | None:
    return await console_sessions(request).find(request.cookies.get(SESSION_COOKIE))


def to_signin() -> Response:
    return RedirectResponse("/admin/ui/signin", status_code=303, headers=SECURITY_HEADERS)


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def start_session_cookie(request: Request, response: Response, session: Session) -> None:
    set_cookie(request, response, SESSION_COOKIE, session.token, SESSION_SECONDS)
    response.delete_cookie(SIGNIN_COOKIE, path=COOKIE_PATH)


def new_signin_token() -> str:
    return secrets.token_urlsafe(24)


def same_token(expected: str | None, given: Any) -> bool:
    if not expected or not isinstance(given, str):
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


async def require_csrf(session: Session, form: Any) -> None:
    """A POST must carry the session's CSRF token (403 otherwise): another site cannot post for the operator."""
    if not same_token(session.csrf, form.get("csrf")):
        raise CsrfRefused("This form is missing its CSRF token or it is stale; reload the page and try again.")


async def checked_post(request: Request, max_fields: int = 8) -> tuple[Session, FormData] | None:
    """A signed-in operator's form, its CSRF token checked (403 without it); None when not signed in."""
    session = await current_session(request)
    if session is None:
        return None
    form = await request.form(max_files=0, max_fields=max_fields)
    await require_csrf(session, form)
    return session, form
