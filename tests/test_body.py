"""Request bodies: decoded here within bounds, and read no further than the limit."""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from aiohttp import StreamReader, web
from aiohttp.test_utils import TestClient, TestServer

from gateway.admission import Admission
from gateway.app import create_app
from gateway.body import BodyDecoder, read_body
from gateway.errors import BadRequest, PayloadTooLarge, RequestTimeout, Unavailable
from gateway.keys import ADMISSION, METRICS
from gateway.sandbox import SandboxState, wait_for
from gateway.server import bound_port, runner_options
from tests.conftest import GatewayFactory, base_settings

PATH = "/v1/activities/create"
ACT = {"activity_id": "act:cm:login", "fields": {"str::email": "body@example.com"}}
JSON = orjson.dumps(ACT)
LIMIT = 64 * 1024
BOMB_SIZE = 50 * 1024 * 1024  # inflates to 50 MiB from about 50 KB


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


ZEROS = b"0" * BOMB_SIZE
BOMBS = {
    "gzip": ("gzip", gzip.compress(ZEROS, 9)),
    "zlib": ("deflate", zlib.compress(ZEROS, 9)),
    "raw deflate": ("deflate", raw_deflate(ZEROS)),
    "truncated raw deflate": ("deflate", raw_deflate(ZEROS)[:-10]),
    # Each member alone fits; together they do not.
    "gzip members": ("gzip", gzip.compress(b" " * (LIMIT // 2), 9) * 3),
}


def decode(coding: str, data: bytes, limit: int = LIMIT, step: int = 0) -> bytes:
    decoder = BodyDecoder(coding, limit)
    for i in range(0, len(data), step or max(1, len(data))):
        decoder.feed(data[i : i + (step or len(data))])
    return decoder.body()


@pytest.mark.parametrize("step", [0, 1, 7, 1000])
@pytest.mark.parametrize(
    ("coding", "encoded"),
    [
        ("identity", JSON),
        ("gzip", gzip.compress(JSON)),
        ("x-gzip", gzip.compress(JSON)),
        ("deflate", zlib.compress(JSON)),
        ("deflate", raw_deflate(JSON)),
        ("gzip", gzip.compress(JSON[:10]) + gzip.compress(JSON[10:])),  # two members
    ],
)
def test_codings_decode_whatever_the_chunks(coding: str, encoded: bytes, step: int) -> None:
    assert decode(coding, encoded, step=step) == JSON


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_bomb_stops_one_byte_past_the_limit(name: str) -> None:
    coding, bomb = BOMBS[name]
    assert len(bomb) < LIMIT
    decoder = BodyDecoder(coding, LIMIT)
    with pytest.raises(PayloadTooLarge):
        decoder.feed(bomb)
    assert decoder.inflated == LIMIT + 1  # not the megabytes the rest would give


def test_the_bytes_as_sent_count_against_the_limit_too() -> None:
    decoder = BodyDecoder("gzip", 100)
    decoder.feed(b"\x1f\x8b")
    with pytest.raises(PayloadTooLarge):
        decoder.feed(b"\0" * 99)
    assert decoder.inflated == 0
    with pytest.raises(PayloadTooLarge):
        decode("identity", b"x" * 101, limit=100)
    assert decode("identity", b"x" * 100, limit=100) == b"x" * 100


def test_an_exact_fit_is_accepted() -> None:
    body = b" " * LIMIT
    assert decode("gzip", gzip.compress(body)) == body
    assert decode("deflate", raw_deflate(body), step=3) == body


@pytest.mark.parametrize(
    ("coding", "encoded", "needle"),
    [
        ("gzip", b"not gzip at all", "could not be read as gzip"),
        ("deflate", b"\xff\xff\xff\xff", "could not be read as deflate"),
        ("gzip", gzip.compress(JSON)[:-12], "ends before"),
        ("deflate", zlib.compress(JSON)[:-6], "ends before"),
        ("deflate", raw_deflate(JSON)[:-3], "ends before"),
        ("deflate", b"x", "ends before"),  # one byte: not even the format
        ("deflate", zlib.compress(JSON) + b"junk", "after its deflate stream"),
        ("gzip", gzip.compress(JSON) + b"junk", "could not be read as gzip"),
    ],
)
def test_broken_streams_are_400(coding: str, encoded: bytes, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        decode(coding, encoded)


def test_an_empty_compressed_body_is_empty() -> None:
    assert decode("gzip", b"") == b""
    assert decode("gzip", gzip.compress(b"")) == b""


def test_other_codings_are_not_decoders() -> None:
    for coding in ("br", "zstd", "compress", "gzip, gzip"):
        with pytest.raises(ValueError, match="unsupported"):
            BodyDecoder(coding, LIMIT)


# -- reading


def stream() -> StreamReader:
    protocol = mock.Mock(_reading_paused=False)
    return StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())


async def test_a_body_that_follows_its_headers_needs_no_slot() -> None:
    admission = Admission(max_concurrent=10, max_body_readers=1)
    admission.enter()
    with admission.reading():  # the only slot is taken
        content = stream()
        task = asyncio.create_task(
            read_body(content, BodyDecoder("identity", LIMIT), admission, 15)
        )
        await asyncio.sleep(0)  # the reader waits for bytes
        content.feed_data(JSON[:5])
        content.feed_data(JSON[5:])
        content.feed_eof()
        assert await task == JSON
    assert (admission.in_flight, admission.readers) == (1, 0)


async def test_a_stalled_body_waits_in_a_slot_then_times_out() -> None:
    slots: list[int] = []
    admission = Admission(max_concurrent=10, max_body_readers=1, on_readers=slots.append)
    admission.enter()
    content = stream()
    content.feed_data(b"{")
    with pytest.raises(RequestTimeout):
        await read_body(content, BodyDecoder("identity", LIMIT), admission, 0.05)
    assert slots == [1, 0]
    assert (admission.in_flight, admission.readers) == (1, 0)


async def test_a_stalled_body_with_every_slot_taken_is_503() -> None:
    admission = Admission(max_concurrent=10, max_body_readers=1)
    admission.enter()
    with admission.reading(), pytest.raises(Unavailable):
        await read_body(stream(), BodyDecoder("identity", LIMIT), admission, 0.05)
    assert (admission.in_flight, admission.readers) == (1, 0)


# -- over HTTP


async def exchange(
    client: TestClient[Any, Any], raw: bytes, then: bytes = b""
) -> tuple[bytes, bytes]:
    """Send a raw request; return the head of its answer and what follows until EOF (5 s)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(raw)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            if then:
                writer.write(then)
            rest = await reader.read()  # until the server closes
        return head, rest
    finally:
        writer.close()


def post(body: bytes, coding: str, path: str = PATH, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    lines += [f"Content-Encoding: {coding}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize("name", list(BOMBS))
async def test_a_bomb_is_413_with_nothing_more_inflated(
    make_gateway: GatewayFactory, sandbox_state: SandboxState, name: str
) -> None:
    client = await make_gateway()
    coding, bomb = BOMBS[name]
    head, _ = await exchange(client, post(bomb, coding, Connection="close"))
    assert head.startswith(b"HTTP/1.1 413"), head
    registry = client.app[METRICS].registry
    inflated = registry.get_sample_value("ortto_gateway_body_inflated_bytes_total")
    assert inflated == LIMIT + 1  # not the 50 MiB that the rest would have given
    assert sandbox_state.requests == []


async def test_a_413_before_the_body_has_come_closes_the_connection(
    make_gateway: GatewayFactory,
) -> None:
    """The rest of the body is neither waited for nor read: the connection closes."""
    client = await make_gateway()
    _, bomb = BOMBS["gzip"]
    request = post(bomb, "gzip")
    head, _ = await exchange(client, request[: len(request) - len(bomb) + 2000])
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"Connection: close" in head
    assert (
        client.app[METRICS].registry.get_sample_value("ortto_gateway_body_inflated_bytes_total")
        == LIMIT + 1
    )


async def test_a_bomb_refused_by_the_headers_is_not_read_at_all(
    make_gateway: GatewayFactory,
) -> None:
    client = await make_gateway(max_body_bytes=1024)
    _, bomb = BOMBS["gzip"]
    head, _ = await exchange(client, post(bomb, "gzip", Connection="close"))
    assert head.startswith(b"HTTP/1.1 413"), head
    assert (
        client.app[METRICS].registry.get_sample_value("ortto_gateway_body_inflated_bytes_total")
        == 0
    )


async def test_a_compressed_body_that_fits_keeps_the_connection(
    make_gateway: GatewayFactory, sandbox_state: SandboxState
) -> None:
    client = await make_gateway()
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    head, rest = await exchange(client, post(gzip.compress(JSON), "gzip"), then=health)
    assert head.startswith(b"HTTP/1.1 202"), head
    assert b"HTTP/1.1 200" in rest  # the same connection answered the next request
    await wait_for(lambda: len(sandbox_state.activities) == 1)


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/nowhere", {}, b"404"),
        (PATH, {"Origin": "https://evil.example"}, b"403"),
        (PATH, {}, b"400"),
    ],
)
@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_broken_compressed_body_writes_no_error_line(
    make_gateway: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
    path: str,
    headers: dict[str, str],
    status: bytes,
    coding: str,
) -> None:
    client = await make_gateway()
    broken = b"\x1f\x8b\x08\x00 this is not a compressed stream " * 20
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with caplog.at_level(logging.DEBUG):
        head, rest = await exchange(client, post(broken, coding, path, **headers), then=health)
    assert head.startswith(b"HTTP/1.1 " + status), head
    # The next request on the connection was answered: the server went past this body.
    assert b"HTTP/1.1 200" in rest
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_the_server_must_leave_bodies_compressed(
    aiohttp_client: Any, sandbox: TestServer, tmp_path: Path
) -> None:
    """A server built without runner_options would inflate bodies unbounded: refused loudly."""
    app = create_app(base_settings(tmp_path, str(sandbox.make_url(""))))
    client = await aiohttp_client(app)  # aiohttp's default: auto_decompress=True
    resp = await client.post(PATH, data=gzip.compress(JSON), headers={"Content-Encoding": "gzip"})
    assert resp.status == 500
    assert app[ADMISSION].in_flight == 0


async def test_a_client_hanging_up_mid_body_writes_no_error_line(
    sandbox: TestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As `serve` runs it (no handler cancellation: the handler sees the hang-up)."""
    settings = base_settings(tmp_path, str(sandbox.make_url("")))
    runner = web.AppRunner(create_app(settings), **runner_options(settings))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = bound_port(runner)
        with caplog.at_level(logging.INFO):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(gzip.compress(JSON), "gzip")[:-5])
            await writer.drain()
            await wait_for(lambda: runner.app[ADMISSION].in_flight == 1)
            writer.close()
            await wait_for(lambda: any(r.getMessage() == "request" for r in caplog.records))
    finally:
        await runner.cleanup()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
