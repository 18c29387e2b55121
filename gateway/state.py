"""The process's lifecycle as the health endpoints see it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Lifecycle:
    """Readiness: started, and not draining for a shutdown."""

    started: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        """Able to accept: started and not draining."""
        return self.started and not self.draining
