"""The gateway with its relay stubbed out: the HTTP shell's own ceiling (bench row `shell`).

`python -m tests.bench.shell_only serve` runs `ortto-gateway serve` unchanged (the same
app, middlewares, handler, metrics, log line, spool and delivery worker) except that
`Relay.submit` answers each activity `queued` without validating, limiting, enriching or
spooling it. What the bare aiohttp baseline does not do but this row does is the shell's
cost; what this row does but the durable row does not is the relay's. Nothing reaches the
upstream from this row. Bench-only: never part of the gateway.
"""

from __future__ import annotations

import sys
from typing import Any

from gateway import cli, relay
from gateway.validation import is_batch

QUEUED = {"status": "queued", "person_status": "queued"}


async def _accept_all(
    self: relay.Relay,
    data: Any,
    client_ip: str | None,
    request_id: str,
    log_data: dict[str, Any] | None = None,
    *,
    test: bool = False,
) -> relay.RelayResult:
    count = len(data["activities"]) if is_batch(data) else 1
    return relay.RelayResult(202, {"activities": [QUEUED] * count})


def main() -> None:
    relay.Relay.submit = _accept_all  # type: ignore[method-assign]
    sys.exit(cli.main(sys.argv[1:]))


if __name__ == "__main__":
    main()
