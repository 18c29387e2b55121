"""`serve --workers N`: N processes on one port (SO_REUSEPORT) under a small supervisor.

Each worker is a whole gateway with its own spool file (`spool.w<i>.sqlite3` beside
`GATEWAY_SPOOL_PATH`) and delivery worker; limits are shared through Redis, which is
why more than one worker without `GATEWAY_REDIS_URL` is refused (each process would
grant the full budget). Metrics use prometheus-client's multiprocess mode: workers
write to a private directory and the supervisor serves them all, summed, on the
metrics listener. The supervisor restarts a worker that dies and, on SIGTERM or
SIGINT, passes the signal on and waits for every worker to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
from dataclasses import replace
from multiprocessing.process import BaseProcess

from gateway.config import ConfigError, Settings
from gateway.runtime import EXIT_CONFIG, EXIT_IN_USE, EXIT_SPOOL, run_loop, tune_gc
from gateway.spool.files import worker_spool_path

log = logging.getLogger("gateway.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Exit codes of a worker that a restart would not fix.
FATAL_EXITS = frozenset({EXIT_CONFIG, EXIT_IN_USE, EXIT_SPOOL})
# A worker that keeps dying is restarted at most this often.
RESTART_DELAY = 1.0
# How long the supervisor waits for workers beyond their own drain timeout.
EXIT_GRACE = 5.0
# How often a worker checks that its supervisor is still there.
PARENT_CHECK_INTERVAL = 1.0


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse a worker count that would break the limits."""
    if workers < 1:
        raise ConfigError("--workers: expected a positive number")
    if workers > 1 and not settings.redis_url:
        raise ConfigError(
            f"--workers {workers}: needs GATEWAY_REDIS_URL; without shared limits each "
            "worker would grant the full budget (the limits would multiply)"
        )


def _worker_main(settings: Settings, index: int, supervisor: int) -> None:
    """Entry point of one worker process (spawned: a fresh interpreter)."""
    from gateway.logs import setup_logging
    from gateway.spool import SpoolInUse, SpoolOpenError

    setup_logging(settings.log_level)
    try:
        run_loop(_run_worker(settings, index, supervisor))
    except SpoolInUse as exc:  # a worker of another gateway still drains this file
        log.error("cannot start worker", extra={"data": {"worker": index, "error": str(exc)}})
        raise SystemExit(EXIT_IN_USE) from None
    except SpoolOpenError as exc:  # a full or read-only disk: a restart would not help
        log.error("cannot start worker", extra={"data": {"worker": index, "error": str(exc)}})
        raise SystemExit(EXIT_SPOOL) from None
    except ConfigError as exc:  # the public port taken since the supervisor checked it
        log.error("cannot start worker", extra={"data": {"worker": index, "error": str(exc)}})
        raise SystemExit(EXIT_CONFIG) from None


async def _run_worker(settings: Settings, index: int, supervisor: int) -> None:
    """`serve` as worker `index`, drained and stopped if the supervisor goes away.

    A supervisor killed outright (SIGKILL, OOM) cannot pass SIGTERM on; without this its
    workers would go on serving, unsupervised, with spool files that a new gateway
    cannot take over while they hold them.
    """
    from gateway.server import serve

    stop = asyncio.Event()

    async def watch_supervisor() -> None:
        # `supervisor` is the pid the supervisor gave at spawn: one read here, after the
        # start-up, would be the reaper's if the supervisor died meanwhile.
        # Polled: no event tells a process its parent died (getppid changes to a reaper).
        while os.getppid() == supervisor:  # noqa: ASYNC110
            await asyncio.sleep(PARENT_CHECK_INTERVAL)
        log.error("the supervisor is gone: draining and exiting", extra={"data": {"worker": index}})
        stop.set()

    watcher = asyncio.create_task(watch_supervisor())
    try:
        await serve(settings, stop=stop, worker=index, on_ready=lambda _p, _m: tune_gc())
    finally:
        watcher.cancel()


