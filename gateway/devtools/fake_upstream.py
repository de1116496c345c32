"""A local stand-in for TTAPI: OpenAI's image API with tiny real images, table usage and fault knobs.

Routes: ``POST /v1/images/generations`` and ``/v1/images/edits`` (multipart; ``TT-API-KEY`` auth
for both; an edit's files and fields are recorded in stats, see ``fake_edits``), ``GET /files/{name}`` (dall-e
``url`` results), ``GET /healthz``, ``GET /_fake/stats``, ``POST /_fake/reset``; else a 404.

Usage (gpt-image models): output tokens per image from ``gateway.metering.estimates`` by size and
quality (size ``auto`` is 1024x1024, quality ``auto`` is medium: what the image "came out"
as, while the gateway reserves for high) times ``n``; input text tokens
``estimates.text_tokens(prompt)``; input image tokens ``fake_answers.INPUT_IMAGE_TOKENS`` per
uploaded image of an edit (0 for a generation). A stream (``image_edit.*`` events for an edit) puts usage on its
``image_generation.completed`` events: each has its own image's output tokens and the first
also the input tokens, so they sum to the usage of the same request unstreamed.

Knobs, CLI defaults overridden per request by a body field ``"fake": {...}``: ``latency``
(s before answering), ``event_gap`` (s between SSE events), ``status`` (answer this error),
``hang`` (never answer), ``cut_after`` (drop the connection after N SSE events; unstreamed:
after N body bytes), ``pad_bytes`` (each image about this big), ``usage`` (false: omit it),
``created`` (a fixed timestamp, for byte-identical answers), ``gate`` (hold the answer until
``POST /_fake/gates/NAME`` opens that gate: tests hold requests in flight without timing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.devtools import fake_images
from gateway.devtools.fake_answers import FakeError, FakeOptions, Plan, events, json_body, knobs_of, plan_of
from gateway.devtools.fake_edits import read_edit_form

DEFAULT_PORT = 9090
_FILE = re.compile(r"^([0-9a-f]{16})-(\d+)\.(png|jpeg|webp)$")
_USAGE_FIELDS = ("input_text_tokens", "input_image_tokens", "output_tokens", "total_tokens", "images")


def _zero_usage() -> dict[str, int]:
    return dict.fromkeys(_USAGE_FIELDS, 0)


@dataclass
class Stats:
    """What the fake served, for tests to reconcile with what the gateway metered."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    aborted: int = 0  # the client went away before the answer was complete
    cut: int = 0  # connections dropped on purpose (cut_after)
    files_served: int = 0
    in_flight: int = 0  # generation requests being answered now
    max_in_flight: int = 0  # the most at once since the last reset (pacing tests)
    usage: dict[str, int] = field(default_factory=_zero_usage)
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))

    def reset(self) -> None:
        in_flight = self.in_flight  # requests still being answered end after the reset
        self.__dict__.update(vars(Stats()))
        self.in_flight = self.max_in_flight = in_flight

    def begin(self, request: web.Request) -> dict[str, Any]:
        self.requests += 1
        entry = {"method": request.method, "path": request.path, "status": None, "model": None,
                 "headers": {k.lower(): v for k, v in request.headers.items()}, "raw": None, "body": None}
        self.recent.append(entry)
        return entry

    def answered(self, entry: dict[str, Any], status: int) -> None:
        entry["status"] = status
        self.by_status[status] += 1

    def model(self, name: str) -> dict[str, int]:
        if name not in self.by_model:
            self.by_model[name] = {"requests": 0, **_zero_usage()}
        return self.by_model[name]

    def add_usage(self, model: str, usage: dict[str, Any] | None, images: int) -> None:
        for totals in (self.usage, self.model(model)):
            totals["images"] += images
            if usage:
                totals["input_text_tokens"] += usage["input_tokens_details"]["text_tokens"]
                totals["input_image_tokens"] += usage["input_tokens_details"]["image_tokens"]
                totals["output_tokens"] += usage["output_tokens"]
                totals["total_tokens"] += usage["total_tokens"]

    def as_json(self) -> dict[str, Any]:
        by_status = {str(k): v for k, v in sorted(self.by_status.items())}
        return {"requests": self.requests, "by_status": by_status, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight, "aborted": self.aborted, "cut": self.cut,
                "files_served": self.files_served,
                "usage": self.usage, "by_model": self.by_model, "recent": list(self.recent)}


