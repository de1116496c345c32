"""Image routes: thin front doors that read and check the body, then hand the request to the pipeline."""

from __future__ import annotations

import orjson
from starlette.requests import Request

from gateway.auth.authenticator import Principal
from gateway.errors import GatewayError
from gateway.http.body import parse_json_object, read_body
from gateway.http.context import gateway_of, received_of, request_id_of
from gateway.http.form import read_form
from gateway.idempotency.fingerprint import form_fingerprint, json_fingerprint
from gateway.jobs.submit import enqueue, reserve, wants_async
from gateway.pipeline.edit_rules import validate_edit
from gateway.pipeline.gateway import Gateway
from gateway.pipeline.lifecycle import Arrival, Prepare, Prepared, handle
from gateway.pipeline.onbehalf import upstream_user
from gateway.pipeline.request import EDITS, GENERATIONS, stored_as_urls, validate_image_request
from gateway.upstream.client import EDITS_PATH
from gateway.upstream.form_body import FormBody


def arrival_of(request: Request, route: str) -> Arrival:
    received, received_ms = received_of(request)
    return Arrival(request, request_id_of(request), route, received, received_ms)


async def create_image(request: Request) -> object:
    """``POST /v1/images/generations``: a JSON body (SPEC §2)."""
    gw = gateway_of(request)

    async def prepare(principal: Principal) -> Prepared:
        data = parse_json_object(await read_body(request, gw.settings.max_body_bytes))
        image = validate_image_request(data, gw.settings)
        # What goes upstream is the request as validated, whatever the client's bytes or content type.
        data["model"] = image.model
        if "user" in data:
            data["user"] = upstream_user(principal.user)
        upstream = {k: v for k, v in data.items() if k != "response_format"} if stored_as_urls(image) else data
        return Prepared(image, orjson.dumps(upstream), fingerprint=lambda: json_fingerprint(data))

    return await _handle(gw, request, GENERATIONS, prepare)


async def edit_image(request: Request) -> object:
    """``POST /v1/images/edits``: a multipart form, its files spooled and forwarded byte for byte (SPEC §2.1)."""
    gw = gateway_of(request)

    async def prepare(principal: Principal) -> Prepared:
        form = await read_form(request, gw.settings.max_edit_body_bytes)
        try:
            image = validate_edit(form.fields, form.files, gw.settings)
        except GatewayError:
            form.close()
            raise
        # The validated fields, as for generations: the model applied, the user made opaque.
        fields = [(name, upstream_user(principal.user) if name == "user" else value) for name, value in form.fields]
        if image.model_defaulted:
            fields.append(("model", image.model))
        files = [(f.field, f.filename, f.content_type, f.file) for f in form.files]
        upstream = [(n, v) for n, v in fields if n != "response_format"] if stored_as_urls(image) else fields
        return Prepared(image, FormBody(upstream, form.files), path=EDITS_PATH,
                        fingerprint=lambda: form_fingerprint(fields, files))

    return await _handle(gw, request, EDITS, prepare)


async def _handle(gw: Gateway, request: Request, route: str, prepare: Prepare) -> object:
    """The pipeline for ``route``: the upstream call, or a job's submission on ``Prefer: respond-async`` (SPEC §10)."""
    if wants_async(request):
        return await handle(gw, arrival_of(request, route), prepare, admit_with=reserve, then=enqueue)
    return await handle(gw, arrival_of(request, route), prepare)
