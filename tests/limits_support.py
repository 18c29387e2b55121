"""A fake limit store's base, for the tests of the limits and of the relay."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.limits import Decision, MemoryStore, Rule


class WrappedStore:
    """A MemoryStore behind the LimitStore methods, for a fake store to change some.

    A wrapper, not a subclass: MemoryStore may be compiled (docs/compiled.md), and a
    class defined here cannot inherit from a compiled one."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    async def acquire(self, rules: Sequence[Rule], now: float) -> Decision:
        return await self.inner.acquire(rules, now)

    async def acquire_many(self, checks: Sequence[Sequence[Rule]], now: float) -> list[Decision]:
        return await self.inner.acquire_many(checks, now)

    async def forget(self, rules: Sequence[Rule]) -> None:
        await self.inner.forget(rules)

    def key_count(self) -> int:
        return self.inner.key_count()

    async def close(self) -> None:
        await self.inner.close()
