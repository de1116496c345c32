"""``metrics.port``: /metrics on a port of its own, from a thread of ``gateway serve``'s main process.

It reads the workers' files in PROMETHEUS_MULTIPROC_DIR (the sum over all workers, each written
every ``metrics.flush_seconds``: see gateway/metering/buffered_values.py) and,
like the API port's /metrics, requires ``Authorization: Bearer $GATEWAY_METRICS_TOKEN``
when that is set. Import it only after PROMETHEUS_MULTIPROC_DIR is set (see server.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app

from gateway.auth.authenticator import bearer_token, token_matches
from gateway.errors import MetricsUnauthorized
from gateway.metering import buffered_values
from gateway.metering.metrics import LiveWorkersCollector


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up shutdown


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log, as on the API port


def metrics_app(token: str | None) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: the workers' summed metrics, or a 401 in OpenAI's shape without the token."""
    registry = CollectorRegistry()
    LiveWorkersCollector(registry)
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if token is not None and not token_matches(bearer_token(environ.get("HTTP_AUTHORIZATION")), token):
            err = MetricsUnauthorized()
            start_response("401 Unauthorized", [("Content-Type", "application/json"), *err.headers.items()])
            return [orjson.dumps(err.body())]
        buffered_values.flush()  # one worker serves from this process: its own figures current
        return exposition(environ, start_response)  # type: ignore[no-any-return]

    return app


def start_metrics_port(host: str, port: int, token: str | None) -> None:
    """Serve /metrics on ``host:port`` from a daemon thread."""
    server = make_server(host, port, metrics_app(token), _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-port", daemon=True).start()
