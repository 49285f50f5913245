"""Stand-ins for a server on the other topologies a pool can have: a Redis Cluster of
three masters, and the master of a Sentinel service.

Tests marked ``anywhere`` (a module's ``pytestmark``, or one test's mark) that take the
``server`` fixture (directly, or through ``config`` and ``broker``) run on each server
kind as one server, as a cluster and behind sentinels (see ``tests/conftest.py``). The
stand-ins give what those tests use of a server: ``kind``, ``pool_address(db)``,
``client(db)`` and ``flush()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from .servers import SERVER_KINDS, ClusterSet, SentinelSet

#: Where tests marked ``anywhere`` run: each server kind alone and as a cluster, and behind
#: sentinels of the bundled Valkey (the Sentinel tests run on both kinds; once here keeps
#: the suite short).
TOPOLOGIES = (
    *SERVER_KINDS,
    *(f"{kind}-cluster" for kind in SERVER_KINDS),
    "valkey-sentinel",
)


@dataclass
class ClusterPool:
    """A cluster standing in for a server. A cluster has database 0 only, so every pool
    of a test lives in it, whatever database the test names."""

    cluster: ClusterSet
    topology = "cluster"

    @property
    def kind(self) -> str:
        return self.cluster.kind

    def pool_address(self, db: int = 0) -> str:
        return self.cluster.url()

    def client(self, db: int = 0) -> redis.RedisCluster:
        return self.cluster.client()

    def flush(self) -> None:
        self.cluster.flush()


@dataclass
class SentinelPool:
    """The master of a Sentinel service standing in for a server."""

    sentinels: SentinelSet
    topology = "sentinel"

    @property
    def kind(self) -> str:
        return self.sentinels.kind

    def pool_address(self, db: int = 0) -> str:
        return self.sentinels.url(db)

    def client(self, db: int = 0) -> redis.Redis:
        return self.sentinels.master().client(db)

    def flush(self) -> None:
        self.sentinels.master().flush()
        self.sentinels.wait_synced()
