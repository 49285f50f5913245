"""Credentials are never shown; URL query parameters are checked before any connection."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

import streambroker as sb
from streambroker.io.connection import ConnectionOptions, async_client, sync_client

from .conftest import OpenBroker, Server
from .test_cli import invoke, write_config

SECRET = "SEKRIT"


def spec_of(url: str) -> sb.PoolSpec:
    registry = sb.Registry()
    registry.register_redis(url)
    return registry.validate().pools["default"]


def problem_of(url: str) -> str:
    registry = sb.Registry()
    registry.register_redis(url)
    with pytest.raises(sb.ConfigError) as info:
        registry.validate()
    (problem,) = info.value.problems
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    return problem


# --- masking --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "display"),
    [
        (
            "rediss://host:6380/0?ssl_certfile=c.pem&ssl_keyfile=k.pem&ssl_password=SEKRIT",
            "rediss://host:6380/0?ssl_certfile=c.pem&ssl_keyfile=k.pem&ssl_password=***",
        ),
        ("rediss://host/0?ssl_pass%77ord=SEKRIT", "rediss://host/0?ssl_pass%77ord=***"),
        ("redis://host/0?password=ab;SEKRIT", "redis://host/0?password=***"),
        ("redis://host/0?password=ab%26SEKRIT", "redis://host/0?password=***"),
        (
            "rediss://host/0?ssl_password=ab%26SEKRIT&ssl_certfile=c.pem",
            "rediss://host/0?ssl_password=***&ssl_certfile=c.pem",
        ),
        ("redis://app:pa%2Fss-SEKRIT@host/0", "redis://app:***@host/0"),
    ],
)
def test_credentials_are_masked_in_display_and_repr(url: str, display: str) -> None:
    registry = sb.Registry()
    registry.register_redis(url)
    validated = registry.validate()
    spec = validated.pools["default"]
    assert spec.url == url
    assert spec.display_address == display
    for shown in (repr(spec), str(spec), repr(validated), str(validated)):
        assert SECRET not in shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:pa/ss-SEKRIT@host:6379/0",
        "redis://app:pa?ss-SEKRIT@host:6379/0",
        "redis://app:pa#ss-SEKRIT@host:6379/0",
        "redis://app/ss-SEKRIT@host/0",
        "redis://:pa/SEKRIT@host",
        "rediss://app:pa/ss-SEKRIT@host:99999/0",
        "unix://app:pa/SEKRIT@/run/redis.sock",
        "redis://host/0?password=ab#SEKRIT",
        "rediss://host/0?ssl_password=ab#SEKRIT",
        "ftp://app:pa/ss-SEKRIT@host",
    ],
)
def test_malformed_urls_never_echo_a_password(url: str) -> None:
    problem = problem_of(url)
    assert problem.startswith("redis pool default: ")
    assert "***" in problem or "scheme" not in problem


def test_unencoded_password_characters_are_explained() -> None:
    problem = problem_of("redis://app:pa/ss-SEKRIT@host:6379/0")
    assert "'redis://app:***@host:6379/0'" in problem
    assert "%2F" in problem


@pytest.mark.parametrize(
    "url",
    [
        "redis://host/0?password=SEKRIT&bogus=1",
        "redis://host/0?password=ab&SEKRIT",
        "redis://host/0?password=ab&SEKRIT=cd",
        "rediss://host:abc/0?ssl_password=ab&SEKRIT&ssl_certfile=c.pem",
        "rediss://host/0?ssl_password=SEKRIT&ssl_password=SEKRIT",
        "redis://host/0?ssl_password=SEKRIT",
        "redis://host/0?socket_timeout=abc&password=SEKRIT",
        "redis://host/0?PASSWORD=SEKRIT&db=0",
    ],
)
def test_parameter_problems_never_echo_a_password(url: str) -> None:
    problem_of(url)


@pytest.mark.parametrize(
    "second",
    [
        "rediss://h:1/3?ssl_password=SEKRIT",
        "redis://app:pa/ss-SEKRIT@127.0.0.1:6380/3",
        "redis://127.0.0.1:6380/3?password=ab&SEKRIT",
    ],
)
def test_the_cli_validate_never_shows_a_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second: str
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, "127.0.0.1:6379:0", second)
    code, out, err = invoke("validate")
    assert SECRET not in out + err
    assert "***" in out + err or code == 1


# --- query parameters -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://host/0?protocol=3", "the URL parameter 'protocol' is not accepted"),
        ("redis://host/0?bogus=1", "the URL parameter 'bogus' is not accepted"),
        ("redis://host/0?bogus", "the URL parameter 'bogus' is not accepted"),
        ("redis://host/0?timeout=1", "the URL parameter 'timeout' is not accepted"),
        ("redis://host/0?max_connections=2", "'max_connections' is not accepted"),
        ("unix:///run/redis.sock?retry_on_timeout=1", "'retry_on_timeout' is not accepted"),
        ("redis://host/0?ssl_cert_reqs=none", "'ssl_cert_reqs' applies only to rediss://"),
        ("unix:///run/r.sock?ssl_certfile=c", "'ssl_certfile' applies only to rediss://"),
        ("redis://host/0?db=1&db=2", "the URL parameter 'db' is given twice"),
        ("redis://host/0?client_name=", "the URL parameter 'client_name' has no value"),
        ("redis://host/0?socket_timeout=abc", "socket_timeout='abc' is not a number of seconds"),
        ("redis://host/0?socket_timeout=0", "must be a positive number of seconds"),
        ("redis://host/0?socket_connect_timeout=inf", "must be a positive number of seconds"),
        ("rediss://host/0?ssl_check_hostname=off", "must be true or false"),
        ("rediss://host/0?ssl_cert_reqs=never", "must be one of none, optional, required"),
        ("redis://host/0?client_name=my%20app", "may hold only visible ASCII characters"),
    ],
)
def test_query_parameters_are_checked(url: str, expected: str) -> None:
    problem = problem_of(url)
    assert problem.startswith("redis pool default: the URL parameter ")
    assert expected in problem


def test_unknown_parameter_lists_the_accepted_ones() -> None:
    problem = problem_of("redis://host/0?bogus=1")
    for name in ("client_name", "socket_timeout", "ssl_cert_reqs", "ssl_password"):
        assert name in problem


@pytest.mark.parametrize(
    "url",
    [
        "redis://host/0?client_name=billing-app&socket_timeout=2.5&socket_connect_timeout=1",
        "redis://host/0?username=app&password=pw&db=0",
        "unix:///run/redis.sock?db=1&client_name=a&socket_timeout=3",
        "rediss://host:6380/0?ssl_cert_reqs=required&ssl_check_hostname=true"
        "&ssl_ca_certs=/etc/ca.pem&ssl_ca_path=/etc/ssl/certs&ssl_certfile=/etc/c.pem"
        "&ssl_keyfile=/etc/k.pem&ssl_password=pw",
        "rediss://host/0?ssl_cert_reqs=optional&ssl_check_hostname=YES",
    ],
)
def test_documented_parameters_are_accepted(url: str) -> None:
    spec = spec_of(url)
    assert spec.url == url
    assert spec.tls_warning is None


def test_parameter_problems_come_with_the_yaml_line() -> None:
    registry = sb.Registry.from_yaml(
        "default:\n  redis: redis://host/0?protocol=3\n  streams: {}\n"
    )
    with pytest.raises(sb.ConfigError) as info:
        registry.validate()
    (problem,) = info.value.problems
    assert problem.startswith("<yaml>:2: redis pool default: the URL parameter 'protocol'")


# --- TLS verification turned off ------------------------------------------------------

UNVERIFIED = [
    ("rediss://app:SEKRIT@host:6380/0?ssl_cert_reqs=none", "ssl_cert_reqs=none"),
    ("rediss://host/0?ssl_check_hostname=false&ssl_password=SEKRIT", "ssl_check_hostname"),
    ("rediss://host/0?ssl_check_hostname=No", "ssl_check_hostname"),
]


def _tls_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "TLS verification is off" in r.getMessage()
    ]


@pytest.mark.parametrize(("url", "reason"), UNVERIFIED)
def test_turning_tls_verification_off_logs_a_warning(
    url: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    spec = spec_of(url)
    caplog.set_level(logging.WARNING, logger="streambroker")
    sync_client(spec, ConnectionOptions()).close()
    client = asyncio.run(async_client(spec, ConnectionOptions()))
    asyncio.run(client.aclose())
    warnings = _tls_warnings(caplog)
    assert len(warnings) == 2  # one per client made
    for message in warnings:
        assert message.startswith("redis pool default (rediss://")
        assert reason in message
        assert SECRET not in message


def test_verified_tls_logs_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="streambroker")
    sync_client(spec_of("rediss://host/0?ssl_cert_reqs=required"), ConnectionOptions()).close()
    assert _tls_warnings(caplog) == []


# --- on a server ----------------------------------------------------------------------


def test_url_parameters_reach_the_connection(server: Server, open_broker: OpenBroker) -> None:
    registry = sb.Registry()
    registry.register_redis(
        f"redis://{server.address}/0?client_name=billing-app&socket_timeout=5"
        "&socket_connect_timeout=5"
    )
    registry.register_stream("s", "default", ["g"])
    with open_broker(registry.validate()) as broker:
        broker.publish("s", "x")
        names = {c.get("name") for c in server.client().client_list()}
        assert "billing-app" in names
        assert server.client().xlen("s") == 1
