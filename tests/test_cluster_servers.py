"""The cluster fixtures themselves: the slot map, key routing and failover."""

from __future__ import annotations

from .servers import ClusterSet

#: Three keys whose slots are served by three different masters.
KEYS = ("stream-a", "stream-b", "stream-d")


def test_three_masters_cover_the_16384_slots(cluster: ClusterSet) -> None:
    ports = {master.port for master in cluster.masters}
    assert len(ports) == 3
    for node in cluster.nodes:
        ranges = cluster.slot_map(node)
        assert {port for _, _, port, _ in ranges} == ports
        covered = sorted(slot for low, high, _, _ in ranges for slot in range(low, high + 1))
        assert covered == list(range(16384))
        info = cluster.info(node)
        assert info["cluster_state"] == "ok"
        assert info["cluster_slots_assigned"] == "16384"
    assert cluster.url() == "redis+cluster://" + ",".join(
        f"127.0.0.1:{master.port}" for master in cluster.masters
    )


def _write_keys(cluster: ClusterSet) -> None:
    """An entry in each of KEYS, through a cluster client."""
    client = cluster.client()
    try:
        for key in KEYS:
            client.xadd(key, {"key": key})
    finally:
        client.close()


def test_keys_of_three_slots_land_on_three_masters(cluster: ClusterSet) -> None:
    assert len({cluster.node_of(key).port for key in KEYS}) == 3
    _write_keys(cluster)
    for key in KEYS:
        direct = cluster.node_of(key).client()
        try:
            assert direct.keys() == [key.encode()]
        finally:
            direct.close()


def test_a_killed_masters_replica_takes_over_with_the_data(
    cluster_with_replicas: ClusterSet,
) -> None:
    cluster = cluster_with_replicas
    assert len(cluster.replicas) == 3
    _write_keys(cluster)
    cluster.wait_synced()
    victim = cluster.node_of(KEYS[0])
    replica = cluster.kill_master(victim)
    cluster.wait_promoted(replica)
    assert cluster.node_of(KEYS[0]) is replica
    assert victim.process is None
    assert victim not in cluster.nodes
    client = cluster.client()
    try:
        for key in KEYS:
            assert client.xlen(key) == 1
        assert replica.role() == "master"
        # Back as the replica of the node that took over, the cluster whole again.
        cluster.heal()
        assert cluster.replica_of[replica.port] is victim
        assert victim.role() == "slave"
        assert len(cluster.masters) == len(cluster.replicas) == 3
        for key in KEYS:
            assert client.xlen(key) == 1
    finally:
        client.close()
