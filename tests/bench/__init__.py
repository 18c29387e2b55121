"""`make bench`: a truthful throughput/latency benchmark of the gateway.

Run `python -m tests.bench [--duration S] [--json PATH] [--quick]` from the repository
root. One run starts the sandbox upstream, a bare aiohttp baseline and the gateway (durable
spool, in-memory spool, INFO logging) as subprocesses on free loopback ports, drives them
with `wrk` (or a built-in generator), and prints every figure as measured in that run,
relative to the baseline measured in the same run. See `tests/bench/run.py`.
"""
