"""A throw-away three-node Redis Cluster on free loopback ports (`redis-cli --cluster create`)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.conftest import need_binary
from tests.processes import LOOPBACK, START_TIMEOUT, free_port
from tests.redis_support import RedisServer, redis_binary

NODES = 3
# `--cluster create` asks every node to meet the others and waits for their configs to
# agree; a fresh master declares the cluster usable only after about 2 s more (Redis's
# CLUSTER_WRITABLE_DELAY). Both are polled with this deadline.
CREATE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Cluster:
    """The running nodes (masters, no replicas) of one cluster."""

    nodes: tuple[RedisServer, ...]

    @property
    def url(self) -> str:
        """`redis+cluster://` naming every node (any one would do)."""
        return "redis+cluster://" + ",".join(f"{LOOPBACK}:{n.port}" for n in self.nodes)

    def client(self) -> redis.RedisCluster:
        """A synchronous cluster client, to look at what a store wrote."""
        return redis.RedisCluster(host=LOOPBACK, port=self.nodes[0].port)


def _ready(port: int) -> bool:
    with redis.Redis(host=LOOPBACK, port=port, socket_timeout=START_TIMEOUT) as client:
        info = client.execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return all(
        line in text
        for line in ("cluster_state:ok", "cluster_slots_ok:16384", f"cluster_known_nodes:{NODES}")
    )


@contextmanager
def running_cluster(directory: Path) -> Iterator[Cluster]:
    """Three masters sharing the 16384 slots (skipped without redis-server), stopped on exit."""
    cli = need_binary("redis-cli", "/usr/bin/redis-cli")
    binary = redis_binary()
    with ExitStack() as stack:
        nodes: list[RedisServer] = []
        for i in range(NODES):
            node_dir = directory / f"node{i}"
            node_dir.mkdir()
            # The cluster bus gets a free port of its own (by default it is port + 10000).
            node = RedisServer(
                binary,
                node_dir,
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(free_port()),
            )  # fmt: skip
            node.start()
            stack.callback(node.stop)
            nodes.append(node)
        addresses = [f"{LOOPBACK}:{n.port}" for n in nodes]
        created = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CREATE_TIMEOUT,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout[-2000:]!r}")
        deadline = time.monotonic() + CREATE_TIMEOUT
        while not all(_ready(n.port) for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster was not ready within {CREATE_TIMEOUT} s")
            time.sleep(0.05)  # polling a condition with a deadline
        yield Cluster(tuple(nodes))
