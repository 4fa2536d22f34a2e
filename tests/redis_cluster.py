"""A real three-node Redis Cluster on loopback for the tests (no replicas: nothing here tests
failover, only that the service's keys and commands work when slots live on several nodes)."""

from __future__ import annotations

import time
from types import TracebackType

import redis

from service.redis_server import EmbeddedRedis, free_port

SLOTS = 16384
READY_TIMEOUT_S = 20.0


class EmbeddedRedisCluster:
    def __init__(self, nodes: int = 3) -> None:
        # An explicit bus port: the default (port + 10000) overflows for high free ports.
        self.nodes = [EmbeddedRedis(extra_args=("--cluster-enabled", "yes",
                                                "--cluster-port", str(free_port()),
                                                "--cluster-config-file", "nodes.conf"))
                      for _ in range(nodes)]

    @property
    def url(self) -> str:
        """One node's URL: the cluster client discovers the rest from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> EmbeddedRedisCluster:
        try:
            for node in self.nodes:
                node.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self) -> None:
        """Splits the slots evenly, introduces every node to the first, waits for state ok."""
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        bounds = [SLOTS * n // len(clients) for n in range(len(clients) + 1)]
        first = self.nodes[0]
        bus = int(clients[0].config_get("cluster-port")["cluster-port"])
        for n, client in enumerate(clients):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", bounds[n], bounds[n + 1] - 1)
            if n:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", first.port, bus)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")
                      and len(c.execute_command("CLUSTER", "NODES").splitlines()) == len(clients)
                      for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("the test Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        for client in clients:
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedRedisCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
