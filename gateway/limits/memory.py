"""The in-process store: one sliding log per key, in memory bounded by `max_keys`.

Algorithm. A key's log holds the times of its accepted events, ascending. For a
rule (count N, window W) an event at `now` is allowed when fewer than N logged
times t satisfy `t > now - W`; so no period of length W ever holds more than N
accepted events, and an event exactly W after the oldest one passes. Times at
or before `now - W` are dropped when the key is next touched (lazily), and only
the newest N are kept, so a log never grows past N. When a key is at its limit,
its oldest relevant time plus W is when one more would pass: `retry_after`.
`acquire` never awaits, and the process is single-threaded asyncio, so checking
every rule and then charging every rule is atomic.

Times are counted in whole milliseconds (`now` is rounded to the nearest ms),
which keeps the arithmetic exact and the logs small. A time never goes below
the newest logged one of its key, so a wall clock stepping back cannot reorder
a log (it can only make the limit stricter for a while).

Memory (the target is at most 200 bytes per key at a million keys): the store
key is a 60-bit keyed BLAKE2b digest of the rule's key string (an int of 32 bytes
instead of a string of ~90; a collision, about 4e-7 likely among a million
keys and not steerable without the per-process secret, would make two keys
share one budget). A log of one event (the common case) is stored as a plain int
of milliseconds; longer logs as one `bytes` of native uint64 milliseconds, e.g.
33 + 80 = 113 bytes for ten events.

Speed: a log is never unpacked into Python ints. The live part is found by
bisecting a `memoryview` of the bytes, pruning is one slice, charging is one
concatenation, all in C; only the times compared are read. This replaced a
pack/unpack of the whole log on every call: `Limiter.check_many` of one activity
(two rules, per-IP logs of up to 50 events) went from 16.5 to 11.2 µs.

Eviction: two generations of plain dicts. New and touched keys go to the young
generation; a key found in the old one moves to the young one. When the young
generation holds `max_keys / 2` keys, the old generation is dropped whole (its
keys were not touched for a whole generation: the least recently used) and the
young one becomes the old one. So the store never holds more than `max_keys`
keys (at least 2), and keeps at least the `max_keys / 2` most recently used. Dropping a key
resets its budget (accepted by the design: the bound is generous, each eviction
is reported through `on_evict`, and the per-IP limit stops one client from
minting people to exploit it). This replaced cachetools' `LRUCache`, whose
`OrderedDict` bookkeeping cost about 100 bytes a key: 233 bytes a key at a
million keys (RSS) against the target of 200 (measured with
`python -m tests.bench.limiter_mem`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from bisect import bisect_right
from collections.abc import Callable, Sequence

from gateway.limits.base import ALLOWED, Decision, Rule

_TIME = struct.Struct("=Q")  # one time in a log's bytes: native uint64 ms
_TIME_SIZE = _TIME.size

Log = bytes | int


def _times(value: Log) -> Sequence[int]:
    """A log's ascending times in ms, without copying them out of the bytes."""
    if isinstance(value, int):
        return (value,)
    return memoryview(value).cast("Q")


def _log_from(value: Log, start: int, new: int | None = None) -> Log | None:
    """The log keeping the times of `value` from index `start` on, then `new` if given;
    None when nothing is left."""
    if isinstance(value, int):
        kept = [value] if start == 0 else []
        if new is not None:
            kept.append(new)
        if not kept:
            return None
        return kept[0] if len(kept) == 1 else _TIME.pack(kept[0]) + _TIME.pack(kept[1])
    tail = value[start * _TIME_SIZE :]
    if new is not None:
        tail += _TIME.pack(new)
    if len(tail) > _TIME_SIZE:
        return tail
    return _TIME.unpack(tail)[0] if tail else None


def _ms(seconds: float) -> int:
    """Seconds as whole milliseconds."""
    return round(seconds * 1000)


