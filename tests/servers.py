"""The web servers of the browser tests: nginx with the shipped site config, Chromium.

nginx runs through tests.processes.Process on free loopback ports chosen at run time;
Chromium through Playwright. Each is stopped when its context exits.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from playwright.async_api import Browser, async_playwright

from tests.processes import LOOPBACK, START_TIMEOUT, Process, free_port, port_open

__all__ = ["LOOPBACK", "Nginx", "fill", "free_port", "run_chromium", "run_nginx", "write_site"]

ROOT = Path(__file__).resolve().parent.parent
SITE_CONF = ROOT / "deploy" / "nginx" / "ortto-gateway.conf"
# A port taken between free_port() and nginx's bind is retried with fresh ports.
START_ATTEMPTS = 3

# The test wrapper: everything nginx writes lives under the prefix. Only ports and paths are
# substituted, and the shipped site config is included as it is (bar its port, upstream port
# and root, see render_site_conf).
WRAPPER = """\
daemon off;
master_process off;
worker_processes 1;
error_log {{PREFIX}}/error.log info;
pid {{PREFIX}}/nginx.pid;

events {
    worker_connections 256;
}

http {
    types {
        text/html html;
        application/javascript js;
        text/css css;
    }
    default_type application/octet-stream;
    access_log {{PREFIX}}/access.log;
    client_body_temp_path {{PREFIX}}/tmp/body;
    proxy_temp_path {{PREFIX}}/tmp/proxy;
    fastcgi_temp_path {{PREFIX}}/tmp/fastcgi;
    uwsgi_temp_path {{PREFIX}}/tmp/uwsgi;
    scgi_temp_path {{PREFIX}}/tmp/scgi;

    include {{PREFIX}}/ortto-gateway.conf;
{{EXTRA}}
}
"""

# A second, plain website on another port: another origin for the cross-origin tests.
OTHER_SITE = """
    server {
        listen 127.0.0.1:{{OTHER_PORT}};
        root {{OTHER_ROOT}};
    }
"""

# The production values in the shipped config and what the tests put in their place.
SITE_LISTEN = "listen 80;"
SITE_UPSTREAM = "server 127.0.0.1:8080;"
SITE_ROOT = "root /var/www/example.com;"


def fill(template: str, values: Mapping[str, str | int | Path]) -> str:
    """Replace each {{NAME}}; fail on a placeholder left over."""
    text = template
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", str(value))
    if "{{" in text:
        raise ValueError(f"unfilled placeholder in: {text[text.index('{{') :][:40]!r}")
    return text


def render_site_conf(text: str, *, listen_port: int, gateway_port: int, site_root: Path) -> str:
    """The shipped site config with only its listen port, upstream port and root changed."""
    for needle, replacement in (
        (SITE_LISTEN, f"listen {LOOPBACK}:{listen_port};"),
        (SITE_UPSTREAM, f"server {LOOPBACK}:{gateway_port};"),
        (SITE_ROOT, f"root {site_root};"),
    ):
        count = text.count(needle)
        if count != 1:
            raise AssertionError(f"{SITE_CONF.name}: expected {needle!r} once, found {count}")
        text = text.replace(needle, replacement)
    return text


@dataclass
class Nginx:
    """A running nginx: its ports and where it keeps its logs."""

    process: Process
    prefix: Path
    port: int
    other_port: int | None

    def url(self, path: str = "/") -> str:
        """A URL on the site of the shipped config."""
        return f"http://{LOOPBACK}:{self.port}{path}"

    def other_url(self, path: str = "/") -> str:
        """A URL on the second (other-origin) site."""
        assert self.other_port is not None, "started without other_root"
        return f"http://{LOOPBACK}:{self.other_port}{path}"

    @property
    def origin(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def other_origin(self) -> str:
        assert self.other_port is not None, "started without other_root"
        return f"http://{LOOPBACK}:{self.other_port}"

    def logs(self) -> str:
        """The error log and nginx's own output, for failure messages."""
        parts = []
        for name in ("error.log", "stderr.log"):
            path = self.prefix / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


@contextlib.asynccontextmanager
async def run_nginx(
    binary: str,
    prefix: Path,
    *,
    gateway_port: int,
    site_root: Path,
    other_root: Path | None = None,
) -> AsyncIterator[Nginx]:
    """Run nginx in the foreground with deploy/nginx/ortto-gateway.conf; stop it on exit
    (SIGTERM: nginx's fast shutdown)."""
    prefix.mkdir(parents=True, exist_ok=True)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    site_text = SITE_CONF.read_text()
    last_logs = ""
    for _ in range(START_ATTEMPTS):
        port = free_port()
        other_port = free_port() if other_root is not None else None
        (prefix / "ortto-gateway.conf").write_text(
            render_site_conf(
                site_text, listen_port=port, gateway_port=gateway_port, site_root=site_root
            )
        )
        extra = ""
        if other_root is not None:
            extra = fill(OTHER_SITE, {"OTHER_PORT": str(other_port), "OTHER_ROOT": other_root})
        conf = prefix / "nginx.conf"
        conf.write_text(fill(WRAPPER, {"PREFIX": prefix, "EXTRA": extra}))
        (prefix / "stderr.log").unlink(missing_ok=True)  # this attempt's output only
        argv = [binary, "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(conf)]
        process = Process(argv, prefix / "stderr.log", name="nginx")
        server = Nginx(process, prefix, port, other_port)
        ports = [port] if other_port is None else [port, other_port]

        def listening(ports: list[int] = ports) -> bool:
            return all(map(port_open, ports))

        with process.launch():
            if not await process.wait_ready(listening, START_TIMEOUT, what="listening"):
                last_logs = server.logs()
                if "Address already in use" in last_logs:
                    continue
                raise RuntimeError(f"nginx exited with {process.returncode}\n{last_logs}")
            yield server
            return
    raise RuntimeError(f"nginx could not bind a free port\n{last_logs}")


def write_site(root: Path, files: Mapping[str, str | bytes]) -> Path:
    """Create a website root holding `files` (relative path -> content)."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


# Headless Chromium from Debian, never a downloaded browser; nothing phones home.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)


@contextlib.asynccontextmanager
async def run_chromium(executable: str) -> AsyncIterator[Browser]:
    """Launch headless Chromium through Playwright; closed (and its driver stopped) on exit."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=list(CHROMIUM_ARGS), headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()
