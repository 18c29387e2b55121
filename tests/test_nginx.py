"""The shipped nginx site config in front of a real gateway and the sandbox upstream."""

from __future__ import annotations

import gzip
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.keys import METRICS
from gateway.metrics import Metrics
from gateway.sandbox import SandboxState, wait_for
from gateway.server import runner_options
from tests.conftest import base_settings, need_binary
from tests.servers import Nginx, run_nginx, write_site

pytestmark = pytest.mark.nginx

# A second loopback address: nginx (127.0.0.1) is a trusted proxy, this client is not.
CLIENT_ADDRESS = "127.0.0.2"
ACTIVITIES = "/ortto/v1/activities/create"
ALLOWED_ORIGIN = "https://shop.example.com"
PEERS = web.AppKey("peers", list)


def activity(email: str = "john.apple@example.com") -> dict[str, object]:
    """The website guide's activity, in the shape `ap3c.activity` takes."""
    return {
        "activity_id": "act:cm:login",
        "attributes": {"str::email": email, "str:cm:payment-plan": "$100 starter plan"},
    }


@dataclass
class Stack:
    """nginx -> gateway -> sandbox, and a client session bound to CLIENT_ADDRESS."""

    nginx: Nginx
    gateway: TestServer
    state: SandboxState
    client: aiohttp.ClientSession

    def peers(self) -> list[tuple[str, int, str]]:
        """(peer address, peer port, HTTP version) of each request the gateway answered."""
        peers: list[tuple[str, int, str]] = self.gateway.app[PEERS]
        return peers


