"""The `ortto-gateway` command line: serve, demo, sandbox, check-config, dead-letters, shim."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gateway import __version__, compiled
from gateway.config import (
    ConfigError,
    Settings,
    describe,
    load_settings,
    parse_host_port,
    read_key_file,
)
from gateway.logs import setup_logging
from gateway.runtime import EXIT_CONFIG, EXIT_IN_USE, EXIT_SPOOL, run_loop, tune_gc
from gateway.settings_docs import settings_help
from gateway.spool import SpoolError, SpoolInUse


def worker_count(text: str) -> int:
    """`--workers`: a number, or `auto` for one worker per CPU this process may use."""
    if text.strip().lower() == "auto":
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        return len(usable) if usable else os.cpu_count() or 1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers nor auto") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ortto-gateway",
        description="Relay browser Ortto activities with the private key kept on the server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # The settings, generated from their declarations, close the help of both commands.
    settings = settings_help()
    raw = argparse.RawDescriptionHelpFormatter
    serve = sub.add_parser("serve", help="run the gateway", epilog=settings, formatter_class=raw)
    serve.add_argument("--config", help="TOML settings file (default: $GATEWAY_CONFIG)")
    serve.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="processes sharing the public port, or `auto`: one per CPU this process may "
        "run on (more than 1 needs GATEWAY_REDIS_URL)",
    )

    demo = sub.add_parser("demo", help="gateway + sandbox upstream + demo page, no account needed")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="public listener host:port")

    sandbox = sub.add_parser("sandbox", help="the sandbox upstream alone (Ortto stand-in)")
    sandbox.add_argument("--listen", default="127.0.0.1:8099", help="host:port")
    sandbox.add_argument(
        "--api-key-file", help="file holding the key the sandbox expects (default: sandbox-key)"
    )
    sandbox.add_argument(
        "--person-fields", default="", help="comma list of custom person fields (str:cm:tier,...)"
    )
    sandbox.add_argument(
        "--answers", choices=("ingested", "queued"), default="ingested", help="answer mode"
    )

    check = sub.add_parser(
        "check-config",
        help="validate and print the effective settings",
        epilog=settings,
        formatter_class=raw,
    )
    check.add_argument("--config", help="TOML settings file (default: $GATEWAY_CONFIG)")

    sign = sub.add_parser(
        "sign-identity", help="make a signed identity token (for testing; sites sign server-side)"
    )
    sign.add_argument("email", nargs="?", help="the visitor's email")
    sign.add_argument("--person-id", help="sign Ortto's person_id instead of an email")
    sign.add_argument("--ttl", default="1h", help="how long the token is valid (default 1h)")
    sign.add_argument("--config", help="TOML settings file (default: $GATEWAY_CONFIG)")

    shim = sub.add_parser(
        "shim", help="print the loader snippet for a page: the shim's versioned URL and SRI hash"
    )
    shim.add_argument(
        "--prefix",
        default="/ortto/",
        help="where pages reach the gateway: a path (/ortto/ behind the nginx kit) or a URL",
    )

    dead = sub.add_parser(
        "dead-letters",
        help="inspect and re-send what Ortto refused",
        parents=[_dead_letter_options(None)],
    )
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    # SUPPRESS: an option left out after the action keeps the value given before it.
    after = [_dead_letter_options(argparse.SUPPRESS)]
    dl_list = dead_sub.add_parser("list", help="show dead letters", parents=after)
    dl_list.add_argument("--limit", type=int, default=100)
    dl_list.add_argument("--error", help="only those whose error contains this text")
    dl_list.add_argument("--json", action="store_true", help="one JSON object a line")
    replay = dead_sub.add_parser(
        "replay", help="queue dead letters for delivery again", parents=after
    )
    replay.add_argument("ids", nargs="*", type=int, help="dead-letter ids (default: all)")
    replay.add_argument("--error", help="only those whose error contains this text")
    purge = dead_sub.add_parser("purge", help="delete dead letters", parents=after)
    purge.add_argument("ids", nargs="*", type=int, help="dead-letter ids (default: all)")
    purge.add_argument("--error", help="only those whose error contains this text")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    spool = sub.add_parser("spool", help="move a retired host's backlog: export, import")
    spool_sub = spool.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = spool_sub.add_parser("export", help="write queued activities as JSON Lines")
    importer = spool_sub.add_parser("import", help="add exported activities to a spool")
    for action in (export, importer):
        action.add_argument("--config", help="TOML settings file (default: $GATEWAY_CONFIG)")
        action.add_argument(
            "--spool", help="one spool file (default: GATEWAY_SPOOL_PATH, and every worker's)"
        )
    export.add_argument("--dead-letters", action="store_true", help="the dead letters too")
    export.add_argument("-o", "--output", help="a new file (default: standard output)")
    export.add_argument(
        "--move", action="store_true", help="delete what was exported (needs -o; gateway stopped)"
    )
    importer.add_argument("file", help="a file `spool export` wrote")
    return parser


def _dead_letter_options(default: Any) -> argparse.ArgumentParser:
    """`--config` and `--spool` of `dead-letters`, a parent parser for before and after the action.

    A fresh parser each call: parents share their option objects, so the two defaults
    (None before the action, SUPPRESS after it) need two parsers.
    """
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--config", default=default, help="TOML settings file (default: $GATEWAY_CONFIG)"
    )
    options.add_argument(
        "--spool",
        default=default,
        help="one spool file (default: GATEWAY_SPOOL_PATH and every worker's)",
    )
    return options


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
        if args.command == "sign-identity":
            return _sign_identity(args, env)
        if args.command == "shim":
            return _shim(args)
        if args.command == "spool":
            return _spool(args, env)
    except ConfigError as exc:
        print(f"ortto-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SpoolInUse as exc:  # another gateway drains this spool: never share one
        print(
            f"ortto-gateway: GATEWAY_SPOOL_PATH {exc} (stop that gateway, or set "
            "GATEWAY_SPOOL_PATH to another file)",
            file=sys.stderr,
        )
        return EXIT_IN_USE
    except SpoolError as exc:  # e.g. "cannot open the spool PATH: database or disk is full"
        print(f"ortto-gateway: {exc}", file=sys.stderr)
        return EXIT_SPOOL
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


def _settings(args: argparse.Namespace, env: Mapping[str, str], **kw: Any) -> Settings:
    return load_settings(env, getattr(args, "config", None), **kw)


def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = _settings(args, env)
    from gateway.workers import check_workers, supervise

    check_workers(settings, args.workers)
    setup_logging(settings.log_level)
    compiled.warn_if_ignored()
    if settings.delivery == "queue":
        # Spool files of a former worker count: their accepted activities must still go out.
        from gateway.spool.adopt import adopt_orphans
        from gateway.spool.files import drained_spool_files, spool_files

        owned = drained_spool_files(settings.spool_path, args.workers)
        adopt_orphans(spool_files(settings.spool_path), owned)
    if args.workers > 1:
        return run_loop(supervise(settings, args.workers)) or 0
    from gateway.server import serve

    run_loop(serve(settings, on_ready=lambda _public, _metrics: tune_gc()))
    return 0


def _check_config(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = _settings(args, env)
    print(json.dumps(describe(settings), indent=2, sort_keys=False))
    print(f"ortto-gateway: compiled: {compiled.summary()}", file=sys.stderr)
    if (ignored := compiled.ignored()) is not None:
        print(f"ortto-gateway: warning: compiled modules ignored: {ignored}", file=sys.stderr)
    if not settings.activities:
        print(
            "ortto-gateway: warning: GATEWAY_ACTIVITIES is empty: every activity is refused",
            file=sys.stderr,
        )
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.sandbox import SandboxState, create_sandbox_app
    from gateway.server import bind_socket

    try:
        where = parse_host_port(args.listen)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    key = read_key_file(args.api_key_file, "--api-key-file") if args.api_key_file else "sandbox-key"
    custom = [name.strip() for name in args.person_fields.split(",") if name.strip()]
    try:
        state = SandboxState(api_key=key, person_fields=custom, answers=args.answers)
    except ValueError as exc:
        raise ConfigError(f"--person-fields: {exc}") from None
    # Bound here, not by run_app: a port in use is then one line naming --listen.
    sock = bind_socket(where, "--listen", "give --listen another port")
    setup_logging("INFO")
    print(f"sandbox upstream on http://{where}/v1/activities/create", flush=True)
    with sock:
        web.run_app(create_sandbox_app(state), sock=sock, print=None, access_log=None)
    return 0


def _demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from gateway.demo import run_demo

    try:
        where = parse_host_port(args.listen)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    setup_logging("WARNING")
    compiled.warn_if_ignored()
    run_loop(run_demo(where))
    return 0


def _shim(args: argparse.Namespace) -> int:
    from gateway.shim import ShimFile, pinned_snippet

    print(pinned_snippet(ShimFile.load(), args.prefix))
    return 0


def _sign_identity(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from gateway.config import parse_seconds
    from gateway.identity import sign_identity, sign_person_id

    settings = _settings(args, env, require_api_key=False)
    if not settings.identity_secrets:
        raise ConfigError("GATEWAY_IDENTITY_SECRET: required to sign identities")
    try:
        ttl = parse_seconds(args.ttl)
    except ValueError as exc:
        raise ConfigError(f"--ttl: {exc}") from None
    if (args.email is None) == (args.person_id is None):
        raise ConfigError("sign-identity: give an EMAIL or --person-id, one of them")
    expires = int(time.time() + ttl)
    secret = settings.identity_secrets[0]
    if args.person_id is not None:
        print(sign_person_id(args.person_id, secret, expires))
    else:
        print(sign_identity(args.email, secret, expires))
    return 0


def _dead_letters(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from gateway.spool.files import spool_files

    settings = _settings(args, env, require_api_key=False)
    files = [args.spool] if args.spool else spool_files(settings.spool_path)
    if not files or not all(os.path.exists(f) for f in files):
        print(f"ortto-gateway: no spool at {args.spool or settings.spool_path}", file=sys.stderr)
        return 1
    ids = getattr(args, "ids", None) or None
    if ids and len(files) > 1:
        print(
            "ortto-gateway: several spool files (one per worker): choose one with --spool "
            "to act on dead letters by id",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if args.action == "purge" and not args.yes:
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
    return asyncio.run(_dead_letters_async(args, files, ids, settings.secrets))


async def _dead_letters_async(
    args: argparse.Namespace, files: list[str], ids: list[int] | None, secrets: Sequence[str]
) -> int:
    from gateway import deadletters
    from gateway.spool import in_use

    total = 0
    if args.action == "list":
        letters = await deadletters.list_letters(
            files, limit=args.limit, error_contains=args.error, secrets=secrets
        )
        total = len(letters)
        for letter in letters:
            _print_letter(args, letter, several=len(files) > 1)
        if not args.json:
            print(f"{total} dead letter(s)", file=sys.stderr)
    elif args.action == "replay":
        replayed = await deadletters.replay(files, ids=ids, error_contains=args.error)
        for path, count in replayed.items():
            if count and not in_use(path):  # checked with the file closed (see spool.claim)
                print(
                    f"ortto-gateway: warning: no running gateway drains {path}: its {count} "
                    "re-queued activities go out when the gateway next starts",
                    file=sys.stderr,
                )
        total = sum(replayed.values())
        print(f"re-queued {total} activit{'y' if total == 1 else 'ies'}")
    elif args.action == "purge":
        total = sum((await deadletters.purge(files, ids=ids, error_contains=args.error)).values())
        print(f"deleted {total} dead letter(s)")
    return 0


def _print_letter(args: argparse.Namespace, letter: Any, *, several: bool) -> None:
    row = letter.row()
    if several:
        row["spool"] = letter.spool
    if args.json:
        print(json.dumps(row))
    else:
        where = f"  {letter.spool}" if several else ""
        print(
            f"{row['id']:>8}  {row['failed_at']}  {row['activity_id']:<32} "
            f"{row['person']:<14} {row['error']}{where}"
        )


def _spool(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`spool export` and `spool import` (gateway.spool.transfer), with their counts."""
    from pathlib import Path

    from gateway.spool import transfer
    from gateway.spool.files import spool_files
    from gateway.upstream import redact

    settings = _settings(args, env, require_api_key=False)
    files = [args.spool] if args.spool else spool_files(settings.spool_path)
    if args.action == "import":
        # Into the first spool file a gateway drains (worker 0's takes in orphans too).
        target = files[0] if files else settings.spool_path
        done = transfer.import_file(Path(args.file), target)
        print(
            f"imported {done.queued} activities and {done.dead_letters} dead letters into "
            f"{target}; skipped {done.duplicates} as duplicates"
        )
        return 0
    if not files:
        raise SpoolError(f"no spool at {settings.spool_path}")
    if args.move and not args.output:
        raise ConfigError("spool export --move: needs -o FILE (written and synced first)")

    def masked(error: str) -> str:
        return redact(error, settings.secrets)

    if args.output:
        exported = transfer.export_to_file(
            files, Path(args.output), dead=args.dead_letters, move=args.move, redact=masked
        )
    else:
        sys.stdout.flush()
        exported = transfer.export_to_stream(
            files, sys.stdout.buffer, dead=args.dead_letters, redact=masked
        )
        sys.stdout.buffer.flush()
    print(
        f"{'moved' if args.move else 'exported'} {exported.queued} activities and "
        f"{exported.dead_letters} dead letters",
        file=sys.stderr,
    )
    return 0
