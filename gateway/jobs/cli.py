"""``gateway jobs list|show|cancel``: operators' view of asynchronous jobs, straight against Redis.

Exit status: 0 done, 1 unknown job (or already started, for cancel), 2 bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.auth.keystore import KeyStore
from gateway.cli.common import settings_or_report
from gateway.jobs.control import cancel_job
from gateway.jobs.queue import JobQueue
from gateway.limits.limiter import Limiter
from gateway.redisdb.client import open_redis
from gateway.redisdb.keys import RedisKeys

Action = Callable[[JobQueue, Limiter, KeyStore], Awaitable[int]]


def _run(args: argparse.Namespace, action: Action) -> int:
    settings = settings_or_report(args.config)
    if settings is None:
        return 2

    async def main() -> int:
        client = open_redis(settings.redis)
        keys = RedisKeys(settings.redis.key_prefix)
        try:
            queue = JobQueue(client, keys, ttl_seconds=settings.jobs.ttl_seconds)
            limiter = Limiter(client, keys, lease_ms=int(settings.upstream.timeout_seconds * 1000))
            return await action(queue, limiter, KeyStore(client, keys, settings))
        finally:
            await client.aclose()

    return asyncio.run(main())


def _stored(job: Any) -> dict[str, Any]:
    """The job object with its user, result as stored (object keys: URLs are signed by the API)."""
    return {**job.public(), "user": job.user, "model": job.model, "n": job.n, "attempts": job.attempts}


async def _find(queue: JobQueue, job_id: str) -> Any:
    user = await queue.owner(job_id)
    job = None if user is None else await queue.get(user, job_id)
    if job is None:
        print("error: no job with that id", file=sys.stderr)
    return job


def _list(args: argparse.Namespace) -> int:
    async def action(queue: JobQueue, *_: object) -> int:
        jobs = await queue.of_user(args.user, args.limit)
        if args.json:
            print(json.dumps({"data": [_stored(j) for j in jobs]}, indent=2))
            return 0
        for j in jobs:
            print(f"{j.id}  {j.status:<11}  {j.model}  n={j.n}  created_ms={j.created_ms}")
        return 0

    return _run(args, action)


def _show(args: argparse.Namespace) -> int:
    async def action(queue: JobQueue, *_: object) -> int:
        job = await _find(queue, args.id)
        if job is None:
            return 1
        print(json.dumps(_stored(job), indent=2))
        return 0

    return _run(args, action)


def _cancel(args: argparse.Namespace) -> int:
    async def action(queue: JobQueue, limiter: Limiter, keystore: KeyStore) -> int:
        job = await _find(queue, args.id)
        if job is None:
            return 1
        if not await cancel_job(queue, limiter, keystore, job):
            print(f"error: the job is {job.status} and can no longer be cancelled", file=sys.stderr)
            return 1
        print(f"cancelled {args.id}")
        return 0

    return _run(args, action)


def register(subparsers: Any) -> None:
    """Add ``jobs list|show|cancel`` to the ``gateway`` command."""
    jobs = subparsers.add_parser("jobs", help="list, show and cancel asynchronous image jobs (in Redis)")
    sub = jobs.add_subparsers(dest="jobs_command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="YAML config file (default: $GATEWAY_CONFIG)")
        return p

    listing = add("list", "a user's jobs, newest first")
    listing.add_argument("--user", required=True)
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)
    show = add("show", "one job, by id")
    show.add_argument("id")
    show.set_defaults(func=_show)
    cancel = add("cancel", "cancel a job that has not started (its quota reservation is given back)")
    cancel.add_argument("id")
    cancel.set_defaults(func=_cancel)
