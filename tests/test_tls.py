"""TLS on a real server: Debian's redis-server, built with TLS, listening on TLS only;
and a cluster of three such masters (a replica each), its bus and replication on TLS too.

The certificates are made for the test session: a CA the pools trust, a server
certificate for 127.0.0.1 only (so ``localhost`` is another host), a client
certificate whose key is protected by a passphrase, an expired one, and a CA nobody
trusts with a client certificate of its own.

The bundled Valkey is built without TLS (it refuses ``--tls-port``: "Failed finding
TLS support"), so these tests run on redis-server only.
"""

from __future__ import annotations

import datetime
import logging
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import trustme
from cryptography.hazmat.primitives import serialization

import streambroker as sb
from streambroker.io.replies import translate_error

from .conftest import OpenBroker, _require_binary
from .servers import ClusterSet, TlsFiles, TlsServerProcess
from .test_cli import CLI, run
from .test_cluster import FAST, spread, until

PASSPHRASE = "SEKRIT-passphrase"
WRONG_PASSPHRASE = "WRONG-SEKRIT"


@dataclass(frozen=True)
class Certificates:
    ca: str  # the CA file the pools trust
    ca_path: str  # a directory holding the same CA, named by its subject hash
    other_ca: str  # a CA nobody trusts
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str  # protected by PASSPHRASE
    plain_client_key: str  # the same key, unprotected (for the fixtures' own client)
    stranger_cert: str  # a client certificate of the other CA
    stranger_key: str
    expired_cert: str  # a client certificate of the trusted CA, expired
    expired_key: str


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("client.example.org")
    names = ("ca.pem", "ca-dir", "other-ca.pem", "server.pem", "server.key")
    names += ("client.pem", "client.key", "client-plain.key")
    names += ("stranger.pem", "stranger.key", "expired.pem", "expired.key")
    files = Certificates(*(str(directory / name) for name in names))
    ca.cert_pem.write_to_path(files.ca)
    other.cert_pem.write_to_path(files.other_ca)
    server.cert_chain_pems[0].write_to_path(files.server_cert)
    server.private_key_pem.write_to_path(files.server_key)
    client.cert_chain_pems[0].write_to_path(files.client_cert)
    client.private_key_pem.write_to_path(files.plain_client_key)
    stranger = other.issue_cert("client.example.org")
    stranger.cert_chain_pems[0].write_to_path(files.stranger_cert)
    stranger.private_key_pem.write_to_path(files.stranger_key)
    long_ago = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    expired = ca.issue_cert(
        "client.example.org", not_before=long_ago, not_after=long_ago + datetime.timedelta(1)
    )
    expired.cert_chain_pems[0].write_to_path(files.expired_cert)
    expired.private_key_pem.write_to_path(files.expired_key)
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), password=None)
    Path(files.client_key).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSPHRASE.encode()),
        )
    )
    Path(files.ca_path).mkdir()
    subject_hash = subprocess.run(
        ["openssl", "x509", "-noout", "-subject_hash", "-in", files.ca],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    ca.cert_pem.write_to_path(str(Path(files.ca_path) / f"{subject_hash}.0"))
    return files


def _tls_server(
    tmp: pytest.TempPathFactory, certificates: Certificates, *, auth_clients: bool
) -> Iterator[TlsServerProcess]:
    server = TlsServerProcess(
        "redis",
        _require_binary("redis"),
        tmp.mktemp("redis-tls"),
        ca_file=certificates.ca,
        cert_file=certificates.server_cert,
        key_file=certificates.server_key,
        auth_clients=auth_clients,
        client_cert=(certificates.client_cert, certificates.plain_client_key),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def _tls(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[TlsServerProcess]:
    yield from _tls_server(tmp_path_factory, certificates, auth_clients=False)


@pytest.fixture(scope="module")
def _mutual_tls(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[TlsServerProcess]:
    yield from _tls_server(tmp_path_factory, certificates, auth_clients=True)


@pytest.fixture
def tls(_tls: TlsServerProcess) -> TlsServerProcess:
    """The flushed redis-server on TLS, taking clients without a certificate."""
    _tls.flush()
    return _tls


@pytest.fixture
def mutual_tls(_mutual_tls: TlsServerProcess) -> TlsServerProcess:
    """The flushed redis-server on TLS, requiring a client certificate."""
    _mutual_tls.flush()
    return _mutual_tls


@pytest.fixture(scope="module")
def _tls_cluster(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[ClusterSet]:
    cluster = ClusterSet(
        "redis",
        _require_binary("redis"),
        tmp_path_factory.mktemp("redis-tls-cluster"),
        with_replicas=True,
        tls=TlsFiles(certificates.ca, certificates.server_cert, certificates.server_key),
        extra_args=("--tls-cluster", "yes", "--tls-replication", "yes"),
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def tls_cluster(_tls_cluster: ClusterSet) -> ClusterSet:
    """The cluster of redis-servers on TLS only (clients, bus and replication), taking
    clients without a certificate; every master flushed."""
    _tls_cluster.wait_ready()
    _tls_cluster.flush()
    return _tls_cluster


def cluster_url(cluster: ClusterSet, ca: str) -> str:
    return f"{cluster.url('rediss+cluster')}?ssl_ca_certs={ca}"


def registry_of(url: str) -> sb.ValidatedRegistry:
    registry = sb.Registry()
    registry.register_redis(url)
    registry.register_stream("s", "default", ["g"])
    return registry.validate()


def mutual_url(server: TlsServerProcess, certificates: Certificates, passphrase: str) -> str:
    return (
        f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={certificates.ca}"
        f"&ssl_certfile={certificates.client_cert}&ssl_keyfile={certificates.client_key}"
        f"&ssl_password={passphrase}"
    )


def round_trip(open_broker: OpenBroker, url: str, server: TlsServerProcess) -> None:
    """Publish one event through a broker of ``url`` and consume it."""
    with open_broker(registry_of(url)) as broker:
        broker.publish("s", {"n": 1})
        assert server.client().xlen("s") == 1
        seen: list[object] = []
        consumer = broker.consumer("g")
        assert consumer.consume(lambda es: seen.extend(e.body for e in es), block=False) == 1
        assert seen == [{"n": 1}]


def refusal(open_broker: OpenBroker, url: str) -> str:
    """The one-line error publishing through a broker of ``url`` raises."""
    with (
        open_broker(registry_of(url), connect_timeout=10, socket_timeout=10) as broker,
        pytest.raises(sb.PoolConnectionError) as info,
    ):
        broker.publish("s", "x")
    error = info.value
    assert error.pool == "default"
    message = str(error)
    assert message.startswith("redis pool 'default': ")
    assert "\n" not in message
    assert "Traceback" not in message
    return message


@pytest.mark.parametrize("trust", ["ssl_ca_certs", "ssl_ca_path"])
def test_verified_tls_publishes_and_consumes(
    tls: TlsServerProcess,
    certificates: Certificates,
    open_broker: OpenBroker,
    trust: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="streambroker")
    where = certificates.ca if trust == "ssl_ca_certs" else certificates.ca_path
    url = (
        f"rediss://127.0.0.1:{tls.port}/0?{trust}={where}"
        "&ssl_cert_reqs=required&ssl_check_hostname=true"
    )
    round_trip(open_broker, url, tls)
    assert caplog.records == []


@pytest.mark.parametrize(
    "trust",
    ["", "?ssl_ca_certs={other}", "?ssl_cert_reqs=optional"],
    ids=["default", "other-ca", "optional"],
)
def test_a_server_of_an_untrusted_ca_is_refused(
    tls: TlsServerProcess, certificates: Certificates, open_broker: OpenBroker, trust: str
) -> None:
    # By default (no CA given) the system's CAs are trusted, and not the test CA.
    url = f"rediss://127.0.0.1:{tls.port}/0" + trust.format(other=certificates.other_ca)
    assert "certificate verify failed" in refusal(open_broker, url)
    assert tls.client().xlen("s") == 0


def test_a_certificate_for_another_host_is_refused(
    tls: TlsServerProcess, certificates: Certificates, open_broker: OpenBroker
) -> None:
    url = f"rediss://localhost:{tls.port}/0?ssl_ca_certs={certificates.ca}"
    message = refusal(open_broker, url)
    assert "certificate is not valid for 'localhost'" in message
    assert tls.client().xlen("s") == 0


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none", "ssl_cert_reqs=none"),
        (
            "rediss://localhost:{port}/0?ssl_ca_certs={ca}&ssl_check_hostname=false",
            "ssl_check_hostname=false",
        ),
    ],
    ids=["no-verification", "no-host-check"],
)
def test_verification_turned_off_works_and_warns_once(
    tls: TlsServerProcess,
    certificates: Certificates,
    open_broker: OpenBroker,
    caplog: pytest.LogCaptureFixture,
    url: str,
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="streambroker")
    round_trip(open_broker, url.format(port=tls.port, ca=certificates.ca), tls)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("redis pool default (rediss://")
    assert "TLS verification is off" in warnings[0]
    assert reason in warnings[0]


def test_mutual_tls_with_a_protected_key(
    mutual_tls: TlsServerProcess,
    certificates: Certificates,
    open_broker: OpenBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = mutual_url(mutual_tls, certificates, PASSPHRASE)
    round_trip(open_broker, url, mutual_tls)
    config = registry_of(url)
    shown = [repr(config), str(config), repr(config.pools["default"])]
    shown.append(config.pools["default"].display_address)
    assert "ssl_password=***" in shown[-1]
    for text in [*shown, caplog.text]:
        assert PASSPHRASE not in text


def test_a_wrong_passphrase_is_refused_without_showing_either(
    mutual_tls: TlsServerProcess,
    certificates: Certificates,
    open_broker: OpenBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    message = refusal(open_broker, mutual_url(mutual_tls, certificates, WRONG_PASSPHRASE))
    assert message.endswith("(the client key cannot be read: is its ssl_password right?)")
    for text in (message, caplog.text):
        assert WRONG_PASSPHRASE not in text
        assert PASSPHRASE not in text


def test_a_protected_key_without_its_passphrase_is_refused_without_a_prompt(
    mutual_tls: TlsServerProcess, certificates: Certificates, open_broker: OpenBroker
) -> None:
    # OpenSSL itself would ask for the passphrase on the terminal, and wait there.
    url = (
        f"rediss://127.0.0.1:{mutual_tls.port}/0?ssl_ca_certs={certificates.ca}"
        f"&ssl_certfile={certificates.client_cert}&ssl_keyfile={certificates.client_key}"
    )
    message = refusal(open_broker, url)
    assert "the client key is protected by a passphrase: give ssl_password" in message
    assert mutual_tls.client().xlen("s") == 0


#: What the broker says when the server ended the connection before its alert was read.
ENDED = "the server ended the TLS connection: it may require a client certificate"


@pytest.mark.parametrize(
    ("certificate", "hint"),
    [
        ("none", "the server requires a client certificate: give ssl_certfile and ssl_keyfile"),
        ("of another CA", "the server does not trust the client certificate"),
        ("expired", "the client certificate has expired"),
    ],
)
def test_a_client_without_a_valid_certificate_is_refused(
    mutual_tls: TlsServerProcess,
    certificates: Certificates,
    open_broker: OpenBroker,
    certificate: str,
    hint: str,
) -> None:
    url = f"rediss://127.0.0.1:{mutual_tls.port}/0?ssl_ca_certs={certificates.ca}"
    if certificate != "none":
        cert, key = (
            (certificates.stranger_cert, certificates.stranger_key)
            if certificate == "of another CA"
            else (certificates.expired_cert, certificates.expired_key)
        )
        url += f"&ssl_certfile={cert}&ssl_keyfile={key}"
    message = refusal(open_broker, url)
    # The alert is lost when the server's close overtakes it, at random.
    assert hint in message or ENDED in message, message
    assert mutual_tls.client().xlen("s") == 0


def _cli_config(directory: Path, url: str) -> Path:
    path = directory / "streambroker.yaml"
    path.write_text(f"default:\n    redis: {url}\n    streams:\n        s:\n          - g\n")
    return path


def test_the_cli_never_shows_the_passphrase(
    mutual_tls: TlsServerProcess, certificates: Certificates, tmp_path: Path
) -> None:
    _cli_config(tmp_path, mutual_url(mutual_tls, certificates, PASSPHRASE))
    validate = run([*CLI, "validate"], tmp_path, COLUMNS="1000")
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert f"ssl_keyfile={certificates.client_key}&ssl_password=***" in validate.stdout
    stats = run([*CLI, "stats", "--json"], tmp_path)
    assert stats.returncode == 0, stats.stdout + stats.stderr
    assert '"stream": "s"' in stats.stdout
    for result in (validate, stats):
        assert PASSPHRASE not in result.stdout + result.stderr

    _cli_config(tmp_path, mutual_url(mutual_tls, certificates, WRONG_PASSPHRASE))
    refused = run([*CLI, "stats"], tmp_path, COLUMNS="1000")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "redis pool 'default'" in output
    assert WRONG_PASSPHRASE not in output
    assert "Traceback" not in output


@pytest.mark.parametrize("cause", [ConnectionResetError(104, "reset"), ssl.SSLEOFError(8, "EOF")])
def test_a_tls_connection_ended_while_opening_is_explained(cause: OSError) -> None:
    # Which of these a refused client certificate shows depends on timing; the module's
    # tests on the server meet them by chance, this one each time.
    error = redis.ConnectionError(f"Error while reading from 127.0.0.1:6380 : {cause}")
    error.__context__ = cause  # as redis-py raises it, within ``except OSError``
    opening = translate_error(error, "p", connecting_tls=True)
    established = translate_error(error, "p")
    assert isinstance(opening, sb.PoolConnectionError)
    assert str(opening).endswith(
        "(the server ended the TLS connection: it may require a client certificate "
        "(ssl_certfile, ssl_keyfile) or not trust the one given)"
    )
    assert "certificate" not in str(established)


def test_a_cluster_over_tls_publishes_consumes_and_collects(
    tls_cluster: ClusterSet, certificates: Certificates, open_broker: OpenBroker
) -> None:
    cluster = tls_cluster
    for node in cluster.nodes:  # no plain port; the bus and replication on TLS too
        settings = node.client().config_get("*port*") | node.client().config_get("tls-*")
        assert (settings["port"], settings["tls-port"]) == ("0", str(node.port))
        assert (settings["tls-cluster"], settings["tls-replication"]) == ("yes", "yes")
    streams = spread(cluster)
    config = sb.Registry()
    config.register_redis(cluster_url(cluster, certificates.ca))
    for name in streams:
        config.register_stream(name, "default", ["g"])
    broker = open_broker(config.validate())
    ids = [broker.publish(name, {"n": n}) for n, name in enumerate(streams)]
    with broker.batch(wait_replicas=1, wait_timeout=5) as batch:
        for n in range(3, 9):
            batch.publish(streams[n % 3], {"n": n})
    ids += batch.ids
    for name in streams:  # each on its own master (and replicated: wait_replicas=1 held)
        assert cluster.node_of(name).client().xlen(name) == 3

    seen: list[sb.Event] = []
    consumer = broker.consumer("g", collect=False, **FAST)
    until(consumer, seen.extend, lambda: len(seen) >= 9, "g to read the three streams")
    assert sorted(event.body["n"] for event in seen) == list(range(9))
    assert sorted(event.id for event in seen) == sorted(ids)
    assert {event.stream for event in seen} == set(streams)
    assert [cluster.node_of(name).client().xlen(name) for name in streams] == [3, 3, 3]
    broker.collect_garbage(*streams)
    assert [cluster.node_of(name).client().xlen(name) for name in streams] == [0, 0, 0]


def test_a_cluster_of_an_untrusted_ca_is_refused(
    tls_cluster: ClusterSet, certificates: Certificates, open_broker: OpenBroker
) -> None:
    message = refusal(open_broker, cluster_url(tls_cluster, certificates.other_ca))
    assert "no TLS connection to a seed node of the cluster could be made" in message
    assert "certificate verify failed" in message
    assert tls_cluster.node_of("s").client().xlen("s") == 0
