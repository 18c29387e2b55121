"""Structured logs: one JSON object a line, no key, no full email."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from aiohttp.http_exceptions import BadHttpMessage

from gateway.logs import JsonFormatter, flush_logs, log_field, setup_logging, stop_logging
from gateway.sandbox import Fault, SandboxState, wait_for
from tests.conftest import API_KEY, EXAMPLES, GatewayFactory, example

PATH = "/v1/activities/create"
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("DEBUG", stream)
    try:
        yield stream
    finally:
        stop_logging()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_lines_are_written_off_the_event_loop(log_stream: io.StringIO) -> None:
    log = logging.getLogger("gateway.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed %s", "here", extra={"data": {"n": 2}})
    flush_logs()
    line = json.loads(log_stream.getvalue().splitlines()[-1])
    assert line["msg"] == "failed here"
    assert line["error"] == "ValueError: boom"
    assert line["n"] == 2
    assert "Traceback" not in log_stream.getvalue()


def test_formatter_merges_data_and_keeps_reserved_keys() -> None:
    record = logging.LogRecord("gateway.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.data = {"msg": "shadow", "n": 1}
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "hello you"
    assert line["data_msg"] == "shadow"
    assert line["n"] == 1
    assert line["level"] == "info"
    assert line["ts"].endswith("Z")


def test_parser_errors_lose_the_client_data(log_stream: io.StringIO) -> None:
    server_log = logging.getLogger("aiohttp.server")
    exc = BadHttpMessage('Data after Connection: close: b\'{"str::email": "eve@example.com"}\'')
    server_log.error("Error handling request from %s", "203.0.113.9", exc_info=exc)
    try:
        raise RuntimeError("gateway bug")
    except RuntimeError as err:
        server_log.error("Error handling request from %s", "203.0.113.9", exc_info=err)
    flush_logs()
    text = log_stream.getvalue()
    assert "eve@example.com" not in text
    assert "203.0.113.9" not in text
    refused, bug = (json.loads(line) for line in text.splitlines())
    assert refused["level"] == "info"
    assert refused["msg"] == "malformed HTTP request refused"
    assert refused["error_type"] == "BadHttpMessage"
    assert refused["status"] == 400
    assert bug["level"] == "error"  # not the client's doing: it stays an error
    assert bug["error"] == "RuntimeError: gateway bug"


async def test_a_request_the_parser_refuses_is_logged_without_its_bytes(
    make_gateway: GatewayFactory, log_stream: io.StringIO
) -> None:
    client = await make_gateway()
    body = b'{"activity_id": "act:cm:login", "fields": {"str::email": "mal@example.com"}}'
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body)
        + body
        + b"GARBAGE after the body"
    )
    async with asyncio.timeout(5):
        await reader.read()  # the server answers and closes
    writer.close()

    def logged() -> bool:
        flush_logs()
        return "malformed HTTP request" in log_stream.getvalue()

    await wait_for(logged)
    text = log_stream.getvalue()
    assert "mal@example.com" not in text
    assert "127.0.0.1" not in text
    assert '"level":"error"' not in text


async def test_logs_are_json_lines_without_key_or_email(
    make_gateway: GatewayFactory, sandbox_state: SandboxState, log_stream: io.StringIO
) -> None:
    client = await make_gateway()
    emails = set()
    for path in sorted(EXAMPLES.glob("0*.json")):
        body = json.loads(path.read_text())
        for activity in body["activities"]:
            emails.add(activity["fields"]["str::email"])
        await client.post(
            PATH, data=example(path.name), headers={"Content-Type": "application/json"}
        )
    await client.post(PATH, data=b"{", headers={"Content-Type": "application/json"})
    await wait_for(lambda: len(sandbox_state.activities) == 6)
    # A refusal by "Ortto" and a wrong key: both are logged by delivery.
    bad = {
        "activity_id": "act:cm:login",
        "fields": {"str::email": "dead@example.com"},
        "attributes": {"str:cm:x": "y"},
    }
    emails.add("dead@example.com")
    sandbox_state.add_fault(Fault(status=400, count=1))
    await client.post(PATH, json=bad)
    await wait_for(lambda: '"activity dead-lettered"' in log_stream.getvalue())
    sandbox_state.api_key = "another"
    await client.post(
        PATH, json={"activity_id": "act:cm:signup", "fields": {"str::email": "k@example.com"}}
    )
    emails.add("k@example.com")
    await wait_for(lambda: "refused the API key" in log_stream.getvalue())
    await client.close()

    flush_logs()
    text = log_stream.getvalue()
    lines = text.splitlines()
    assert len(lines) > 10
    for line in lines:
        parsed = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= set(parsed)
    assert API_KEY not in text
    for email in emails:
        assert email not in text
        assert email.split("@")[0] + "@" not in text
    requests = [json.loads(line) for line in lines if '"msg":"request"' in line]
    assert all("request_id" in r and "status" in r for r in requests)
    accepted = [r for r in requests if r.get("accepted")]
    assert accepted and all(len(p) == 12 for r in accepted for p in r["people"])


async def test_request_line_follows_the_logger_level(
    make_gateway: GatewayFactory, log_stream: io.StringIO
) -> None:
    client = await make_gateway()
    resp = await client.post(PATH, data=example("01-single.json"), headers=JSON_TYPE)
    assert resp.status == 202
    flush_logs()
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    (line,) = [x for x in lines if x["msg"] == "request" and x.get("route") == "activities"]
    assert line["logger"] == "gateway.http"
    assert line["level"] == "info"
    assert line["request_id"] == resp.headers["X-Request-Id"]
    assert line["status"] == 202 and line["accepted"] == 1
    assert line["ts"].endswith("Z") and len(line["ts"]) == 24

    logging.getLogger("gateway.http").setLevel(logging.WARNING)
    try:
        resp = await client.post(PATH, data=example("01-single.json"), headers=JSON_TYPE)
        assert resp.status == 202
        flush_logs()
        ids = [json.loads(line).get("request_id") for line in log_stream.getvalue().splitlines()]
        assert resp.headers["X-Request-Id"] not in ids
    finally:
        logging.getLogger("gateway.http").setLevel(logging.NOTSET)


def test_a_field_path_in_a_log_line_is_short_and_never_an_email() -> None:
    assert log_field("attributes.int:cm:n") == "attributes.int:cm:n"
    assert log_field("chris@example.com") == "<redacted>"
    assert len(log_field("k" * 500)) == 80


async def test_a_refusal_is_on_the_request_line_by_reason_and_field_never_by_value(
    make_gateway: GatewayFactory, log_stream: io.StringIO
) -> None:
    client = await make_gateway(strict=True)
    body = {
        "activity_id": "act:cm:login",
        "fields": {"str::email": "hidden.person@example.com"},
        "victim@example.com": "x",
    }
    resp = await client.post(PATH, json=body)
    assert resp.status == 400
    assert (await resp.json())["reason"] == "unknown_key"
    flush_logs()
    text = log_stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    (line,) = [x for x in lines if x["msg"] == "request" and x.get("route") == "activities"]
    assert line["reason"] == "unknown_key" and line["field"] == "<redacted>"
    assert "victim@example.com" not in text and "hidden.person" not in text
