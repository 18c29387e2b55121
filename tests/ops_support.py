"""Helpers for tests/test_operations.py: a real Prometheus on loopback, PromQL names."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import Process, free_port, http_ok

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "ortto-gateway.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SYSTEMD_UNIT = ROOT / "deploy" / "systemd" / "ortto-gateway.service"
DOCKER = ROOT / "deploy" / "docker"
KUBERNETES = ROOT / "deploy" / "kubernetes"
GRAFANA_PROVISIONING = ROOT / "grafana" / "provisioning"

# What Grafana substitutes before a query reaches Prometheus (1 s scrapes in the tests).
GRAFANA_VARIABLES = {
    "${instance}": ".*",
    "$instance": ".*",
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "15s",
    "${__interval}": "15s",
    "$__range": "5m",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "atan2", "inf", "nan", "start", "end"}
)
_MATCHERS = r"""\{(?:[^}"']|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')*\}"""
_SELECTOR = re.compile(
    r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:])\s*("
    + _MATCHERS
    + r")?(?!\s*\()"
)


def substitute(expr: str) -> str:
    """A Grafana query as Prometheus receives it (variables replaced)."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels left out)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def selectors(expr: str) -> list[tuple[str, str]]:
    """Each vector selector of an expression: (metric name, its `{...}` matchers or '')."""
    text = _GROUPING.sub(" ", expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    strings = [m.span() for m in _STRING.finditer(text)]
    found = []
    for match in _SELECTOR.finditer(text):
        name, matchers = match.group(1), match.group(2) or ""
        if name.lower() in _KEYWORDS or any(a <= match.start() < b for a, b in strings):
            continue
        found.append((name, matchers))
    return found


def exported_names(exposition: str) -> set[str]:
    """Every series name a `/metrics` text can hold, from its TYPE lines and its samples."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows' nested panels included."""

    def walk(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
        found = []
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel.get("title", ""), target["expr"]))
            found += walk(panel.get("panels", []))
        return found

    return walk(dashboard.get("panels", []))


def alert_rules(groups: dict[str, Any]) -> list[dict[str, Any]]:
    """Every alerting rule of a Prometheus rules file."""
    return [rule for group in groups["groups"] for rule in group["rules"] if "alert" in rule]


class Prometheus:
    """`prometheus` on a free loopback port with its own config and TSDB in `workdir`."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Process | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self, config: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(config)
        argv = [
            self.binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.process = Process(argv, self.log_path, name="prometheus").launch()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=15)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 20.0) -> None:
        """Poll `/-/ready` until Prometheus answers 200 (deadline-based)."""
        assert self.process is not None, "not started"
        try:
            ready = await self.process.wait_ready(
                lambda: http_ok(session, self.url + "/-/ready"), timeout
            )
        except TimeoutError as exc:
            raise AssertionError(str(exc)) from None
        assert ready, f"prometheus exited:\n{self.log()}"

    async def api(self, session: aiohttp.ClientSession, path: str, **params: str) -> dict[str, Any]:
        """GET an `/api/v1/...` endpoint; the whole JSON answer (status, data or error)."""
        async with session.get(self.url + "/api/v1/" + path, params=params) as resp:
            body: dict[str, Any] = await resp.json(content_type=None)
            return body

    async def query(self, session: aiohttp.ClientSession, expr: str) -> dict[str, Any]:
        """An instant query; the whole JSON answer."""
        return await self.api(session, "query", query=expr)

    async def wait_query(
        self,
        session: aiohttp.ClientSession,
        expr: str,
        timeout: float = 20.0,
    ) -> list[dict[str, Any]]:
        """Poll an instant query until it returns at least one series; its result."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            answer = await self.query(session, expr)
            assert answer["status"] == "success", (expr, answer)
            if answer["data"]["result"]:
                return list(answer["data"]["result"])
            if loop.time() >= deadline:
                raise AssertionError(f"no result for {expr!r} within {timeout} s")
            await asyncio.sleep(0.2)
