"""The gateway app in-process, its lifespan run, behind an httpx client (for focused tests)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gateway.config import Settings
from gateway.http.app import create_app


@contextlib.asynccontextmanager
async def app_client(settings: Settings, **create: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """An httpx client talking to the app (lifespan started), and the worker's Gateway."""
    app = create_app(settings, **create)
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(with_state, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield client, state["gateway"]
