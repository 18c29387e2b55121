"""Rate limits: sliding-log windows per person and per IP, for each activity."""

from gateway.limits.base import Decision, LimitStore, Rule
from gateway.limits.limiter import Check, Limiter, LimitResult, Verdict, rules_of
from gateway.limits.memory import MemoryStore

__all__ = [
    "Check",
    "Decision",
    "LimitResult",
    "LimitStore",
    "Limiter",
    "MemoryStore",
    "Rule",
    "Verdict",
    "rules_of",
]
