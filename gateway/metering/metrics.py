"""Every Prometheus metric of the gateway (SPEC section 7), defined in one place.

With several uvicorn workers (or ``metrics.port``) ``PROMETHEUS_MULTIPROC_DIR`` is set and
/metrics sums the workers' files (prometheus-client multiprocess mode; the directory is
emptied at start by ``gateway serve``). Each worker keeps its values in memory and writes them
to its files in batches (``buffered_values``, installed on import here, before any metric
exists). One worker without ``metrics.port`` has no files at all.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.metering import buffered_values

disable_created_metrics()  # *_created samples double the series count for no use here
buffered_values.install()  # before any metric is created: every value of the process must be buffered

# From sub-millisecond gateway overhead to 600 s image calls.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20,
                    30, 45, 60, 90, 120, 180, 300, 450, 600)


# Exactly the ``op`` values the code emits (tests/metering/test_metrics.py checks both ways), so a
# dashboard sees every series at 0 before the first failure and no series that can never move.
REDIS_OPS = ("admit", "cancel", "settle", "ping", "auth_guard", "key_create", "key_lookup", "key_list",
             "key_revoke", "usage", "idempotency", "jobs", "renew", "sweep")
LOST_SETTLEMENT_REASONS = ("no_spool", "spool_error")
STORAGE_OPS = ("start", "put", "get", "presign", "delete")  # ImageStore._call(op)
SHED_REASONS = ("queue_full", "deadline")
UPSTREAM_ERROR_REASONS = ("upstream_timeout", "upstream_unavailable", "upstream_auth_failed", "status_4xx",
                          "status_5xx")
JOB_OUTCOMES = ("submitted", "succeeded", "failed", "cancelled")
WEBHOOK_OUTCOMES = ("delivered", "retry", "gave_up", "refused")


class Metrics:
    """The gateway's metrics on one registry; ``user_label=False`` drops the ``user`` label."""

    def __init__(self, registry: CollectorRegistry | None = None, *, user_label: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.user_label = user_label
        who = ("user", "team") if user_label else ("team",)
        r = self.registry
        self.requests = Counter("gateway_requests_total", "Requests answered, by route, model and HTTP status.",
                                ("route", "model", "status"), registry=r)
        self.request_duration = Histogram("gateway_request_duration_seconds",
                                          "Time from request received to response finished.",
                                          ("route", "model", "stream"), buckets=DURATION_BUCKETS, registry=r)
        self.upstream_duration = Histogram("gateway_upstream_duration_seconds",
                                           "Time the upstream call took (headers and body).",
                                           ("model", "stream", "outcome"), buckets=DURATION_BUCKETS, registry=r)
        self.tokens = Counter("gateway_usage_tokens_total", "Tokens the upstream reported, by kind.",
                              (*who, "model", "kind"), registry=r)
        self.images = Counter("gateway_images_total", "Images generated.", (*who, "model"), registry=r)
        self.cost = Counter("gateway_cost_usd_total", "Cost in USD from the configured price table.",
                            (*who, "model"), registry=r)
        self.rate_limited = Counter("gateway_rate_limited_total", "Requests refused with 429, by limit.",
                                    (*who, "limit"), registry=r)
        self.inflight = Gauge("gateway_inflight_requests", "Requests in flight.", ("route",), registry=r,
                              multiprocess_mode="livesum")
        self.upstream_errors = Counter("gateway_upstream_errors_total", "Upstream failures, by reason.",
                                       ("reason",), registry=r)
        self.redis_errors = Counter("gateway_redis_errors_total", "Redis calls that failed, by operation.",
                                    ("op",), registry=r)
        self.storage_errors = Counter("gateway_storage_errors_total", "Image-store calls that failed, by operation.",
                                      ("op",), registry=r)
        self.auth_failures = Counter("gateway_auth_failures_total",
                                     "Failed authentications, and those refused by the brute-force guard.",
                                     ("outcome",), registry=r)
        self.unmetered = Counter("gateway_unmetered_requests_total",
                                 "Requests served without limits because Redis was unavailable (policy allow).",
                                 registry=r)
        self.unpriced = Counter("gateway_unpriced_requests_total",
                                "Requests for a model with no price in the config (cost counted as 0).",
                                ("model",), registry=r)
        self.idempotent_replays = Counter("gateway_idempotent_replays_total",
                                          "Requests answered with the stored answer of their Idempotency-Key.",
                                          ("route",), registry=r)
        self.usage_pending = Gauge("gateway_usage_pending_settlements",
                                   "Settlements waiting for Redis (retried with backoff).", registry=r,
                                   multiprocess_mode="livesum")
        self.admission_shed = Counter("gateway_admission_shed_total",
                                      "Admissions refused with 503 before reaching Redis: the admission queue "
                                      "was full (queue_full) or waiting would pass redis.admission_wait_seconds "
                                      "(deadline).", ("reason",), registry=r)
        self.jobs = Counter("gateway_jobs_total", "Asynchronous jobs by what became of them (submitted, "
                            "succeeded, failed, cancelled).", ("status",), registry=r)
        # Read from Redis by every worker's runner: the same figure, so the workers' maximum.
        self.jobs_queued = Gauge("gateway_jobs_queued", "Jobs waiting to start, all users.", registry=r,
                                 multiprocess_mode="max")
        self.jobs_oldest_age = Gauge("gateway_jobs_oldest_age_seconds", "Age of the oldest job waiting to start.",
                                     registry=r, multiprocess_mode="max")
        self.webhook_deliveries = Counter("gateway_webhook_deliveries_total",
                                          "Webhook delivery attempts by outcome (delivered, retry, gave_up, "
                                          "refused).", ("outcome",), registry=r)

        self.settlements_lost = Counter("gateway_usage_lost_settlements_total",
                                        "Settlements neither settled in Redis nor spooled (logged with their "
                                        "request ids), by reason.", ("reason",), registry=r)

        # Zero series up front, so dashboards and alerts see these names before the first failure.
        for op in REDIS_OPS:
            self.redis_errors.labels(op)
        for op in STORAGE_OPS:
            self.storage_errors.labels(op)
        for reason in UPSTREAM_ERROR_REASONS:
            self.upstream_errors.labels(reason)
        for reason in LOST_SETTLEMENT_REASONS:
            self.settlements_lost.labels(reason)
        for reason in SHED_REASONS:
            self.admission_shed.labels(reason)

        for status in JOB_OUTCOMES:
            self.jobs.labels(status)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the hot path skips prometheus-client's checks and lock."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def who(self, user: str, team: str | None) -> tuple[str, ...]:
        return (user, team or "") if self.user_label else (team or "",)


# A live gauge's file (livesum, liveall, livemax, ...): ``gauge_{mode}_{pid}.db``.
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def forget_dead_workers(path: str) -> list[int]:
    """Remove the live-gauge files of workers that are gone; returns their pids.

    A worker killed without a clean exit (SIGKILL, the OOM killer) leaves its last values in its
    files: its requests would count as in flight for ever. prometheus-client leaves calling
    ``mark_process_dead`` to the process manager; uvicorn's has no hook, so the scrape does it.
    Counters and histograms stay: what a dead worker counted did happen. Two scrapes at once may
    both remove a file (one finds it gone); the collector skips a live-gauge file that vanished.
    """
    dead: dict[int, bool] = {}
    for name in os.listdir(path):
        found = _LIVE_GAUGE_FILE.fullmatch(name)
        if found is None:
            continue
        pid = int(found.group(1))
        if dead.setdefault(pid, not _alive(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, name))
    return sorted(pid for pid, gone in dead.items() if gone)


class LiveWorkersCollector(MultiProcessCollector):
    """The workers' summed files, without the live gauges of workers that died (``forget_dead_workers``)."""

    def collect(self) -> Iterable[Metric]:
        forget_dead_workers(self._path)
        return super().collect()  # type: ignore[no-any-return]


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The /metrics body: the sum over all workers in multiprocess mode, else ``registry``."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        buffered_values.flush()  # this worker's own figures current; the others' are at most one interval old
        merged = CollectorRegistry()
        LiveWorkersCollector(merged)
        return generate_latest(merged), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST
