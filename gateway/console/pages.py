"""The console's pages: keys, usage, live state and records; each a linkable URL (SPEC §11)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from gateway.admin.queries import MEDIA_TYPES, parse_format, parse_range, parse_user
from gateway.auth.keystore import KeyStore, key_object
from gateway.config import LIMIT_NAMES
from gateway.console import data
from gateway.console.charts import bar_chart, money, thousands
from gateway.console.web import SECURITY_HEADERS, checked_post, current_session, render, to_signin
from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable
from gateway.http.context import gateway_of
from gateway.metering.ledger import export_lines, iter_records, known_users
from gateway.metering.metrics import render as render_metrics
from gateway.redisdb.keys import RedisKeys

log = logging.getLogger("gateway.admin")  # the admin API's audit lines: one log for keys made or revoked anywhere

PAGE_SIZE = 50


def keystore(request: Request) -> KeyStore:
    store = gateway_of(request).keystore
    if store is None:
        raise ServiceUnavailable("The gateway's key store is not configured.")
    return store


def _keys(request: Request) -> RedisKeys:
    return RedisKeys(gateway_of(request).settings.redis.key_prefix)


def _query_user(request: Request, name: str = "user") -> str | None:
    value = request.query_params.get(name) or None
    return None if value is None else parse_user(value, required=False, param=name)


async def keys_page(request: Request) -> Response:
    session = await current_session(request)
    if session is None:
        return to_signin()
    return await _render_keys(request, session.csrf)


async def _render_keys(request: Request, csrf: str, *, status: int = 200, error: GatewayError | None = None,
                       form: dict[str, Any] | None = None) -> Response:
    gw = gateway_of(request)
    user = request.query_params.get("user") or (form or {}).get("user") or ""
    keys, problem = [], error
    if user:
        try:
            keys = [key_object(r) for r in await keystore(request).list(parse_user(user, required=True))]
        except GatewayError as err:
            problem = problem or err
    return render("keys.html", status=status, page="keys", csrf=csrf, user=user, keys=keys, error=problem,
                  form=form or {}, plans=sorted(gw.settings.plans), models=list(gw.settings.models),
                  limit_names=LIMIT_NAMES, revoked=request.query_params.get("revoked"))


async def create_key(request: Request) -> Response:
    posted = await checked_post(request, max_fields=64)
    if posted is None:
        return to_signin()
    session, form = posted
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        created = await keystore(request).create(_key_body(form))
    except GatewayError as err:
        return await _render_keys(request, session.csrf, status=err.status, error=err, form=fields)
    log.info("console: created key %s for user %s", created.record.id, created.record.user)
    return render("key_created.html", page="keys", csrf=session.csrf, key=created.as_dict())


def _key_body(form: Any) -> dict[str, Any]:
    """The admin API's create body from the form (same field names; blanks mean absent)."""
    body: dict[str, Any] = {}
    for name in ("user", "team", "plan", "name", "expires_at", "webhook_url"):
        value = form.get(name)
        if isinstance(value, str) and value.strip():
            body[name] = value.strip()
    models = [m for m in form.getlist("models") if isinstance(m, str)]
    if models:
        body["models"] = models
    limits: dict[str, Any] = {}
    for name in LIMIT_NAMES:
        value = form.get(f"limit_{name}")
        if isinstance(value, str) and value.strip():
            try:
                limits[name] = float(value) if name == "usd_per_month" else int(value)
            except ValueError:
                raise InvalidRequest(f"Invalid '{name}': must be a number.", param=f"limits.{name}") from None
    if limits:
        body["limits"] = limits
    return body


async def revoke_confirm(request: Request) -> Response:
    session = await current_session(request)
    if session is None:
        return to_signin()
    return render("revoke.html", page="keys", csrf=session.csrf, key_id=request.path_params["key_id"],
                  user=request.query_params.get("user", ""))


async def revoke_key(request: Request) -> Response:
    posted = await checked_post(request)
    if posted is None:
        return to_signin()
    _, form = posted
    key_id = request.path_params["key_id"]
    done = await keystore(request).revoke(key_id)
    if done:  # an unknown id is not logged: a plaintext key pasted in its place must not reach the log
        log.info("console: revoked key %s", key_id)
    user = form.get("user") if isinstance(form.get("user"), str) else ""
    target = "/admin/ui/keys?" + urlencode({"user": user, "revoked": key_id if done else ""})
    return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)


