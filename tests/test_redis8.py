"""The Redis 8.2 of the test matrix (tests marked ``redis8``) is what they take it for:
Redis, 8.2 or later, with ``XACKDEL``; a missing or older binary cannot pass unnoticed."""

from __future__ import annotations

from .conftest import Server


def test_the_redis8_server_is_redis_8_2_or_later_and_has_xackdel(redis8: Server) -> None:
    client = redis8.client()
    try:
        info = client.info("server")
        assert "valkey_version" not in info
        major, minor = (int(part) for part in str(info["redis_version"]).split(".")[:2])
        assert (major, minor) >= (8, 2), info["redis_version"]
        assert client.execute_command("COMMAND", "INFO", "XACKDEL")["xackdel"]["arity"] == -6
        # It works as the benchmarks use it: ACKED deletes what every group acknowledged.
        ids = [client.xadd("s", {"n": n}) for n in range(3)]
        for group in ("a", "b"):
            client.xgroup_create("s", group, id="0")
            client.xreadgroup(group, "c", {"s": ">"})
        reply = client.execute_command("XACKDEL", "s", "a", "ACKED", "IDS", 3, *ids)
        assert reply == [2, 2, 2]  # acknowledged, still referenced by group b
        reply = client.execute_command("XACKDEL", "s", "b", "ACKED", "IDS", 3, *ids)
        assert reply == [1, 1, 1]  # acknowledged and deleted
        assert client.xlen("s") == 0
    finally:
        client.close()