@pytest.fixture
async def stack(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    sandbox: TestServer,
    sandbox_state: SandboxState,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    binary = need_binary("nginx", "/usr/sbin/nginx")
    settings = base_settings(tmp_path, str(sandbox.make_url("")), allowed_origins=(ALLOWED_ORIGIN,))
    metrics = Metrics(CollectorRegistry(), settings.activities, process_metrics=False)
    app = create_app(settings, metrics=metrics)
    app[PEERS] = []

    async def record_peer(request: web.Request, response: web.StreamResponse) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            request.app[PEERS].append(
                (peer[0], peer[1], f"{request.version[0]}.{request.version[1]}")
            )

    app.on_response_prepare.append(record_peer)
    gateway = await aiohttp_server(app, **runner_options(settings))
    assert gateway.port is not None
    site = write_site(tmp_path / "site", {"index.html": "<!doctype html><title>shop</title>"})
    async with run_nginx(
        binary, tmp_path / "nginx", gateway_port=gateway.port, site_root=site
    ) as nginx:
        connector = aiohttp.TCPConnector(local_addr=(CLIENT_ADDRESS, 0))
        async with aiohttp.ClientSession(connector=connector) as client:
            yield Stack(nginx, gateway, sandbox_state, client)


async def post(stack: Stack, body: object, **headers: str) -> tuple[int, dict[str, object]]:
    async with stack.client.post(
        stack.nginx.url(ACTIVITIES),
        data=orjson.dumps(body),
        headers={"Content-Type": "application/json", **headers},
    ) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_client_address_becomes_source_ip(stack: Stack) -> None:
    status, body = await post(stack, activity())
    assert status == 202, body
    await wait_for(lambda: len(stack.state.activities) == 1)
    received = stack.state.activities[0]
    assert received.source_ip == CLIENT_ADDRESS
    assert received.email == "john.apple@example.com"
    # The gateway saw nginx, not the client, as its TCP peer.
    assert {peer for peer, _, _ in stack.peers()} == {"127.0.0.1"}


async def test_spoofed_forwarding_headers_are_not_believed(stack: Stack) -> None:
    status, body = await post(
        stack,
        activity(),
        **{
            "X-Forwarded-For": "203.0.113.9, 198.51.100.7",
            "X-Real-IP": "203.0.113.9",
            "Forwarded": "for=203.0.113.9",
        },
    )
    assert status == 202, body
    await wait_for(lambda: len(stack.state.activities) == 1)
    assert stack.state.activities[0].source_ip == CLIENT_ADDRESS


async def test_same_origin_page_is_allowed_through_nginx(stack: Stack) -> None:
    """nginx passes Host with its port, so the page's own Origin is same-origin, not 403."""
    status, body = await post(stack, activity(), Origin=stack.nginx.origin)
    assert status == 202, body
    status, body = await post(stack, activity(), Origin="http://evil.example")
    assert status == 403, body


async def test_body_over_the_limit_is_refused_with_cors_headers(stack: Stack) -> None:
    big = activity()
    big["attributes"] = {"str:cm:padding": "x" * (64 * 1024)}
    async with stack.client.post(
        stack.nginx.url(ACTIVITIES),
        data=orjson.dumps(big),
        headers={"Content-Type": "application/json", "Origin": ALLOWED_ORIGIN},
    ) as resp:
        # The gateway's own 413: an allowed cross-origin page can read it.
        assert resp.status == 413
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
        assert "X-Request-Id" in resp.headers
        assert (await resp.json(content_type=None))["code"] == 413
    assert stack.state.requests == []


async def test_body_far_over_the_limit_is_refused_by_nginx(stack: Stack) -> None:
    huge = activity()
    huge["attributes"] = {"str:cm:padding": "x" * (1024 * 1024)}
    async with stack.client.post(
        stack.nginx.url(ACTIVITIES),
        data=io.BytesIO(orjson.dumps(huge)),
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
        assert resp.headers["Server"].startswith("nginx")
        assert "X-Request-Id" not in resp.headers  # the gateway never saw it
        assert (await resp.json(content_type=None))["code"] == 413
    assert stack.peers() == []
    assert stack.state.requests == []


async def test_a_compressed_bomb_is_refused_by_the_gateway_without_inflating_it(
    stack: Stack,
) -> None:
    """nginx passes compressed bodies on as they are; the gateway stops at its limit."""
    bomb = gzip.compress(b"0" * (50 * 1024 * 1024), 9)  # about 50 KB: nginx lets it by
    async with stack.client.post(
        stack.nginx.url(ACTIVITIES),
        data=bomb,
        headers={
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Origin": ALLOWED_ORIGIN,
        },
    ) as resp:
        assert resp.status == 413
        assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
        assert (await resp.json(content_type=None))["code"] == 413
    registry = stack.gateway.app[METRICS].registry
    assert registry.get_sample_value("ortto_gateway_body_inflated_bytes_total") == 64 * 1024 + 1
    async with stack.client.post(
        stack.nginx.url(ACTIVITIES),
        data=b"\x1f\x8b\x08\x00 not brotli either",
        headers={"Content-Type": "application/json", "Content-Encoding": "br"},
    ) as resp:
        assert resp.status == 415  # the gateway's, with its error shape
        assert "Content-Encoding" in (await resp.json(content_type=None))["error"]
    assert stack.state.requests == []


async def test_shim_is_served_with_cache_headers(stack: Stack) -> None:
    async with stack.client.get(stack.nginx.url("/ortto/ortto-relay.js")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/javascript")
        assert "max-age=" in resp.headers["Cache-Control"]
        etag = resp.headers["ETag"]
        assert "ap3c" in await resp.text()
    async with stack.client.get(
        stack.nginx.url("/ortto/ortto-relay.js"), headers={"If-None-Match": etag}
    ) as resp:
        assert resp.status == 304


async def test_metrics_are_not_public(stack: Stack) -> None:
    for path in ("/metrics", "/ortto/metrics"):
        async with stack.client.get(stack.nginx.url(path)) as resp:
            assert resp.status == 404, path
    async with stack.client.get(stack.nginx.url("/")) as resp:
        assert resp.status == 200
        assert "shop" in await resp.text()


async def test_keepalive_to_the_gateway(stack: Stack) -> None:
    """Several requests through nginx reuse one HTTP/1.1 connection to the gateway."""
    for n in range(5):
        status, _ = await post(stack, activity(f"person{n}@example.com"))
        assert status == 202
    async with stack.client.get(stack.nginx.url("/ortto/healthz")) as resp:
        assert resp.status == 200
    peers = stack.peers()
    assert len(peers) == 6
    assert {version for _, _, version in peers} == {"1.1"}
    assert len({port for _, port, _ in peers}) == 1, peers
    await wait_for(lambda: len(stack.state.activities) == 5)
    assert {a.source_ip for a in stack.state.activities} == {CLIENT_ADDRESS}
