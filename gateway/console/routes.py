"""The console's URL map, and its static assets served from the package (no CDN, works offline)."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.console import auth_views, pages
from gateway.console.web import SECURITY_HEADERS, console_sessions
from gateway.errors import NotFound

_ASSETS = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}


async def home(request: Request) -> Response:
    console_sessions(request)  # 404 when the console is off
    return RedirectResponse("/admin/ui/usage", status_code=303, headers=SECURITY_HEADERS)


async def asset(request: Request) -> Response:
    console_sessions(request)
    name = request.path_params["name"]
    if name not in _ASSETS:
        raise NotFound(f"Invalid URL ({request.method} {request.url.path})")
    body = resources.files("gateway.console").joinpath("static", name).read_bytes()
    return Response(body, media_type=_ASSETS[name], headers={**SECURITY_HEADERS, "cache-control": "max-age=3600"})


CONSOLE_ROUTES = [
    Route("/admin/ui", home, methods=["GET"]),
    Route("/admin/ui/", home, methods=["GET"]),  # else Starlette's slash redirect answers 307 with the console off
    Route("/admin/ui/signin", auth_views.signin_page, methods=["GET"]),
    Route("/admin/ui/signin", auth_views.signin, methods=["POST"]),
    Route("/admin/ui/signout", auth_views.signout, methods=["POST"]),
    Route("/admin/ui/keys", pages.keys_page, methods=["GET"]),
    Route("/admin/ui/keys", pages.create_key, methods=["POST"]),
    Route("/admin/ui/keys/{key_id}/revoke", pages.revoke_confirm, methods=["GET"]),
    Route("/admin/ui/keys/{key_id}/revoke", pages.revoke_key, methods=["POST"]),
    Route("/admin/ui/usage", pages.usage_page, methods=["GET"]),
    Route("/admin/ui/live", pages.live_page, methods=["GET"]),
    Route("/admin/ui/records", pages.records_page, methods=["GET"]),
    Route("/admin/ui/records/export", pages.records_export, methods=["GET"]),
    Route("/admin/ui/static/{name}", asset, methods=["GET"]),
    Route("/admin/console/codes", auth_views.issue_code, methods=["POST"]),
]
