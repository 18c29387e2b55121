"""Rate limits: sliding-log windows per person and per IP, for each activity.

The Redis store lives in `gateway.limits.redis` and is not imported here: the `redis`
package is an optional dependency (`ortto-gateway[redis]`).
"""

from gateway.limits.base import Decision, LimiterClosed, LimiterUnavailable, LimitStore, Rule
from gateway.limits.fallback import FallbackStore, OnError
from gateway.limits.limiter import Check, Limiter, LimitResult, Verdict, rules_of
from gateway.limits.memory import MemoryStore

__all__ = [
    "Check",
    "Decision",
    "FallbackStore",
    "LimitResult",
    "LimitStore",
    "Limiter",
    "LimiterClosed",
    "LimiterUnavailable",
    "MemoryStore",
    "OnError",
    "Rule",
    "Verdict",
    "rules_of",
]