class _Generations:
    """A bounded map that forgets the least recently used half at once (see the docstring)."""

    __slots__ = ("evicted", "half", "old", "young")

    def __init__(self, max_keys: int) -> None:
        self.half = max(1, max_keys // 2)
        self.young: dict[int, Log] = {}
        self.old: dict[int, Log] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.young) + len(self.old)

    def get(self, key: int) -> Log | None:
        """The log of a key; a key found in the old generation is used again: make it young."""
        value = self.young.get(key)
        if value is None:
            value = self.old.pop(key, None)
            if value is not None:
                self[key] = value
        return value

    def __setitem__(self, key: int, value: Log) -> None:
        young = self.young
        if key not in young:
            self.old.pop(key, None)
            if len(young) >= self.half:
                self.evicted += len(self.old)
                self.old = young
                young = self.young = {}
        young[key] = value

    def __delitem__(self, key: int) -> None:
        if self.young.pop(key, None) is None:
            del self.old[key]


class MemoryStore:
    """Sliding logs in this process, for one worker; bounded by `max_keys`."""

    def __init__(
        self, max_keys: int = 1_000_000, on_evict: Callable[[int], None] | None = None
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self._logs = _Generations(max_keys)
        self._on_evict = on_evict
        self._hasher = hashlib.blake2b(digest_size=8, key=os.urandom(16))

    async def acquire(self, rules: Sequence[Rule], now: float) -> Decision:
        """Atomically check all rules; if all allow, charge all."""
        decision = self._acquire(rules, now)
        self._report_evictions()
        return decision

    async def acquire_many(self, checks: Sequence[Sequence[Rule]], now: float) -> list[Decision]:
        """`acquire` each check in order, each seeing the charges of the earlier ones."""
        decisions = [self._acquire(rules, now) for rules in checks]
        self._report_evictions()
        return decisions

    async def forget(self, rules: Sequence[Rule]) -> None:
        """Remove these rules' logs."""
        for rule in rules:
            with contextlib.suppress(KeyError):
                del self._logs[self._digest(rule.key)]

    def key_count(self) -> int:
        """How many keys the cache holds now."""
        return len(self._logs)

    async def close(self) -> None:
        """Nothing to release."""

    def _digest(self, key: str) -> int:
        h = self._hasher.copy()
        h.update(key.encode())
        return int.from_bytes(h.digest(), "little") >> 4  # 60 bits: a 32-byte int

    def _acquire(self, rules: Sequence[Rule], now: float) -> Decision:
        if len(rules) > 1 and len({rule.key for rule in rules}) != len(rules):
            raise ValueError("the rules of one check need distinct keys")
        logs = self._logs
        now_ms = _ms(now)
        pending: list[tuple[int, Log | None, int, int]] = []  # (key, log, first kept, newest kept)
        refused: list[int] = []
        retry_at_ms = 0
        for index, rule in enumerate(rules):
            key = self._digest(rule.key)
            value = logs.get(key)
            if value is None:
                pending.append((key, None, 0, 0))
                continue
            times = _times(value)
            n = len(times)
            window_ms = max(1, _ms(rule.window))
            first_live = bisect_right(times, now_ms - window_ms)
            start = max(first_live, n - rule.count)
            if n - first_live >= rule.count:
                refused.append(index)
                retry_at_ms = max(retry_at_ms, times[start] + window_ms)
            # Never below the newest time kept, so a clock stepping back cannot reorder.
            pending.append((key, value, start, times[n - 1] if start < n else 0))
        if refused:
            for key, value, start, _ in pending:
                if value is not None and start > 0:  # prune what has expired
                    pruned = _log_from(value, start)
                    if pruned is None:
                        del logs[key]
                    else:
                        logs[key] = pruned
            return Decision(False, retry_at_ms / 1000 - now, tuple(refused))
        for rule, (key, value, start, newest) in zip(rules, pending, strict=True):
            if not rule.charge:
                continue
            if value is None:
                logs[key] = now_ms
            else:
                charged = _log_from(value, start, max(now_ms, newest))
                assert charged is not None
                logs[key] = charged
        return ALLOWED

    def _report_evictions(self) -> None:
        evicted, self._logs.evicted = self._logs.evicted, 0
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)
