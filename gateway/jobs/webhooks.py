"""Job webhooks per Standard Webhooks: each finished job of a key with a ``webhook_url`` is POSTed, signed.

Headers ``webhook-id`` (``msg_<job id>``, the same on every retry, so receivers can deduplicate),
``webhook-timestamp`` (unix seconds of the attempt) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` with the key's ``whsec_`` secret, signed by the
``standardwebhooks`` package so the signature is exactly what its verifiers expect). A non-2xx answer or
a failed connection is retried with exponential backoff (``jobs.webhook_first_retry_seconds``, doubling,
at most an hour apart) until ``jobs.webhook_retry_seconds`` (24 h) after the job finished. Attempts are
due in a Redis sorted set any worker claims from (``lua/claim_due.lua``), so retries survive restarts.
The delivery state is kept on the job (its ``webhook`` field). Addresses are guarded by ``ssrf.py``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from standardwebhooks.webhooks import Webhook

from gateway.jobs.model import FINISHED, Job, now_ms
from gateway.jobs.queue import JobQueue
from gateway.jobs.results import job_object
from gateway.jobs.ssrf import GuardedResolver, WebhookRefused, refused_literal
from gateway.redisdb.client import REDIS_ERRORS

if TYPE_CHECKING:  # the CLI's cancel imports this module: no metrics registry (prometheus_client) at import
    from gateway.pipeline.gateway import Gateway

log = logging.getLogger("gateway.webhooks")
_BATCH = 32
_MAX_BACKOFF_S = 3600.0
_IDLE_S = 0.2
_MAX_IN_FLIGHT = 256  # delivery attempts one worker has open at once


def _refused(exc: BaseException) -> bool:
    """True when a connection failed because the guard refused the host's address."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, WebhookRefused) or isinstance(getattr(seen, "os_error", None), WebhookRefused):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _forget(in_flight: set[asyncio.Task[None]]) -> Any:
    """A done-callback: drop a finished attempt; an error (Redis gone mid-attempt) leaves it due after its lease."""
    def done(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a webhook attempt failed (%s); it is tried again after its lease",
                        type(task.exception()).__name__)
    return done


async def schedule(keystore: Any, queue: JobQueue, job: Job) -> None:
    """Schedule the first delivery for a finished (or cancelled) job, if its key has a webhook.

    Any gateway worker's ``Webhooks.run`` sends it: the CLI's cancel schedules too.
    """
    hook = None if keystore is None else await keystore.webhook(job.key_id)
    if hook is None:
        return
    state = {"url": hook[0], "status": "pending", "attempts": 0, "last_status": None, "last_error": None,
             "delivered_at": None}
    await queue.transition(job.user, job.id, FINISHED, webhook=orjson.dumps(state))
    await queue.redis.zadd(queue.keys.webhook_due(), {f"{job.user}/{job.id}": now_ms()})


class Webhooks:
    """Schedules a finished job's webhook, and sends due attempts until cancelled (``run``)."""

    def __init__(self, gw: Gateway, queue: JobQueue) -> None:
        self.gw = gw
        self.queue = queue
        self.settings = gw.settings.jobs
        self.due_key = queue.keys.webhook_due()
        lua = resources.files("gateway.jobs").joinpath("lua", "claim_due.lua").read_text(encoding="utf-8")
        self._claim = queue.redis.register_script(lua)

    async def finished(self, job: Job) -> None:
        """Schedule the first delivery of a finished job whose key has a webhook."""
        await schedule(self.gw.keystore, self.queue, job)

    async def run(self) -> None:
        """Send due attempts until cancelled.

        Each attempt runs on its own (at most ``_MAX_IN_FLIGHT`` at once): a receiver that answers slowly
        or never holds only its own attempts, not the deliveries claimed after them.
        """
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.settings.allow_private_webhooks),
                                         limit=_MAX_IN_FLIGHT, ttl_dns_cache=None, use_dns_cache=False)
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_seconds)
        in_flight: set[asyncio.Task[None]] = set()
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                while True:
                    free = _MAX_IN_FLIGHT - len(in_flight)
                    if not free:
                        await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    try:
                        lease = int((self.settings.webhook_timeout_seconds + 30) * 1000)
                        claimed = await self._claim(keys=[self.due_key], args=[now_ms(), lease, min(_BATCH, free)])
                    except REDIS_ERRORS:
                        self.gw.metrics.redis_errors.labels("jobs").inc()
                        claimed = []
                    if not claimed:
                        await asyncio.sleep(_IDLE_S)
                    for m in claimed:
                        task = asyncio.create_task(self._attempt(session, m.decode() if isinstance(m, bytes) else m))
                        in_flight.add(task)
                        task.add_done_callback(_forget(in_flight))
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _attempt(self, session: aiohttp.ClientSession, member: str) -> None:
        user, _, job_id = member.partition("/")
        job = await self.queue.get(user, job_id)
        hook = None if job is None or self.gw.keystore is None else await self.gw.keystore.webhook(job.key_id)
        if job is None or hook is None or not job.webhook:
            await self.queue.redis.zrem(self.due_key, member)  # the job expired, or the key lost its webhook
            return
        url, secret = hook
        state = dict(job.webhook)
        state["attempts"] = int(state.get("attempts", 0)) + 1
        outcome = await self._post(session, url, secret, job, state)
        if outcome == "retry" and now_ms() - (job.completed_ms or 0) >= self.settings.webhook_retry_seconds * 1000:
            outcome = "gave_up"
        if outcome == "retry":
            delay = min(self.settings.webhook_first_retry_seconds * 2 ** (state["attempts"] - 1), _MAX_BACKOFF_S)
            await self.queue.redis.zadd(self.due_key, {member: now_ms() + int(delay * 1000)})
        else:
            state["status"] = "delivered" if outcome == "delivered" else "failed"
            await self.queue.redis.zrem(self.due_key, member)
        self.gw.metrics.webhook_deliveries.labels(outcome).inc()
        await self.queue.transition(user, job_id, FINISHED, webhook=orjson.dumps(state))

    async def _post(self, session: aiohttp.ClientSession, url: str, secret: str, job: Job,
                    state: dict[str, Any]) -> str:
        """One signed POST; returns the outcome (delivered, retry, refused) and notes it in ``state``."""
        if refused_literal(url, self.settings.allow_private_webhooks):  # aiohttp does not resolve literals
            state["last_error"] = ("the webhook's address is not allowed (private, loopback or link-local, "
                                   "or a numeric host that is no dotted IPv4 address)")
            return "refused"
        body = orjson.dumps(await job_object(self.gw.image_store, job))
        msg_id, sent = f"msg_{job.id}", datetime.now(UTC)
        headers = {"content-type": "application/json", "webhook-id": msg_id,
                   "webhook-timestamp": str(int(sent.timestamp())),
                   "webhook-signature": Webhook(secret).sign(msg_id, sent, body.decode())}
        try:
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as answer:
                state["last_status"] = answer.status
                state["last_error"] = None
                if 200 <= answer.status < 300:
                    state["delivered_at"] = int(sent.timestamp())
                    return "delivered"
                return "retry"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if _refused(exc):
                state["last_error"] = "the webhook's host resolves to an address that is not allowed"
                return "refused"
            state["last_status"], state["last_error"] = None, f"delivery failed ({type(exc).__name__})"
            return "retry"
