"""A minimal relay per client engine: POST /v1/images/generations → the fake upstream → the body back.

``python -m bench.engines.relay --engine aiohttp --port P --upstream URL --key K`` serves it
with uvicorn (one worker, uvloop, httptools), as the gateway is served. Nothing else is
done per request: no auth, no validation, no metrics; only the engine and the framework
differ between relays.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MAX_CONNECTIONS = 10_000
PATH = "/v1/images/generations"
# send(body) -> (status, content-type, body)
Send = Callable[[bytes], Awaitable[tuple[int, str, bytes]]]


def _httpx_like(client: Any, url: str, headers: dict[str, str]) -> tuple[Send, Any]:
    async def send(body: bytes) -> tuple[int, str, bytes]:
        resp = await client.post(url, content=body, headers=headers)
        return resp.status_code, resp.headers.get("content-type", "application/json"), resp.content

    return send, client.aclose


def _httpx_limits(module: Any) -> Any:
    return module.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS)


async def httpx_engine(url: str, headers: dict[str, str]) -> tuple[Send, Any]:
    import httpx

    client = httpx.AsyncClient(limits=_httpx_limits(httpx), timeout=httpx.Timeout(120, connect=10))
    return _httpx_like(client, url, headers)


async def httpx2_engine(url: str, headers: dict[str, str]) -> tuple[Send, Any]:
    import httpx2  # type: ignore[import-not-found]

    client = httpx2.AsyncClient(limits=_httpx_limits(httpx2), timeout=httpx2.Timeout(120, connect=10))
    return _httpx_like(client, url, headers)


async def httpx_aiohttp_engine(url: str, headers: dict[str, str]) -> tuple[Send, Any]:
    import httpx
    from httpx_aiohttp import HttpxAiohttpClient  # type: ignore[import-not-found]

    client = HttpxAiohttpClient(limits=_httpx_limits(httpx), timeout=httpx.Timeout(120, connect=10))
    return _httpx_like(client, url, headers)


async def aiohttp_engine(url: str, headers: dict[str, str]) -> tuple[Send, Any]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=0)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120, connect=10),
                                    auto_decompress=False)

    async def send(body: bytes) -> tuple[int, str, bytes]:
        async with session.post(url, data=body, headers=headers) as resp:
            return resp.status, resp.headers.get("content-type", "application/json"), await resp.read()

    return send, session.close


async def floor_engine(url: str, headers: dict[str, str]) -> tuple[Send, Any]:
    from bench.engines.floor import FloorClient

    client = FloorClient(url, headers)
    return client.post, client.close


# engine name -> factory of (send, close)
ENGINES: dict[str, Callable[[str, dict[str, str]], Awaitable[tuple[Send, Any]]]] = {
    "httpx": httpx_engine,
    "httpx2": httpx2_engine,
    "httpx-aiohttp": httpx_aiohttp_engine,
    "aiohttp": aiohttp_engine,
    "floor": floor_engine,
}


def create_app(engine: str, upstream: str, key: str, framework: str = "fastapi") -> Any:
    """The relay app for ``engine`` on FastAPI (as the issue measured) or bare Starlette."""
    url = upstream.rstrip("/") + PATH
    headers = {"content-type": "application/json", "tt-api-key": key}
    state: dict[str, Send] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        send, close = await ENGINES[engine](url, headers)
        state["send"] = send
        try:
            yield
        finally:
            await close()

    async def relay(request: Request) -> Response:
        status, content_type, body = await state["send"](await request.body())
        return Response(body, status_code=status, media_type=content_type)

    async def healthz(request: Request) -> Response:
        return Response(b"ok")

    routes = [Route(PATH, relay, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])]
    if framework == "starlette":
        return Starlette(routes=routes, lifespan=lifespan)
    from fastapi import FastAPI

    return FastAPI(routes=routes, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines.relay")
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--framework", choices=("fastapi", "starlette"), default="fastapi")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    app = create_app(args.engine, args.upstream, args.key, args.framework)
    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1, loop="uvloop", http="httptools",
                lifespan="on", access_log=False, log_level="warning", backlog=4096)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
