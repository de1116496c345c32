"""``gateway jobs list|show|cancel``: operators' view of asynchronous jobs, straight against Redis.

Exit status: 0 done, 1 unknown job (or already started, for cancel) or Redis unavailable, 2 bad config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.auth.keystore import KeyStore
from gateway.cli.common import command_group, run_against_redis
from gateway.config import Settings
from gateway.jobs.control import cancel_job
from gateway.jobs.queue import JobQueue
from gateway.limits.limiter import Limiter
from gateway.redisdb.keys import RedisKeys

Action = Callable[[JobQueue, Limiter, KeyStore], Awaitable[int]]


def _run(args: argparse.Namespace, action: Action) -> int:
    def with_queue(settings: Settings, client: Any, keys: RedisKeys) -> Awaitable[int]:
        queue = JobQueue(client, keys, ttl_seconds=settings.jobs.ttl_seconds)
        limiter = Limiter(client, keys, lease_ms=int(settings.upstream.timeout_seconds * 1000))
        return action(queue, limiter, KeyStore(client, keys, settings))

    return run_against_redis(args, with_queue)


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


def _positive(text: str) -> int:
    """``--limit``: a whole number of at least 1 (0 or a negative one would be read as a Redis range end)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def register(subparsers: Any) -> None:
    """Add ``jobs list|show|cancel`` to the ``gateway`` command."""
    add = command_group(subparsers, "jobs", "list, show and cancel asynchronous image jobs (in Redis)")
    listing = add("list", "a user's jobs, newest first", _list)
    listing.add_argument("--user", required=True)
    listing.add_argument("--limit", type=_positive, default=100)
    listing.add_argument("--json", action="store_true")
    show = add("show", "one job, by id", _show)
    show.add_argument("id")
    cancel = add("cancel", "cancel a job that has not started (its quota reservation is given back)", _cancel)
    cancel.add_argument("id")
