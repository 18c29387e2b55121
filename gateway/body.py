"""Request bodies: read as sent, within bounds, and decoded from gzip or deflate here.

aiohttp's parser would inflate a compressed body itself, eagerly and on the event loop:
after the handler's 413 it went on inflating the rest of a 51 KB gzip body that inflates
to 50 MiB (0.13-0.16 s of CPU each), so a few connections slowed every visitor. The public
listener therefore runs with `auto_decompress=False` (`server.runner_options`): the handler
gets the bytes as sent, and `BodyDecoder` inflates them in steps bounded by what the limit
still allows, so it stops the moment the output would pass it, with nothing more inflated.
The bytes as sent count against the same limit, so nothing more is read either.

Accepted codings: `gzip` (`x-gzip`; concatenated members too) and `deflate` (zlib, or the
raw deflate some clients send under that name). `br`, `zstd` and anything else are 415.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Final

from aiohttp import StreamReader

from gateway.admission import BODY_GRACE, Admission
from gateway.errors import BadRequest, PayloadTooLarge, RequestTimeout

# Content-Encoding -> zlib's wbits: gzip only (31); `deflate` is sniffed (zlib or raw).
_GZIP: Final = 31
_ZLIB: Final = 15
_RAW_DEFLATE: Final = -15
CODINGS: Final = frozenset({"identity", "gzip", "x-gzip", "deflate"})


def too_large(limit: int) -> PayloadTooLarge:
    """The 413 for a body over `limit` bytes, as sent or decoded."""
    return PayloadTooLarge(f"request body over {limit} bytes")


class BodyDecoder:
    """One request body, fed as its bytes arrive; `body()` once they have all come.

    Raises `PayloadTooLarge` as soon as the bytes as sent, or the decoded bytes, pass
    `limit`, and `BadRequest` for a stream that does not decode or ends early. Memory is
    at most `limit` bytes of output plus one inflater (about 40 KiB), dropped with the
    decoder whatever the outcome.
    """

    def __init__(self, coding: str, limit: int) -> None:
        if coding not in CODINGS:
            raise ValueError(f"unsupported coding {coding!r}")
        self.coding = "gzip" if coding == "x-gzip" else coding
        self.limit = limit
        self.received = 0  # bytes as sent
        self.inflated = 0  # bytes the inflater produced (0 for identity)
        self._out = bytearray()
        self._inflater: zlib._Decompress | None = None
        self._members = 0  # gzip members begun (RFC 1952 allows several, one after another)
        self._pending = b""  # a `deflate` body's first byte, until the second tells its format

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes as sent."""
        self.received += len(chunk)
        if self.received > self.limit:
            # A compressed body can only be longer than what it decodes to by a few bytes
            # of framing: one over the limit as sent would decode to one over it too.
            raise too_large(self.limit)
        if self.coding == "identity":
            self._out += chunk
            return
        if self._pending:
            chunk, self._pending = self._pending + chunk, b""
        while chunk:
            if self._inflater is None:
                if self._members and self.coding != "gzip":
                    raise BadRequest(
                        f"the request body has data after its {self.coding} stream",
                        reason="malformed_body",
                    )
                if self.coding == "deflate" and len(chunk) < 2:
                    self._pending = chunk
                    return
                self._inflater = zlib.decompressobj(self._wbits(chunk))
                self._members += 1
            chunk = self._inflate(self._inflater, chunk)

    def _inflate(self, inflater: zlib._Decompress, chunk: bytes) -> bytes:
        """Inflate at most one byte more than the limit allows; the input left for later."""
        room = self.limit - len(self._out)
        try:
            out = inflater.decompress(chunk, room + 1)
        except zlib.error:
            raise self._broken() from None
        self.inflated += len(out)
        if len(out) > room:
            raise too_large(self.limit)
        self._out += out
        if inflater.eof:  # this stream (member) is complete: what follows begins the next
            self._inflater = None
            return inflater.unused_data
        # With room left, zlib took all the input (it keeps a tail only when max_length stops it).
        return inflater.unconsumed_tail

    def _wbits(self, head: bytes) -> int:
        if self.coding == "gzip":
            return _GZIP
        # RFC 1950: a zlib stream starts with CM = 8 and a 16-bit header divisible by 31.
        # Raw deflate (no header) is what many clients send as `deflate` all the same.
        is_zlib = head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
        return _ZLIB if is_zlib else _RAW_DEFLATE

    def _broken(self) -> BadRequest:
        return BadRequest(
            f"the request body could not be read as {self.coding}", reason="malformed_body"
        )

    def body(self) -> bytes:
        """The decoded body; `BadRequest` when a compressed stream stopped before its end."""
        if self._pending or self._inflater is not None:
            self._inflater = None
            raise BadRequest(
                f"the request body ends before its {self.coding} stream does",
                reason="malformed_body",
            )
        return bytes(self._out)


async def read_body(
    content: StreamReader, decoder: BodyDecoder, admission: Admission, read_timeout: float
) -> bytes:
    """Feed a request's body to `decoder` as it arrives and return the decoded body.

    A body that has not all come within `BODY_GRACE` waits in one of the admission's
    body slots (503 when none is free), up to `read_timeout` from the start (408).
    """
    if getattr(content, "total_compressed_bytes", None) is not None:
        # aiohttp's parser inflated it already, unbounded: a server built without
        # server.runner_options. Loud, rather than decoding twice or serving a bomb.
        raise RuntimeError("the HTTP server decompresses bodies: run it with auto_decompress=False")
    if content.is_eof():  # the whole body came with the headers: no wait, no timer
        decoder.feed(await content.read())
        return decoder.body()
    started = asyncio.get_running_loop().time()
    if not await _read_until(content, decoder, started + min(BODY_GRACE, read_timeout)):
        with admission.reading():
            if not await _read_until(content, decoder, started + read_timeout):
                raise RequestTimeout(f"request body not received within {read_timeout:g} s")
    return decoder.body()


async def _read_until(content: StreamReader, decoder: BodyDecoder, deadline: float) -> bool:
    """Feed what arrives until the body ends (True) or the deadline passes (False).

    Only the bytes taken are fed: what comes after the deadline stays in `content`.
    """
    try:
        async with asyncio.timeout_at(deadline):
            while chunk := await content.readany():
                decoder.feed(chunk)
    except TimeoutError:
        return False
    return True