def worker_settings(settings: Settings, index: int, workers: int) -> Settings:
    """One worker's settings: its own spool, and its fallback share of Ortto's request rate."""
    return replace(
        settings,
        spool_path=worker_spool_path(settings.spool_path, index),
        # Ortto's limit is per account: the workers share the rate through Redis; when
        # Redis fails, each keeps to its share of it.
        upstream_rate_fallback=settings.upstream_rate_share / workers,
    )


def _spawn(settings: Settings, index: int, workers: int) -> BaseProcess:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=_worker_main,
        args=(worker_settings(settings, index, workers), index, os.getpid()),
        name=f"ortto-gateway-worker-{index}",
        daemon=False,
    )
    proc.start()
    return proc


async def supervise(settings: Settings, workers: int) -> int:
    """Run `workers` gateway processes and the shared metrics listener until a signal;
    the exit code (non-zero when a worker could not start for a cause a restart keeps)."""
    check_workers(settings, workers)
    metrics_dir = tempfile.mkdtemp(prefix="ortto-gateway-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the spawned workers
    try:
        return await _supervise(settings, workers, metrics_dir)
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)


async def _supervise(settings: Settings, workers: int, metrics_dir: str) -> int:
    from aiohttp import web
    from prometheus_client import CollectorRegistry, ProcessCollector
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    from gateway.app import create_metrics_app
    from gateway.console_state import Console, PublicAddress
    from gateway.feed_open import open_feed
    from gateway.server import bound_port, check_bindable, start_site

    check_bindable(settings.listen, "GATEWAY_LISTEN", reuse_port=True)
    check_bindable(settings.metrics_listen, "GATEWAY_METRICS_LISTEN")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    # The workers' process metrics are not summable; the supervisor reports its own.
    ProcessCollector(namespace="ortto_gateway", registry=registry)
    # The supervisor's console reads every worker's events (the feed merges them).
    feed = open_feed(settings)
    public = PublicAddress(settings.listen.host, settings.listen.port)
    console = Console(settings, feed, registry, public)
    runner = web.AppRunner(create_metrics_app(registry, console=console), access_log=None)
    await runner.setup()
    try:
        await start_site(runner, settings.metrics_listen, setting="GATEWAY_METRICS_LISTEN")
    except ConfigError:
        await runner.cleanup()
        await feed.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    procs = [_spawn(settings, i, workers) for i in range(workers)]
    log.info(
        "workers started",
        extra={
            "data": {
                "workers": workers,
                "public": str(settings.listen),
                "metrics": f"{settings.metrics_listen.host}:{bound_port(runner)}",
                "pids": [p.pid for p in procs],
            }
        },
    )
    exit_code = 0
    try:
        while not stop.is_set():
            for i, proc in enumerate(procs):
                if not proc.is_alive() and proc.exitcode in FATAL_EXITS and not stop.is_set():
                    # The spool cannot be opened or is held elsewhere: every restart would
                    # fail the same way, so the gateway stops and says so, as `serve` does.
                    log.error(
                        "worker cannot start; stopping",
                        extra={"data": {"worker": i, "exitcode": proc.exitcode}},
                    )
                    exit_code = proc.exitcode or 1
                    stop.set()
                elif not proc.is_alive() and not stop.is_set():
                    log.error(
                        "worker died; restarting",
                        extra={"data": {"worker": i, "exitcode": proc.exitcode}},
                    )
                    if proc.pid is not None:
                        mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
                    procs[i] = _spawn(settings, i, workers)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RESTART_DELAY)
        log.info("stopping workers")
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = settings.drain_timeout + EXIT_GRACE
        await asyncio.to_thread(_join_all, procs, deadline)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        await feed.close()
    log.info("stopped")
    return exit_code


def _join_all(procs: list[BaseProcess], timeout: float) -> None:
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
