"""Pools on Redis Cluster: the address form, and a pool's work over a cluster's nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

import streambroker as sb


def registry(address: str, pool: str = "default") -> sb.ValidatedRegistry:
    r = sb.Registry()
    r.register_redis(address, pool=pool)
    r.register_stream("orders", pool, ["billing"])
    return r.validate()


def problems(address: str, db: int | None = None) -> list[str]:
    r = sb.Registry()
    r.register_redis(address, db, pool="main")
    r.register_stream("orders", "main", ["billing"])
    with pytest.raises(sb.ConfigError) as caught:
        r.validate()
    return list(caught.value.problems)


# -- the address form, without a server ------------------------------------------------


def test_cluster_address_is_parsed() -> None:
    url = "redis+cluster://app:s3cret@10.0.0.1:7000,node-b:7001,[::1]:7002"
    spec = registry(url).pools["default"]

    assert (spec.kind, spec.cluster, spec.db, spec.tls) == ("cluster", True, 0, False)
    assert spec.seeds == (("10.0.0.1", 7000), ("node-b", 7001), ("::1", 7002))
    assert spec.display_address == "redis+cluster://app:***@10.0.0.1:7000,node-b:7001,[::1]:7002"
    assert "s3cret" not in repr(spec)
    tls = registry("rediss+cluster://h:7000/0?ssl_ca_certs=/ca.pem&db=0").pools["default"]
    assert (tls.tls, tls.db, tls.seeds, tls.tls_warning) == (True, 0, (("h", 7000),), None)
    unverified = registry("rediss+cluster://h:7000?ssl_cert_reqs=none").pools["default"]
    assert unverified.tls_warning is not None


def test_cluster_credentials_are_masked() -> None:
    spec = registry("rediss+cluster://app:p4ss@h:7000?password=p5ss&ssl_password=k3y")
    shown = spec.pools["default"].display_address
    assert [secret for secret in ("p4ss", "p5ss", "k3y") if secret in shown] == []
    (problem,) = problems("redis+cluster://h:7000?password=a&b=c")
    assert "b=c" not in problem
    assert "main" in problem


@pytest.mark.parametrize(
    ("address", "db", "expected"),
    [
        ("redis+cluster://h:7000/2", None, "selects db 2 in its path: a Redis Cluster has"),
        ("redis+cluster://h:7000?db=1", None, "selects db 1 in its query"),
        ("redis+cluster://h:7000", 3, "db=3 was given: a Redis Cluster has database 0 only"),
        ("redis+cluster://h:7000/x", None, "db 'x' is not a number"),
        ("redis+cluster://", None, "cannot parse cluster node ''"),
        ("redis+cluster://h", None, "cannot parse cluster node 'h': expected host:port"),
        ("redis+cluster://h:7000,,g:7000", None, "cannot parse cluster node ''"),
        ("redis+cluster://h:99999", None, "cluster node port 99999 is out of range"),
        ("redis+cluster://h:7000?ssl_cert_reqs=none", None, "applies only to rediss://"),
        ("redis+cluster://h:7000?sentinel_password=x", None, "is not accepted"),
        ("redis+cluster://h:7000?protocol=3", None, "parameter 'protocol' is not accepted"),
    ],
)
def test_bad_cluster_addresses_are_config_errors(
    address: str, db: int | None, expected: str
) -> None:
    (problem,) = problems(address, db)
    assert problem.startswith("redis pool main: ")
    assert expected in problem


def test_cluster_address_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "streambroker.yaml"
    path.write_text(
        "main:\n"
        "    redis: redis+cluster://app:s3cret@10.0.0.1:7000,10.0.0.2:7000\n"
        "    streams: {orders: [billing]}\n"
        "other:\n"
        "    redis: redis+cluster://10.0.0.1:7000\n"
        "    db: 2\n"
        "    streams: {audit: [billing]}\n"
    )
    with pytest.raises(sb.ConfigError) as caught:
        sb.Registry.from_yaml(path).validate()
    (problem,) = caught.value.problems
    assert "redis pool other" in problem
    assert "database 0 only" in problem
    path.write_text(path.read_text().replace("    db: 2\n", "    db: 0\n"))
    spec = sb.Registry.from_yaml(path).validate().pools["main"]
    assert (spec.kind, len(spec.seeds)) == ("cluster", 2)
    assert "s3cret" not in spec.display_address