OPTIONS = web.AppKey("options", FakeOptions)
STATS = web.AppKey("stats", Stats)
GATES = web.AppKey("gates", dict)  # gate name -> asyncio.Event; requests with fake.gate wait for it


def _drop_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()  # close, not abort: what was written still reaches the client


async def generate(request: web.Request) -> web.StreamResponse:
    return await _serve(request, edit=False)


async def edit(request: web.Request) -> web.StreamResponse:
    return await _serve(request, edit=True)


async def _serve(request: web.Request, *, edit: bool) -> web.StreamResponse:
    stats = request.app[STATS]
    entry = stats.begin(request)
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        return await _generate(request, entry, stats, edit)
    except FakeError as exc:
        stats.answered(entry, exc.status)
        return exc.response()
    except asyncio.CancelledError:  # the client went away while we waited (handler_cancellation)
        stats.aborted += 1
        raise
    except ConnectionError:  # the client went away while we wrote; aiohttp finishes quietly
        stats.aborted += 1
        return web.Response()
    finally:
        stats.in_flight -= 1


async def _read_json(request: web.Request, entry: dict[str, Any]) -> Any:
    raw = await request.read()
    entry["raw"] = raw.decode("utf-8", "replace")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def _generate(request: web.Request, entry: dict[str, Any], stats: Stats, edit: bool) -> web.StreamResponse:
    options = request.app[OPTIONS]
    # Read before the key check, so that stats show what a refused request carried.
    input_images = None
    if edit:
        body, input_images = await read_edit_form(request, entry)
    else:
        body = await _read_json(request, entry)
    if isinstance(body, dict):
        entry["model"], entry["body"] = body.get("model"), body
    key = request.headers.get("TT-API-KEY", "")
    if key in options.refuse_keys:
        raise FakeError(403, "This API key is not allowed to use this service.")
    if not key or (options.keys and key not in options.keys):
        raise FakeError(401, "Incorrect API key provided.")
    if not isinstance(body, dict):
        raise FakeError(400, "We could not parse the JSON body of your request (a JSON object).")
    knobs = knobs_of(body.get("fake"), options)
    plan = plan_of(body, input_images)
    stats.model(plan.model)["requests"] += 1
    if knobs.hang:
        await asyncio.Future()  # cancelled when the client goes away (handler_cancellation)
    if knobs.gate:
        await request.app[GATES].setdefault(knobs.gate, asyncio.Event()).wait()
    if knobs.latency:
        await asyncio.sleep(knobs.latency)
    if knobs.status:
        raise FakeError(knobs.status, f"Fake upstream error {knobs.status} (requested with fake.status).")
    if plan.stream:
        return await _stream(request, entry, stats, plan, knobs)
    payload = orjson.dumps(json_body(plan, knobs, f"{request.scheme}://{request.host}"))
    stats.answered(entry, 200)
    if knobs.cut_after is None:
        stats.add_usage(plan.model, plan.usage(plan.n) if plan.gpt_image and knobs.usage else None, plan.n)
        return web.Response(body=payload, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload[:min(knobs.cut_after, len(payload) - 1)])
    stats.cut += 1
    _drop_connection(request)
    return response


async def _stream(request: web.Request, entry: dict[str, Any], stats: Stats, plan: Plan,
                  knobs: FakeOptions) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    stats.answered(entry, 200)
    for sent, (event, usage, completed) in enumerate(events(plan, knobs)):
        if knobs.cut_after is not None and sent >= knobs.cut_after:
            break
        if sent and knobs.event_gap:
            await asyncio.sleep(knobs.event_gap)
        await response.write(event)  # each write goes to the socket as its own chunk: no batching
        if completed:
            stats.add_usage(plan.model, usage, 1)
    if knobs.cut_after is not None:
        stats.cut += 1
        _drop_connection(request)
        return response
    await response.write_eof()
    return response