async def usage_page(request: Request) -> Response:
    session = await current_session(request)
    if session is None:
        return to_signin()
    gw = gateway_of(request)
    keys, now = _keys(request), datetime.now(UTC)
    try:
        user, team = _query_user(request), _query_user(request, "team")
    except GatewayError as err:  # a page that says what is wrong with the filter, not a JSON error
        return await _render_usage(request, session.csrf, now, [], status=err.status, error=err,
                                   user=request.query_params.get("user", ""),
                                   team=request.query_params.get("team", ""))
    if user:
        users = [user]
    else:
        everyone = await known_users(gw.redis, keys)
        users = everyone if not team else [u for u in everyone if any(
            k.team == team for k in await keystore(request).list(u))]
    return await _render_usage(request, session.csrf, now, users, user=user or "", team=team or "", one_user=user)


async def _render_usage(request: Request, csrf: str, now: datetime, users: list[str], *, user: str, team: str,
                        one_user: str | None = None, status: int = 200, error: GatewayError | None = None,
                        ) -> Response:
    gw, keys = gateway_of(request), _keys(request)
    overview = await data.usage_overview(gw.redis, keys, users, now)
    days = [d.day for d in overview["series"]]
    charts = [bar_chart("Tokens per day", days, [d.tokens for d in overview["series"]], thousands),
              bar_chart("Images per day", days, [d.images for d in overview["series"]], thousands),
              bar_chart("Cost per day", days, [d.usd_micros for d in overview["series"]], money)]
    return render("usage.html", status=status, page="usage", csrf=csrf, user=user, team=team, error=error,
                  today=overview["today"], month=overview["month"], charts=charts,
                  today_label=f"{now:%Y-%m-%d}", month_label=f"{now:%Y-%m}",
                  top_users=await data.top_users(gw.redis, keys, now) if error is None and not one_user else [],
                  top_models=[] if error else await data.top_models(gw.redis, keys, one_user, now))


async def live_page(request: Request) -> Response:
    session = await current_session(request)
    if session is None:
        return to_signin()
    gw = gateway_of(request)
    text, _ = render_metrics(gw.metrics.registry)
    inflight: dict[str, float] = {}
    errors: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "gateway_inflight_requests":
                inflight[sample.labels.get("route", "")] = sample.value
            elif sample.name == "gateway_upstream_errors_total" and sample.value:
                errors[sample.labels.get("reason", "")] = sample.value
    redis_problem = await gw.not_ready_reason()
    return render("live.html", page="live", csrf=session.csrf, inflight=inflight, errors=errors,
                  redis_problem=redis_problem, upstream=gw.settings.upstream.base_url,
                  jobs=getattr(gw, "jobs_summary", None))


def _records_query(request: Request) -> tuple[int, int, str | None, str, str]:
    now = datetime.now(UTC)
    start = request.query_params.get("from") or (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    end = request.query_params.get("to") or (now + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    start_ms, end_ms = parse_range(start, end)
    return start_ms, end_ms, _query_user(request), start, end


async def records_page(request: Request) -> Response:
    session = await current_session(request)
    if session is None:
        return to_signin()
    gw = gateway_of(request)
    try:
        start_ms, end_ms, user, start, end = _records_query(request)
        page_no = max(int(request.query_params.get("page", "0")), 0)
    except (GatewayError, ValueError) as err:
        message = err.message if isinstance(err, GatewayError) else "'page' must be a whole number."
        return render("records.html", status=400, page="records", csrf=session.csrf, error=message, records=[],
                      start=request.query_params.get("from", ""), end=request.query_params.get("to", ""),
                      user=request.query_params.get("user", ""), page_no=0, more=False, query="")
    rows: list[dict[str, Any]] = []
    skip = page_no * PAGE_SIZE
    async for record in iter_records(gw.redis, _keys(request), start_ms, end_ms, user=user):
        if skip:
            skip -= 1
            continue
        rows.append(record)
        if len(rows) > PAGE_SIZE:
            break
    query = urlencode({"from": start, "to": end, **({"user": user} if user else {})})
    return render("records.html", page="records", csrf=session.csrf, records=rows[:PAGE_SIZE], start=start,
                  end=end, user=user or "", page_no=page_no, more=len(rows) > PAGE_SIZE, query=query, error=None)


async def records_export(request: Request) -> Response:
    """The same export as ``GET /admin/usage/records``, for a signed-in browser."""
    session = await current_session(request)
    if session is None:
        return to_signin()
    fmt = parse_format(request.query_params.get("format"))
    start_ms, end_ms, user, _, _ = _records_query(request)
    records = iter_records(gateway_of(request).redis, _keys(request), start_ms, end_ms, user=user)
    return StreamingResponse(export_lines(records, fmt), media_type=MEDIA_TYPES[fmt],
                             headers={**SECURITY_HEADERS,
                                      "content-disposition": f'attachment; filename="usage-records.{fmt}"'})
