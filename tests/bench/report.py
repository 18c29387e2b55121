"""Figures derived from one run's measurements, and the table printed at the end."""

from __future__ import annotations

from typing import Any

ROW_ORDER = (
    "baseline",
    "shell",
    "durable",
    "durable_pure",
    "memory",
    "info_logs",
    "batch10",
    "redis_w1",
    "redis_w2",
)
DURABLE_TARGET = 0.80  # issue 3: durable >= 80 % of in-memory
SCALE_OUT_TARGET = 1.7  # issue 21: `--workers 2` (Redis limits) at least 1.7x one worker
WRK_SATURATED = 0.8  # wrk cores per thread from which it may be the bottleneck
CPU_COLUMNS = ("server", "load generator", "sandbox", "redis", "other")


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the baseline and between rows; batch sizes; nothing not measured here."""
    rows = results["rows"]
    rate = {k: float(r["accepted_per_s"]) for k, r in rows.items()}
    base = rate.get("baseline", 0.0)
    per_cpu = {k: float(r["accepted_per_server_cpu_s"] or 0.0) for k, r in rows.items()}
    out: dict[str, Any] = {
        "vs_baseline": {k: _ratio(v, base) for k, v in rate.items()},
        "per_cpu_vs_baseline": {
            k: _ratio(v, per_cpu.get("baseline", 0.0)) for k, v in per_cpu.items()
        },
        "durable_over_memory": _ratio(rate.get("durable", 0), rate.get("memory", 0)),
        "durable_over_memory_per_cpu": _ratio(per_cpu.get("durable", 0), per_cpu.get("memory", 0)),
        "durable_target": DURABLE_TARGET,
        "info_over_warning": _ratio(rate.get("info_logs", 0), rate.get("durable", 0)),
        "info_over_warning_per_cpu": _ratio(per_cpu.get("info_logs", 0), per_cpu.get("durable", 0)),
        "compiled_over_pure": _ratio(rate.get("durable", 0), rate.get("durable_pure", 0)),
        "compiled_over_pure_per_cpu": _ratio(
            per_cpu.get("durable", 0), per_cpu.get("durable_pure", 0)
        ),
        "batch10_over_durable": _ratio(rate.get("batch10", 0), rate.get("durable", 0)),
        "batch10_over_durable_per_cpu": _ratio(
            per_cpu.get("batch10", 0), per_cpu.get("durable", 0)
        ),
    }
    drain = rows.get("durable", {}).get("drain")
    if drain:
        stats = drain["sandbox"]
        requests = int(stats["requests"])
        backlog = int(drain["backlog_at_end_of_load"])
        out["upstream"] = {
            "activities": int(stats["activities"]),
            "duplicates": int(stats["duplicates"]),
            "requests": requests,
            "activities_per_request": round(int(stats["activities"]) / requests, 2)
            if requests
            else None,
            "backlog_at_end_of_load": backlog,
            "left_after_drain": drain["left"],
            "drain_s": drain["waited_s"],
            "drain_rate_per_s": round(backlog / drain["waited_s"], 1)
            if drain["left"] == 0 and drain["waited_s"] > 0
            else None,
        }
        out["upstream_statuses"] = drain.get("upstream_requests", {})
    if "redis_w1" in rows and "redis_w2" in rows:
        w1, w2 = rows["redis_w1"], rows["redis_w2"]
        ratio = _ratio(rate["redis_w2"], rate["redis_w1"])
        threads = int(results["options"]["scale_out_load"].split()[0].removeprefix("-t"))
        wrk_cores = [c.get("load generator", 0.0) for r in (w1, w2) for c in r["cpu_cores_rounds"]]
        checked = [
            keys >= accepted
            for r in (w1, w2)
            for keys, accepted in zip(
                r["redis_keys_at_end"], r["accepted_incl_warmup"], strict=True
            )
        ]
        # What the two workers could reach at most here: the CPUs the other processes left
        # them during the 2-worker row, each used at the 1-worker row's cost per activity.
        others = sum(v for k, v in w2["cpu_cores"].items() if k not in ("server", "total_busy"))
        cpus = results["machine"].get("cpus_usable") or results["machine"]["nproc"]
        server_1 = w1["cpu_cores"].get("server", 0.0)
        out["scale_out"] = {
            "workers_2_over_1": ratio,
            "ceiling_here": round(min(2.0, (cpus - others) / server_1), 2) if server_1 else None,
            "other_processes_cores_2_workers": round(others, 2),
            "workers_2_over_1_per_cpu": _ratio(per_cpu["redis_w2"], per_cpu["redis_w1"]),
            "target_above": SCALE_OUT_TARGET,
            "met": ratio is not None and ratio > SCALE_OUT_TARGET,
            "redis_1_worker_over_durable": _ratio(rate["redis_w1"], rate.get("durable", 0)),
            "load": results["options"]["scale_out_load"],
            "load_generator_cores_per_thread_max": round(max(wrk_cores) / threads, 2),
            "machine_busy_cores_2_workers": w2["cpu_cores"].get("total_busy"),
            "every_accepted_activity_in_redis": all(checked),
            "limiter_errors": sum(sum(r["limiter_errors"]) for r in (w1, w2)),
            "processes_left_after_stop": sum(sum(r["processes_left_after_stop"]) for r in (w1, w2)),
        }
    stores = results.get("limiter_stores")
    if stores:
        t = stores["throughput"]
        out["limiter_stores"] = {
            key: {
                "memory_acquires_per_s": t["memory"][key]["acquires_per_s"],
                "redis_acquires_per_s": t["redis"][key]["acquires_per_s"],
                "redis_over_memory": _ratio(
                    t["redis"][key]["acquires_per_s"], t["memory"][key]["acquires_per_s"]
                ),
            }
            for key in ("single", "batch100")
        }
        mem = stores["redis_memory"]
        out["limiter_bytes_per_key"] = {
            "redis_used_memory": mem["used_memory_bytes_per_key"],
            "redis_used_memory_keys": mem["keys"],
            "redis_memory_usage_1_time": mem["memory_usage_bytes_by_times"]["1"],
            "redis_memory_usage_10_times": mem["memory_usage_bytes_by_times"]["10"],
            "memory_store_rss": (results.get("limiter") or {}).get("rss_bytes_per_key"),
            "memory_store_keys": (results.get("limiter") or {}).get("keys"),
        }
    return out


def _f(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def _commit_modes(rows: dict[str, Any]) -> str:
    """Where each gateway row's spool committed, e.g. "loop" or "durable: loop, ..."."""
    modes = {
        key: sorted({m for per_round in row.get("spool_commit", []) for m in per_round})
        for key, row in rows.items()
        if key != "baseline"
    }
    found = {"/".join(v) or "?" for v in modes.values()}
    if len(found) == 1:
        return f"{found.pop()} in every gateway row"
    return ", ".join(f"{key}: {'/'.join(v) or '?'}" for key, v in modes.items())


