"""The ``gateway`` command: serve, check-config, keys, usage, jobs, fake-upstream, demo.

One dispatch style: every subcommand sets ``func``, a function of the parsed arguments that
returns the exit status; every command that reads the config takes ``--config``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway.admin.keys_cli import register as register_keys
from gateway.admin.usage_cli import register as register_usage
from gateway.cli.common import add_config_option, settings_or_report
from gateway.jobs.cli import register as register_jobs


def _serve(args: argparse.Namespace) -> int:
    from gateway.http.server import serve

    return serve(args.config, host=args.host, port=args.port, workers=args.workers)


def _check_config(args: argparse.Namespace) -> int:
    if args.path and args.config and args.path != args.config:
        print("error: give the config file once (PATH or --config)", file=sys.stderr)
        return 2
    settings = settings_or_report(args.path or args.config)
    if settings is None:
        return 2
    print(f"ok: {len(settings.models)} models, {len(settings.plans)} plans, {len(settings.keys)} fixed keys, "
          f"{len(settings.upstream.api_keys)} upstream keys from TTAPI_API_KEY")
    return 0


def _fake_upstream(args: argparse.Namespace) -> int:
    from gateway.devtools.fake_upstream import serve_from_args

    return serve_from_args(args)


def _demo(args: argparse.Namespace) -> int:
    from gateway.devtools.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    add_config_option(serve)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=None,
                       help="worker processes (default: $GATEWAY_WORKERS, server.workers, else the usable cores)")
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file without starting")
    check.add_argument("path", nargs="?", help="the YAML config file (or --config)")
    add_config_option(check)
    check.set_defaults(func=_check_config)

    fake = sub.add_parser("fake-upstream", help="a local stand-in for TTAPI (demos, tests, benchmarks)")
    from gateway.devtools.fake_upstream import add_arguments as add_fake_arguments

    add_fake_arguments(fake)
    fake.set_defaults(func=_fake_upstream)

    demo = sub.add_parser("demo", help="run Redis, the fake upstream and the gateway locally")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.set_defaults(func=_demo)

    register_keys(sub)
    register_usage(sub)
    register_jobs(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
