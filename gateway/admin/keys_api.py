"""The admin API for gateway keys (SPEC §6): create, list, revoke.

Every /admin route takes ``Authorization: Bearer $GATEWAY_ADMIN_TOKEN`` (compared in
constant time); a missing or wrong token is a 401 and counts as a failed authentication
for the brute-force guard (apart from API keys; a right token is always served). Without
``GATEWAY_ADMIN_TOKEN`` every /admin route answers the
gateway's usual 404, as if it did not exist. The token and keys are never logged; the
plaintext key appears once, in the body of the 201 that created it.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.auth.authenticator import bearer_token, token_matches
from gateway.auth.keystore import KeyStore, key_object
from gateway.errors import AdminUnauthorized, NotFound, ServiceUnavailable
from gateway.http.body import parse_json_object, read_body
from gateway.http.context import gateway_of

log = logging.getLogger("gateway.admin")


async def require_admin(request: Request) -> None:
    """Raise unless the request carries the admin token (404 when the admin API is off)."""
    await check_admin_token(request, bearer_token(request.headers.get("authorization")))


async def check_admin_token(request: Request, given: str | None) -> None:
    """Raise unless ``given`` is the admin token (404 when the admin API is off); failures count in the guard."""
    gw = gateway_of(request)
    token = gw.settings.admin_token
    if token is None:
        raise NotFound(f"Invalid URL ({request.method} {request.url.path})")

    async def check() -> None:
        if not token_matches(given, token):
            raise AdminUnauthorized()

    if gw.guard is None:
        await check()
    else:
        await gw.guard.authenticate(request, check, "admin")


def _keystore(request: Request) -> KeyStore:
    store = gateway_of(request).keystore
    if store is None:
        raise ServiceUnavailable("The gateway's key store is not configured.")
    return store  # type: ignore[no-any-return]


async def create_key(request: Request) -> Response:
    await require_admin(request)
    body = parse_json_object(await read_body(request, gateway_of(request).settings.max_body_bytes))
    created = await _keystore(request).create(body)
    log.info("admin: created key %s for user %s", created.record.id, created.record.user)
    # The only response that ever carries a plaintext key: keep it out of every cache.
    return JSONResponse(created.as_dict(), status_code=201, headers={"cache-control": "no-store"})


async def list_keys(request: Request) -> Response:
    await require_admin(request)
    records = await _keystore(request).list(request.query_params.get("user"))
    return JSONResponse({"data": [key_object(r) for r in records]})


async def revoke_key(request: Request) -> Response:
    await require_admin(request)
    key_id = request.path_params["key_id"]
    if not await _keystore(request).revoke(key_id):
        # The id is not echoed: a plaintext key pasted in its place must not come back in a body or log.
        raise NotFound("No key with that id.", param="id")
    log.info("admin: revoked key %s", key_id)
    return Response(status_code=204)


ADMIN_ROUTES = [
    Route("/admin/keys", create_key, methods=["POST"]),
    Route("/admin/keys", list_keys, methods=["GET"]),
    Route("/admin/keys/{key_id}", revoke_key, methods=["DELETE"]),
]
