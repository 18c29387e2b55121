"""The request budget and the body slots: slow uploads cannot lock fast visitors out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.admission import Admission
from gateway.errors import Unavailable
from gateway.keys import ADMISSION, METRICS
from gateway.sandbox import wait_for
from tests.conftest import GatewayFactory

PATH = "/v1/activities/create"


def act(n: int) -> dict[str, object]:
    return {"activity_id": "act:cm:login", "fields": {"str::email": f"a{n}@example.com"}}


def test_enter_and_leave_count_the_budget() -> None:
    admission = Admission(max_concurrent=2, max_body_readers=1)
    assert admission.enter()
    assert admission.enter()
    assert not admission.enter()  # counted all the same: the caller refuses and leaves
    for _ in range(3):
        admission.leave()
    assert admission.in_flight == 0


def test_reading_trades_the_budget_for_a_slot() -> None:
    slots: list[int] = []
    admission = Admission(max_concurrent=1, max_body_readers=1, on_readers=slots.append)
    assert admission.enter()
    with admission.reading():
        assert (admission.in_flight, admission.readers) == (0, 1)
        assert admission.enter()  # the budget is free for a visitor with its body in
        with pytest.raises(Unavailable, match="slow uploads"), admission.reading():
            pass  # never reached: no slot
        admission.leave()
    assert (admission.in_flight, admission.readers) == (1, 0)
    assert slots == [1, 0]


def test_back_from_a_slot_into_a_full_budget_is_503() -> None:
    admission = Admission(max_concurrent=1, max_body_readers=1)
    admission.enter()
    with pytest.raises(Unavailable, match="busy"), admission.reading():
        admission.enter()  # another request took the budget meanwhile
    assert (admission.in_flight, admission.readers) == (2, 0)


def test_a_failure_while_reading_gives_the_slot_back() -> None:
    admission = Admission(max_concurrent=1, max_body_readers=1)
    admission.enter()
    with pytest.raises(ZeroDivisionError), admission.reading():
        raise ZeroDivisionError
    assert (admission.in_flight, admission.readers) == (1, 0)


# -- over HTTP


async def slow_upload(
    stack: AsyncExitStack, client: TestClient[web.Request, web.Application]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request whose body never finishes: its headers and the first byte only."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    stack.callback(writer.close)
    writer.write(
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n{".encode()
    )
    await writer.drain()
    return reader, writer


def readers_are(admission: Admission, n: int) -> Callable[[], bool]:
    return lambda: admission.readers == n


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def test_slow_uploads_fill_the_slots_not_the_budget(
    make_gateway: GatewayFactory, stack: AsyncExitStack
) -> None:
    client = await make_gateway(max_concurrent=2, max_body_readers=3)
    admission = client.app[ADMISSION]
    for n in range(1, 4):  # one after another: each waits BODY_GRACE in the budget first
        await slow_upload(stack, client)
        await wait_for(readers_are(admission, n), timeout=10)
    assert client.app[METRICS].registry.get_sample_value("ortto_gateway_body_readers") == 3

    # More slow uploads than the budget, and visitors with their bodies are still served.
    for n in range(5):
        resp = await client.post(PATH, json=act(n))
        assert resp.status == 202, await resp.text()

    # One more slow upload finds every slot taken: 503 for it alone, connection closed.
    reader, _ = await slow_upload(stack, client)
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"Retry-After: 1" in head
        assert b"Connection: close" in head
        await reader.read()  # until the gateway closes it
    assert admission.readers == 3

    await stack.aclose()  # the slow clients give up: their slots come back
    await wait_for(lambda: (admission.readers, admission.in_flight) == (0, 0), timeout=10)


async def test_a_slow_upload_that_completes_is_served(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(max_body_readers=1)
    admission = client.app[ADMISSION]
    body = orjson.dumps(act(1))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body[:1]
        )
        await wait_for(lambda: admission.readers == 1, timeout=10)
        writer.write(body[1:])
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 202"), head
    finally:
        writer.close()
    await wait_for(lambda: (admission.readers, admission.in_flight) == (0, 0), timeout=10)
