"""``gateway keys create|list|revoke``: the admin API's key operations, straight against Redis.

They run the same ``KeyStore`` code as ``POST/GET/DELETE /admin/keys``, with the Redis URL
and key prefix of ``--config`` (default ``$GATEWAY_CONFIG``; ``REDIS_URL`` overrides).
Exit status: 0 done, 1 unknown key id or Redis unavailable, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import yaml

from gateway.auth.keystore import KeyStore, key_object
from gateway.cli.common import command_group, run_against_redis


def _limit(text: str) -> tuple[str, Any]:
    """``name=value``; the value is read as YAML, like the config file (``60``, ``2.5``, ``null``)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return name.strip(), value


def _run(args: argparse.Namespace, action: Callable[[KeyStore], Awaitable[int]]) -> int:
    return run_against_redis(args, lambda settings, client, keys: action(KeyStore(client, keys, settings)))


def _create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"user": args.user}
    for name in ("team", "plan", "name", "expires_at", "webhook_url"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.limit:
        body["limits"] = dict(args.limit)
    if args.model:
        body["models"] = list(args.model)

    async def action(store: KeyStore) -> int:
        created = await store.create(body)
        if args.json:
            print(json.dumps(created.as_dict(), indent=2))
        else:
            print(f"id:  {created.record.id}")
            print(f"key: {created.key}")
            if created.webhook_secret is not None:
                print(f"webhook_secret: {created.webhook_secret}")
            print("The key (and webhook secret) is shown only this once: store it now.", file=sys.stderr)
        return 0

    return _run(args, action)


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``): nothing reaches the terminal raw."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _list(args: argparse.Namespace) -> int:
    async def action(store: KeyStore) -> int:
        records = await store.list(args.user)
        if args.json:
            print(json.dumps({"data": [key_object(r) for r in records]}, indent=2))
            return 0
        rows: list[tuple[str, ...]] = [("ID", "USER", "TEAM", "PLAN", "NAME", "CREATED", "EXPIRES", "MODELS", "LIMITS")]
        for r in records:
            # Records written before names were checked (or by hand) may hold anything: escape every cell.
            rows.append(tuple(printable(str(cell)) for cell in (
                r.id, r.user, r.team or "-", r.plan, r.name or "-", r.created_at, r.expires_at or "-",
                ",".join(r.models) if r.models is not None else "*",
                ",".join(f"{k}={v}" for k, v in sorted(r.limits.items())) or "-")))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        return 0

    return _run(args, action)


def _revoke(args: argparse.Namespace) -> int:
    async def action(store: KeyStore) -> int:
        if not await store.revoke(args.id):
            print("error: no key with that id", file=sys.stderr)
            return 1
        print(f"revoked {args.id}")
        return 0

    return _run(args, action)


def register(subparsers: Any) -> None:
    """Add ``keys create|list|revoke`` to the ``gateway`` command."""
    add = command_group(subparsers, "keys", "create, list and revoke gateway keys (in Redis)")
    create = add("create", "create a key; prints it once", _create)
    create.add_argument("--user", required=True)
    create.add_argument("--team")
    create.add_argument("--plan", help="a plan of the config (default: default)")
    create.add_argument("--name", help="a label for people")
    create.add_argument("--expires-at", dest="expires_at", help="ISO 8601 UTC, e.g. 2027-01-31T00:00:00Z")
    create.add_argument("--webhook-url", dest="webhook_url",
                        help="POST each finished job here, signed (Standard Webhooks); prints the secret once")
    create.add_argument("--limit", action="append", type=_limit, metavar="NAME=VALUE",
                        help="a per-key limit override, e.g. requests_per_minute=10 (null: unlimited); repeatable")
    create.add_argument("--model", action="append", metavar="MODEL",
                        help="allow only this model (repeatable); default: the plan's models")
    create.add_argument("--json", action="store_true", help="print the key object as JSON")

    listing = add("list", "list a user's keys (never the keys themselves)", _list)
    listing.add_argument("--user", required=True)
    listing.add_argument("--json", action="store_true", help='print {"data": [...]} as the admin API does')

    revoke = add("revoke", "revoke a key by id; every replica refuses it within 5 s", _revoke)
    revoke.add_argument("id", help="the key's id, e.g. key_ab12cd34")