async def download(request: web.Request) -> web.Response:
    match = _FILE.match(request.match_info["name"])
    if match is None:
        return FakeError(404, f"No such file: {request.match_info['name']}").response()
    seed, pad, fmt = bytes.fromhex(match[1]), int(match[2]), match[3]
    request.app[STATS].files_served += 1
    return web.Response(body=fake_images.encode(fmt, seed, pad), content_type=fake_images.MEDIA_TYPES[fmt])


async def not_found(request: web.Request) -> web.Response:
    stats = request.app[STATS]
    entry = stats.begin(request)
    stats.answered(entry, 404)
    return FakeError(404, f"Invalid URL ({request.method} {request.path})").response()


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def stats_view(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[STATS].as_json()), content_type="application/json")


async def reset(request: web.Request) -> web.Response:
    request.app[STATS].reset()
    request.app[GATES].clear()
    return web.Response(status=204)


async def open_gate(request: web.Request) -> web.Response:
    """Release every request held at this gate, and let later ones through at once."""
    request.app[GATES].setdefault(request.match_info["name"], asyncio.Event()).set()
    return web.Response(status=204)


def create_app(options: FakeOptions | None = None) -> web.Application:
    """The fake upstream as an aiohttp app (serve it with ``handler_cancellation=True``)."""
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[OPTIONS] = options or FakeOptions()
    app[STATS] = Stats()
    app[GATES] = {}
    app.router.add_post("/v1/images/generations", generate)
    app.router.add_post("/v1/images/edits", edit)
    app.router.add_get("/files/{name}", download)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/_fake/stats", stats_view)
    app.router.add_post("/_fake/reset", reset)
    app.router.add_post("/_fake/gates/{name}", open_gate)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


@contextlib.asynccontextmanager
async def serve_in_process(options: FakeOptions | None = None, host: str = "127.0.0.1",
                           port: int = 0) -> AsyncIterator[str]:
    """Serve the fake on this event loop (a free port by default); yields its base URL."""
    runner = web.AppRunner(create_app(options), handler_cancellation=True, access_log=None,
                           shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        await runner.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``gateway fake-upstream``."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--key", action="append", default=[],
                        help="accepted TT-API-KEY (repeatable, or comma-separated); none: any key")
    parser.add_argument("--refuse-key", action="append", default=[],
                        help="a TT-API-KEY answered 403 (repeatable)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--event-gap", type=float, default=0.0, help="seconds between SSE events")
    parser.add_argument("--pad-bytes", type=int, default=0, help="pad each image to about this many bytes")


def options_from_args(args: argparse.Namespace) -> FakeOptions:
    def split(values: list[str]) -> frozenset[str]:
        return frozenset(k.strip() for value in values for k in value.split(",") if k.strip())

    return FakeOptions(keys=split(args.key), refuse_keys=split(args.refuse_key), latency=args.latency,
                       event_gap=args.event_gap, pad_bytes=args.pad_bytes)


def serve_from_args(args: argparse.Namespace) -> int:
    """Run the fake until SIGINT/SIGTERM."""
    loop = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop = uvloop.new_event_loop()
    # backlog: like a real upstream (and the gateway), thousands of connections opened at once are queued,
    # not dropped (aiohttp's default of 128 made a burst's late connects wait for SYN retransmits: 1, 3, 7 s).
    web.run_app(create_app(options_from_args(args)), host=args.host, port=args.port, access_log=None,
                handler_cancellation=True, shutdown_timeout=1, loop=loop, backlog=4096,
                print=lambda _: print(f"fake upstream on http://{args.host}:{args.port}", flush=True))
    return 0
