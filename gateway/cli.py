"""The `ortto-gateway` command line: serve, demo, sandbox, check-config, dead-letters."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gateway import __version__
from gateway.config import ConfigError, Settings, describe, load_settings, parse_host_port
from gateway.logs import setup_logging

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ortto-gateway",
        description="Relay browser Ortto activities with the private key kept on the server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML settings file (default: $GATEWAY_CONFIG)")

    demo = sub.add_parser("demo", help="gateway + sandbox upstream + demo page, no account needed")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="public listener host:port")

    sandbox = sub.add_parser("sandbox", help="the sandbox upstream alone (Ortto stand-in)")
    sandbox.add_argument("--listen", default="127.0.0.1:8099", help="host:port")
    sandbox.add_argument(
        "--api-key-file", help="file holding the key the sandbox expects (default: sandbox-key)"
    )

    check = sub.add_parser("check-config", help="validate and print the effective settings")
    check.add_argument("--config", help="TOML settings file (default: $GATEWAY_CONFIG)")

    dead = sub.add_parser("dead-letters", help="inspect and re-send what Ortto refused")
    dead.add_argument("--config", help="TOML settings file (default: $GATEWAY_CONFIG)")
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    dl_list = dead_sub.add_parser("list", help="show dead letters")
    dl_list.add_argument("--limit", type=int, default=100)
    dl_list.add_argument("--error", help="only those whose error contains this text")
    dl_list.add_argument("--json", action="store_true", help="one JSON object a line")
    replay = dead_sub.add_parser("replay", help="queue dead letters for delivery again")
    replay.add_argument("ids", nargs="*", type=int, help="dead-letter ids (default: all)")
    replay.add_argument("--error", help="only those whose error contains this text")
    purge = dead_sub.add_parser("purge", help="delete dead letters")
    purge.add_argument("ids", nargs="*", type=int, help="dead-letter ids (default: all)")
    purge.add_argument("--error", help="only those whose error contains this text")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of the console script and `python -m gateway`."""
    args = _parser().parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        if args.command == "serve":
            return _serve(args, env)
        if args.command == "check-config":
            return _check_config(args, env)
        if args.command == "sandbox":
            return _sandbox(args)
        if args.command == "demo":
            return _demo(args, env)
        if args.command == "dead-letters":
            return _dead_letters(args, env)
    except ConfigError as exc:
        print(f"ortto-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


def _settings(args: argparse.Namespace, env: Mapping[str, str], **kw: Any) -> Settings:
    return load_settings(env, getattr(args, "config", None), **kw)


def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = _settings(args, env)
    setup_logging(settings.log_level)
    from gateway.server import serve

    _run(serve(settings))
    return 0


def _check_config(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = _settings(args, env)
    print(json.dumps(describe(settings), indent=2, sort_keys=False))
    if not settings.activities:
        print(
            "ortto-gateway: warning: GATEWAY_ACTIVITIES is empty: every activity is refused",
            file=sys.stderr,
        )
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.sandbox import SandboxState, create_sandbox_app

    try:
        where = parse_host_port(args.listen)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    key = "sandbox-key"
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            key = f.read().strip()
    setup_logging("INFO")
    print(f"sandbox upstream on http://{where}/v1/activities/create", flush=True)
    web.run_app(
        create_sandbox_app(SandboxState(api_key=key)),
        host=where.host,
        port=where.port,
        print=None,
        access_log=None,
    )
    return 0


def _demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from gateway.demo import run_demo

    try:
        where = parse_host_port(args.listen)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    setup_logging("WARNING")
    _run(run_demo(where))
    return 0


def _run(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _dead_letters(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = _settings(args, env, require_api_key=False)
    if not os.path.exists(settings.spool_path):
        print(f"ortto-gateway: no spool at {settings.spool_path}", file=sys.stderr)
        return 1
    if args.action == "purge" and not args.yes:
        ids = args.ids or None
        what = f"dead letters {ids}" if ids else "ALL dead letters"
        if args.error:
            what += f" whose error contains {args.error!r}"
        if not sys.stdin.isatty():
            print("ortto-gateway: purge needs --yes when not interactive", file=sys.stderr)
            return EXIT_CONFIG
        answer = input(f"Delete {what}? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            print("nothing deleted")
            return 1
    return asyncio.run(_dead_letters_async(args, settings))


async def _dead_letters_async(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.spool import Spool

    spool = Spool(settings.spool_path)
    await spool.open()
    try:
        ids = getattr(args, "ids", None) or None
        if args.action == "list":
            letters = await spool.list_dead_letters(limit=args.limit, error_contains=args.error)
            for letter in letters:
                row = {
                    "id": letter.id,
                    "activity_id": letter.activity_id,
                    "person": letter.person_hash,
                    "error": letter.error,
                    "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.failed_at)),
                }
                if args.json:
                    print(json.dumps(row))
                else:
                    print(
                        f"{row['id']:>8}  {row['failed_at']}  {row['activity_id']:<32} "
                        f"{row['person']:<14} {row['error']}"
                    )
            if not args.json:
                print(f"{len(letters)} dead letter(s)", file=sys.stderr)
            return 0
        if args.action == "replay":
            count = await spool.replay_dead_letters(ids=ids, error_contains=args.error)
            print(f"re-queued {count} activit{'y' if count == 1 else 'ies'}")
            return 0
        if args.action == "purge":
            count = await spool.purge_dead_letters(ids=ids, error_contains=args.error)
            print(f"deleted {count} dead letter(s)")
            return 0
    finally:
        await spool.close()
    raise AssertionError(args.action)  # pragma: no cover
