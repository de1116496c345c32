"""The durable job queue in Redis: one stream per user (Cluster: the user's hash tag), a consumer group.

A job is a hash ``{u:U}:job:<id>`` (kept ``jobs.ttl_seconds``) and an entry in the user's stream
``{u:U}:jobs``. Runners read entries through the group ``runners``: an entry read and not yet
acknowledged is pending on its runner, which renews its claim while it works; a runner that died
stops renewing, and after ``jobs.visibility_timeout_seconds`` another takes the entry over
(``XAUTOCLAIM``). An entry is acknowledged and deleted when its job finished, so a stream holds
exactly the user's unfinished jobs. ``jobusers`` lists the users whose streams may hold entries
(runners go round it); ``jobswaiting`` holds every job not yet started, for the queue's depth and age.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import ResponseError

from gateway.jobs.model import QUEUED, Job, now_ms
from gateway.redisdb.keys import RedisKeys

GROUP = "runners"


def _lua(name: str) -> str:
    return resources.files("gateway.jobs").joinpath("lua", name).read_text(encoding="utf-8")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Entry:
    """A job's stream entry as a runner holds it."""

    user: str
    entry_id: str
    job_id: str


class JobQueue:
    """Jobs in Redis: enqueue, read fairly per user, take over from dead runners, finish."""

    def __init__(self, redis: Any, keys: RedisKeys, *, ttl_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self._enqueue = redis.register_script(_lua("enqueue.lua"))
        self._transition = redis.register_script(_lua("transition.lua"))
        self._prune = redis.register_script(_lua("prune_consumers.lua"))

    async def submit(self, job: Job) -> None:
        """Store and queue a new job."""
        k = self.keys
        # The user is listed before the entry exists: a crash in between leaves no job runners cannot find.
        await self.redis.zadd(k.job_users(), {job.user: job.created_ms}, nx=True)
        fields = [x for pair in job.to_hash().items() for x in pair]
        await self._enqueue(keys=[k.job(job.user, job.id), k.job_list(job.user), k.job_queue(job.user)],
                            args=[job.id, job.created_ms, self.ttl_seconds, *fields])
        await self.redis.set(k.job_owner(job.id), job.user, ex=self.ttl_seconds)
        await self.redis.zadd(k.jobs_waiting(), {f"{job.user}/{job.id}": job.created_ms})
        # Again: a runner may have dropped the user between the first ZADD and the entry.
        await self.redis.zadd(k.job_users(), {job.user: job.created_ms}, nx=True)

    async def uploading(self, user: str, job_id: str) -> None:
        """Note that a submission's files are going to the store (until it is queued: ``uploaded``)."""
        await self.redis.zadd(self.keys.job_uploads(), {f"{user}/{job_id}": now_ms()})

    async def uploaded(self, user: str, job_id: str) -> None:
        """The submission's files belong to a job now, or were deleted."""
        await self.redis.zrem(self.keys.job_uploads(), f"{user}/{job_id}")

    async def stale_uploads(self, older_than_ms: int, most: int = 16) -> list[tuple[str, str]]:
        """(user, job id) of uploads that began ``older_than_ms`` ago or more and were never marked done."""
        members = await self.redis.zrangebyscore(self.keys.job_uploads(), 0, now_ms() - older_than_ms,
                                                 start=0, num=most)
        return [(user, job_id) for user, _, job_id in (_text(m).partition("/") for m in members)]

    async def get(self, user: str, job_id: str) -> Job | None:
        raw = await self.redis.hgetall(self.keys.job(user, job_id))
        return Job.from_hash(raw) if raw else None

    async def owner(self, job_id: str) -> str | None:
        """The user a job belongs to (for operators, who look jobs up by id)."""
        value = await self.redis.get(self.keys.job_owner(job_id))
        return None if value is None else _text(value)

    async def of_user(self, user: str, limit: int = 100) -> list[Job]:
        """The user's jobs, newest first."""
        ids = await self.redis.zrevrange(self.keys.job_list(user), 0, limit - 1)
        jobs = [await self.get(user, _text(i)) for i in ids]
        return [j for j in jobs if j is not None]

    async def transition(self, user: str, job_id: str, expected: tuple[str, ...], **fields: Any) -> bool:
        """Set ``fields`` if the job's status is one of ``expected``; False (nothing changed) otherwise."""
        args: list[Any] = ["|".join(expected), self.ttl_seconds]
        for name, value in fields.items():
            args += [name, "" if value is None else value]
        changed = bool(int(await self._transition(keys=[self.keys.job(user, job_id)], args=args)))
        if changed and QUEUED in expected and fields.get("status", QUEUED) != QUEUED:
            await self.redis.zrem(self.keys.jobs_waiting(), f"{user}/{job_id}")
        return changed

    async def users(self) -> list[str]:
        return [_text(u) for u in await self.redis.zrange(self.keys.job_users(), 0, -1)]

    async def read(self, user: str, consumer: str) -> Entry | None:
        """The user's next undelivered entry, now pending on ``consumer``."""
        try:
            reply = await self.redis.xreadgroup(GROUP, consumer, {self.keys.job_queue(user): ">"}, count=1)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return None
            raise
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                return Entry(user, _text(entry_id), _text(fields[b"job"]))
        return None

    async def take_over(self, user: str, consumer: str, min_idle_ms: int) -> Entry | None:
        """An entry whose runner stopped renewing its claim for ``min_idle_ms``, now ``consumer``'s."""
        try:
            reply = await self.redis.xautoclaim(self.keys.job_queue(user), GROUP, consumer, min_idle_ms,
                                                start_id="0-0", count=1)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return None
            raise
        for entry_id, fields in reply[1]:
            if fields:  # an entry deleted while pending comes back without fields
                return Entry(user, _text(entry_id), _text(fields[b"job"]))
        return None

    async def renew(self, user: str, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this runner still works on (so nobody takes them over)."""
        if entry_ids:
            await self.redis.xclaim(self.keys.job_queue(user), GROUP, consumer, 0, entry_ids, justid=True)

    async def done(self, entry: Entry) -> None:
        """The entry's job is finished (or gone): acknowledge and delete the entry."""
        stream = self.keys.job_queue(entry.user)
        await self.redis.xack(stream, GROUP, entry.entry_id)
        await self.redis.xdel(stream, entry.entry_id)

    async def prune(self, user: str, min_idle_ms: int) -> int:
        """Delete the consumers of the user's stream that hold no entry and were idle ``min_idle_ms``.

        Runners of processes that ended leave their consumer names behind; this drops them.
        """
        return int(await self._prune(keys=[self.keys.job_queue(user)], args=[GROUP, min_idle_ms]))

    async def forget_if_empty(self, user: str) -> None:
        """Drop an idle user from the runners' round (and their stream's idle consumers); back if a job arrived."""
        stream = self.keys.job_queue(user)
        if await self.redis.xlen(stream):
            return
        await self.prune(user, 0)
        await self.redis.zrem(self.keys.job_users(), user)
        if await self.redis.xlen(stream):
            await self.redis.zadd(self.keys.job_users(), {user: now_ms()}, nx=True)

    async def waiting(self) -> tuple[int, float]:
        """(jobs not yet started, age in seconds of the oldest of them) over all users."""
        key = self.keys.jobs_waiting()
        for _ in range(10):  # a member left behind by a crash between start and cleanup is dropped here
            oldest = await self.redis.zrange(key, 0, 0, withscores=True)
            if not oldest:
                return 0, 0.0
            member, created = _text(oldest[0][0]), oldest[0][1]
            user, _, job_id = member.partition("/")
            status = await self.redis.hget(self.keys.job(user, job_id), "status")
            if status is not None and _text(status) == QUEUED:
                return int(await self.redis.zcard(key)), max(now_ms() - created, 0) / 1000
            await self.redis.zrem(key, member)
        return int(await self.redis.zcard(key)), 0.0
