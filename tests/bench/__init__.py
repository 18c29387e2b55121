"""`make bench`: a truthful throughput/latency benchmark of the gateway.

Run `python -m tests.bench [--duration S] [--json PATH] [--quick]` from the repository
root. One run starts the sandbox upstream, a bare aiohttp baseline, a `redis-server` and
the gateway (durable spool, in-memory spool, INFO logging, limits in Redis with
`--workers 1` and `--workers 2`) as subprocesses on free loopback ports, drives them with
`wrk` (or a built-in generator), measures the limiter stores (`MemoryStore` vs
`RedisStore`) in a process of their own, and prints every figure as measured in that run,
relative to the baseline measured in the same run. See `tests/bench/run.py`.
"""