def render(results: dict[str, Any]) -> str:
    """The report: machine, table, and the derived lines, every number from `results`."""
    m = results["machine"]
    opts = results["options"]
    d = results["derived"]
    rows = results["rows"]
    git = m["git"]
    commit = git["commit"][:12] + (
        f" (+{git['modified_files']} modified files)" if git["dirty"] else ""
    )
    fs = m["spool_filesystem"]
    lines = [
        f"ortto-gateway benchmark, {m['date_utc']}, commit {commit}",
        f"machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['mem_total_mib']} MiB, "
        f"Linux {m['kernel']}; Python {m['python']}, aiohttp {m['aiohttp']}, "
        f"SQLite {m['sqlite']}, {m['event_loop']}",
        f"durable spool on {fs['fstype']} ({fs['device']}), 4 KiB write + fsync p50 "
        f"{m['fsync']['p50_ms']:.2f} ms, p99 {m['fsync']['p99_ms']:.2f} ms; load average at "
        f"start {' '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
        f"spool commits (GATEWAY_SPOOL_COMMIT={opts.get('spool_commit', 'auto')}): "
        f"{_commit_modes(rows)}",
        f"max rate: {m['load_tool']}, {opts['warmup_s']} s warm-up + {opts['duration_s']} s "
        f"measured per row; every request a new person, one activity (the 10-activity row: "
        "ten people); accepted/s counts activities",
        f"fixed rate: {m['fixed_rate_tool']}",
    ]
    redis = results.get("redis") or {}
    if "version" in redis:
        lines.append(
            f"redis: {redis['version']}, {redis['args']}; scale-out rows: wrk "
            f"{opts['scale_out_load']}"
        )
    elif "skipped" in redis:
        lines.append(f"redis: rows skipped ({redis['skipped']})")
    lines.append("")
    rounds = opts["rounds"]
    header = (
        f"{'scenario':<34} {'accepted/s':>10} {'spread':>7} {'vs base':>7} {'per CPU-s':>9} "
        f"{'vs base':>7} {'non-202':>7} {'errors':>6} {'peak RSS':>9}  "
        "CPU cores server/load/sandbox/redis/other"
    )
    lines += [header, "-" * len(header)]
    for key in ROW_ORDER:
        if key not in rows:
            continue
        r = rows[key]
        cpu = r["cpu_cores"]
        spread = "" if r["spread"] is None or rounds < 2 else f"±{r['spread'] * 100:.0f}%"
        lines.append(
            f"{r['label']:<34} {r['accepted_per_s']:>10,.0f} {spread:>7} "
            f"{_f(d['vs_baseline'].get(key), '.2f'):>7} "
            f"{_f(r['accepted_per_server_cpu_s']):>9} "
            f"{_f(d['per_cpu_vs_baseline'].get(key), '.2f'):>7} "
            f"{r['non_202']:>7,} {r['errors']:>6,} {_mib(r['peak_rss_kib']):>9}  "
            + "/".join(f"{cpu[k]:.2f}" if k in cpu else "-" for k in CPU_COLUMNS)
        )
    lines.append(
        f"accepted/s: over {rounds} round(s) of {opts['duration_s']} s, each in a fresh process;"
        " spread: half the range between rounds;"
    )
    lines.append(
        "per CPU-s: accepted per CPU-second the server used (steadier when other processes"
        " compete); CPU: mean cores used during the measurement"
    )
    if "redis_w2" in rows:
        lines.append(
            "2 workers: server CPU and peak RSS summed over the supervisor, its workers and"
            " multiprocessing's resource tracker"
        )
    lines.append("")
    dm = d["durable_over_memory"]
    if dm is not None:
        verdict = "met" if dm >= d["durable_target"] else "NOT met"
        lines.append(
            f"durable / in-memory spool: {dm:.2f} in accepted/s (target >= "
            f"{d['durable_target']:.2f}: {verdict}), "
            f"{_f(d['durable_over_memory_per_cpu'], '.2f')} per server CPU-second"
        )
    iw = d["info_over_warning"]
    if iw is not None and "info_logs" in rows:
        logs = rows["info_logs"].get("logs", [])
        n_lines = sum(log.get("lines", 0) for log in logs)
        n_bytes = sum(log.get("bytes", 0) for log in logs)
        lines.append(
            f"INFO logging (one JSON line per request, to a file): {iw:.2f} of the WARNING "
            f"throughput, {_f(d['info_over_warning_per_cpu'], '.2f')} per server CPU-second "
            f"({n_lines:,} lines, {n_bytes / 1e6:.1f} MB written)"
        )
    cp = d.get("compiled_over_pure")
    if cp is not None and "durable_pure" in rows:
        built = m.get("compiled", "no")
        lines.append(
            f"compiled core (make compiled: {built}) over pure Python, durable spool: "
            f"{cp:.2f}x in accepted/s, {_f(d['compiled_over_pure_per_cpu'], '.2f')}x per "
            "server CPU-second"
            + ("" if built.startswith("yes") else " (no build: both rows ran pure Python)")
        )
    b10 = d.get("batch10_over_durable")
    if b10 is not None and "batch10" in rows:
        lines.append(
            f"10 activities per request: {rows['batch10']['accepted_per_s']:,.0f} activities/s, "
            f"{b10:.2f}x the one-activity durable row "
            f"({_f(d['batch10_over_durable_per_cpu'], '.2f')}x per server CPU-second)"
        )
    shell = d["vs_baseline"].get("shell")
    if shell is not None and "durable" in rows:
        lines.append(
            f"HTTP shell alone (relay stubbed): {shell:.2f} of the baseline, the most any relay "
            f"behind it could reach; the relay (validation, limits, enrichment, spool) takes "
            f"the durable row to {_f(d['vs_baseline']['durable'], '.2f')}"
        )
    lat = results.get("latency")
    if lat:
        res = lat["result"]
        ms = res["latency_ms"]
        extra = res
        sv = res["service_latency_ms"]
        lines.append(
            f"latency at {lat['offered_rate']:,.0f}/s offered (half the durable max), durable "
            f"spool, {res['duration_s']:g} s:"
        )
        for label, q in (("from scheduled send", ms), ("from actual send   ", sv)):
            lines.append(
                f"  {label}: p50 {_f(q.get('p50'), '.2f')} ms, p90 {_f(q.get('p90'), '.2f')} ms, "
                f"p99 {_f(q.get('p99'), '.2f')} ms, p99.9 {_f(q.get('p99_9'), '.2f')} ms, "
                f"max {_f(q.get('max'), '.2f')} ms"
            )
        lines.append(
            f"  {res['accepted']:,} accepted of {extra['scheduled']:,} scheduled "
            f"(sent at {_f(extra['achieved_send_rate'])}/s), {res['non_202']:,} non-202, "
            f"{sum(res['errors'].values()):,} errors; generator lag p99 "
            f"{_f(extra['dispatch_lag_ms'].get('p99'), '.2f')} ms"
        )
        server = lat["cpu_cores"].get("server", 0.0)
        rate = res["accepted_per_s"]
        at_max = rows.get("durable", {}).get("accepted_per_server_cpu_s")
        lines.append(
            f"  server CPU {server:.2f} cores = {_f(server * 1e6 / rate if rate else None)} us "
            f"per activity (at max rate: {_f(1e6 / at_max if at_max else None)} us); other "
            f"processes {lat['cpu_cores'].get('other', 0):.2f} cores"
        )
    up = d.get("upstream")
    if up:
        lines.append(
            f"upstream (durable row, after the spool drained): {up['activities']:,} activities "
            f"in {up['requests']:,} requests = {_f(up['activities_per_request'], '.1f')} per "
            f"request (max 100); {up['duplicates']:,} duplicates"
        )
        rate = opts["upstream_rate"]
        backlog = up["backlog_at_end_of_load"]
        ceiling = rate * 100
        if up["left_after_drain"]:
            drained = f"{up['left_after_drain']:,} NOT delivered after {up['drain_s']:g} s"
        else:
            drained = f"all delivered {up['drain_s']:g} s after the load stopped"
        kept_up = backlog <= ceiling  # no more than one second of delivery capacity
        lines.append(
            f"  backlog at the end of the max-rate load: {backlog:,} ({drained}); delivery "
            + ("kept up" if kept_up else "did NOT keep up")
            + f" (ceiling at GATEWAY_UPSTREAM_RATE={rate:g}: {ceiling:,.0f} activities/s"
            + (
                f", measured drain {_f(up['drain_rate_per_s'])}/s)"
                if not kept_up and up["drain_rate_per_s"]
                else ")"
            )
        )
        statuses = d.get("upstream_statuses") or {}
        lines.append(
            "  upstream answers: "
            + (", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items()) if v) or "none")
        )
    lines += _scale_out_lines(results)
    lines += three_hosts_lines(results)
    limiter = results.get("limiter")
    if limiter:
        traced = limiter.get("traced_bytes_per_key")
        lines.append(
            f"limiter MemoryStore: {limiter['keys']:,} keys, 1 timestamp each: "
            f"{limiter['rss_bytes_per_key']:.0f} B/key (RSS growth)"
            + (f", {traced:.0f} B/key (tracemalloc)" if traced is not None else "")
            + f"; filled at {limiter['acquires_per_s']:,} acquires/s"
        )
    lines += _store_lines(results)
    other = max(
        [c.get("other", 0.0) for k in rows for c in rows[k]["cpu_cores_rounds"]]
        + ([lat["cpu_cores"].get("other", 0.0)] if lat else [])
    )
    if other > 0.15:
        lines.append(
            f"WARNING: other processes used up to {other:.2f} cores during a phase: the machine "
            "was not quiet, figures are lower and noisier than on an idle machine"
        )
    logged_errors = sum(log.get("errors", 0) for k in rows for log in rows[k].get("logs", []))
    if logged_errors:
        lines.append(
            f"WARNING: the gateways logged {logged_errors} error line(s): see `logs` in the JSON"
        )
    so = d.get("scale_out")
    if so and so["load_generator_cores_per_thread_max"] >= WRK_SATURATED:
        lines.append(
            f"WARNING: wrk used up to {so['load_generator_cores_per_thread_max']:.2f} cores per "
            "thread in a scale-out row: it may have been the bottleneck (--scale-out-threads)"
        )
    if so and (so["limiter_errors"] or not so["every_accepted_activity_in_redis"]):
        lines.append(
            f"WARNING: the scale-out rows' limiter failed over to its in-process store "
            f"({so['limiter_errors']} errors): not every activity was checked in Redis"
        )
    if so and so["processes_left_after_stop"]:
        lines.append(
            f"WARNING: {so['processes_left_after_stop']} gateway process(es) outlived SIGTERM "
            "to the supervisor and were killed"
        )
    stores = results.get("limiter_stores")
    if stores:
        bad = sum(
            p["refused"] + p["errors"]
            for kind in stores["throughput"].values()
            for p in kind.values()
        )
        if bad:
            lines.append(
                f"WARNING: {bad} limiter-store calls were refused or failed: see limiter_stores"
            )
    nonaccepted = sum(rows[k]["non_202"] + rows[k]["errors"] for k in rows)
    if nonaccepted or (lat and (lat["result"]["non_202"] or lat["result"]["errors"])):
        lines.append("WARNING: some requests were not answered 202: see the table and the JSON")
    return "\n".join(lines)


def _scale_out_lines(results: dict[str, Any]) -> list[str]:
    """The `--workers 1` vs `--workers 2` comparison (limits in Redis)."""
    so = results["derived"].get("scale_out")
    if not so:
        return []
    rows = results["rows"]
    w1, w2 = rows["redis_w1"], rows["redis_w2"]
    nproc = results["machine"]["nproc"]
    verdict = "met" if so["met"] else "NOT met"
    redis_cores = "/".join(f"{r['cpu_cores'].get('redis', 0):.2f}" for r in (w1, w2))
    keys = sum(sum(r["redis_keys_at_end"]) for r in (w1, w2))
    accepted = sum(sum(r["accepted_incl_warmup"]) for r in (w1, w2))
    wrk = so["load_generator_cores_per_thread_max"]
    return [
        f"scale-out, limits in Redis, durable spool per worker, wrk {so['load']}: "
        f"--workers 1 {w1['accepted_per_s']:,.0f} accepted/s, --workers 2 "
        f"{w2['accepted_per_s']:,.0f} accepted/s",
        f"  2 workers / 1 worker: {_f(so['workers_2_over_1'], '.2f')} in accepted/s (target > "
        f"{so['target_above']:.2f}: {verdict}), "
        f"{_f(so['workers_2_over_1_per_cpu'], '.2f')} per server CPU-second; the machine was "
        f"busy {_f(so['machine_busy_cores_2_workers'], '.2f')} of {nproc} CPUs during the "
        "2-worker row",
        f"  the most 2 workers could reach on this machine: {_f(so.get('ceiling_here'), '.2f')}x"
        f" (the CPUs less the {_f(so.get('other_processes_cores_2_workers'), '.2f')} cores "
        "wrk, the sandbox, Redis and the VM's steal took, at the 1-worker row's CPU per "
        "activity)",
        f"  Redis limits, 1 worker / durable row (in-process limits): "
        f"{_f(so['redis_1_worker_over_durable'], '.2f')} in accepted/s; redis-server used "
        f"{redis_cores} cores (1/2 workers)",
        f"  wrk used at most {wrk:.2f} cores per thread ("
        + ("may be the bottleneck" if wrk >= WRK_SATURATED else "not the bottleneck")
        + f"); Redis held {keys:,} keys after the rows for {accepted:,} accepted activities "
        f"(one new person each; limiter errors: {so['limiter_errors']}); processes left "
        f"after SIGTERM to the supervisor: {so['processes_left_after_stop']}",
    ]


def three_hosts_lines(results: dict[str, Any]) -> list[str]:
    """Three gateways sharing one account's upstream rate through Redis."""
    th = results.get("three_hosts")
    if not th:
        return []
    if "skipped" in th:
        return [f"three hosts, one account: skipped ({th['skipped']})"]
    by_host = "/".join(f"{r:.2f}" for r in th["requests_per_s_by_host"])
    split = ":".join(str(p) for p in th["split"])
    lines = [
        f"three hosts, one account (separate spools, one Redis, sandbox limited to the plan "
        f"{th['plan_per_s']:g}/s, gateways told {th['told_per_s']:g}/s), traffic {split}, "
        f"{th['sent_activities_per_s']:,} activities/s for {th['warmup_s']:g} s + "
        f"{th['duration_s']:g} s measured:",
        f"  {th['requests_per_s']:.2f} upstream requests/s = {th['used_over_plan']:.3f} of the "
        f"plan ({th['used_over_told']:.3f} of the rate told); by host {by_host}; "
        f"{_f(th['activities_per_request'], '.1f')} activities per request",
        f"  most in any one second: {th['most_in_one_second']} (plan {th['plan_per_s']:g}); "
        f"429s: {th['upstream_429']}; {th['delivered']:,} of {th['accepted']:,} accepted "
        f"delivered ({th['lost']:,} lost, {th['duplicates']:,} duplicates, drained "
        f"{th['drain_s']:g} s after the load); paced without Redis: "
        f"{sum(f or 0 for f in th['fallbacks']):g}",
    ]
    bad = (
        th["most_in_one_second"] > th["plan_per_s"]
        or th["upstream_429"]
        or th["lost"]
        or th["duplicates"]
        or any(f != 0 for f in th["fallbacks"])
    )
    if bad:
        lines.append(
            "WARNING: the three hosts exceeded the plan, met 429s, lost or duplicated "
            "activities, or paced without Redis: see three_hosts in the JSON"
        )
    return lines


def _store_lines(results: dict[str, Any]) -> list[str]:
    """`MemoryStore` vs `RedisStore`: throughput, and Redis memory beside the in-process one."""
    stores = results.get("limiter_stores")
    if not stores:
        return []
    d = results["derived"]
    lines = [
        f"limiter stores, one process, {stores['callers']} concurrent asyncio callers of "
        f"Limiter.check_many, 2 rules per activity ({stores['rules']}), "
        f"{stores['duration_s']:g} s each:"
    ]
    for key, label in (
        ("single", "1 activity per call:   "),
        ("batch100", "100 activities per call:"),
    ):
        mem, red = stores["throughput"]["memory"][key], stores["throughput"]["redis"][key]
        lat = red["call_latency_ms"]
        lines.append(
            f"  {label} MemoryStore {mem['acquires_per_s']:,.0f} acquires/s, RedisStore "
            f"{red['acquires_per_s']:,.0f} acquires/s = "
            f"{_f(d['limiter_stores'][key]['redis_over_memory'], '.2f')} of MemoryStore "
            f"(Redis call p50 {_f(lat.get('p50'), '.2f')} ms, p99 {_f(lat.get('p99'), '.2f')} "
            f"ms; client {red['cpu_cores']['client']:.2f} cores, redis-server "
            f"{_f(red['cpu_cores']['redis'], '.2f')} cores)"
        )
    b = d["limiter_bytes_per_key"]
    mem = stores["redis_memory"]
    lines.append(
        f"limiter memory per key, 1 timestamp each: Redis {b['redis_used_memory']:.0f} B/key "
        f"(used_memory growth over {b['redis_used_memory_keys']:,} keys) vs MemoryStore "
        f"{_f(b['memory_store_rss'], '.0f')} B/key (RSS growth at "
        f"{_f(b['memory_store_keys'], ',')} keys, in process); Redis MEMORY USAGE of one "
        f"person key ({mem['key_name_chars']}-character name): "
        f"{b['redis_memory_usage_1_time']} B with 1 timestamp, "
        f"{b['redis_memory_usage_10_times']} B with 10"
    )
    return lines
