"""TLS to the Celery broker is verified: real ``redis-server --tls-port`` and RabbitMQ TLS
listeners, with certificates from a CA the tests make (trustme).

An untrusted server, or a trusted one for another host name, gets no task and no
password, and ``--check`` fails naming why in one line; with the CA given, records flow
to a real ``celery worker``; a server that asks for a client certificate gets one."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from ingestd.celery import reference_tasks
from tests import stack
from tests.conftest import Certs
from tests.harness import private_service

pytestmark = pytest.mark.stack
PASSWORD = "tls-s3cret"


@pytest.fixture(scope="module")
def source_topic(kafka: str) -> Iterator[str]:
    """A topic for --check to find: its Celery broker line is all these tests look at."""
    name = stack.create_topic(1, prefix="tls")
    yield name
    stack.delete_topic(name)


@pytest.fixture
def check(source_topic: str) -> Check:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ingestd", "--check", "--metrics-addr", "",
                               "--topic", source_topic, "--bootstrap-servers", stack.BOOTSTRAP,
                               "--dlq-topic", "", *args], capture_output=True, text=True,
                              timeout=60, check=False, cwd=stack.REPO)
    return run


Check = Callable[..., subprocess.CompletedProcess[str]]


def _refused(result: subprocess.CompletedProcess[str], why: str) -> None:
    """--check failed, on one line naming ``why``, and showed no password."""
    assert result.returncode == 1, result.stdout
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("problem: celery broker")]
    assert why in line, line
    assert PASSWORD not in result.stdout + result.stderr


# --- Redis ---------------------------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Starts ``redis-server`` with only a TLS port, a password, and ``cert`` as its
    certificate; ``clients=True`` asks every client for a certificate from the CA."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(cert: Path, ca: Path, clients: bool = False) -> str:
        port = stack.free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(cert), "--tls-key-file", str(cert),
             "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "yes" if clients else "no",
             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL))
        assert stack.wait_until(lambda: _listening(port), 10)
        return f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_an_untrusted_redis_gets_no_password(check: Check, certs: Certs) -> None:
    """A TLS server with a certificate from a CA nobody gave ingestd: the handshake fails
    before a byte of Redis's protocol, so nothing reaches it. (kombu alone sends it
    ``AUTH`` and the password.)"""
    received = bytearray()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.untrusted)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(5)
                    while chunk := tls.recv(4096):
                        received.extend(chunk)
            except (OSError, ssl.SSLError):
                continue

    threading.Thread(target=serve, daemon=True).start()
    try:
        result = check("--broker-url", f"rediss://:{PASSWORD}@127.0.0.1:{port}/0")
    finally:
        listener.close()
    _refused(result, "certificate verify failed")
    assert PASSWORD.encode() not in received and not received


def test_redis_for_another_host_is_refused(check: Check, certs: Certs,
                                           tls_redis: Callable[..., str]) -> None:
    url = tls_redis(certs.wrong_host, certs.ca)
    _refused(check("--broker-url", url, "--broker-tls-ca", str(certs.ca)),
             "IP address mismatch")


def test_redis_with_its_ca_given_gets_every_record_to_a_celery_worker(
        check: Check, certs: Certs, tls_redis: Callable[..., str],
        topic_factory: Callable[..., str], broker_url: str) -> None:
    url = tls_redis(certs.server, certs.ca)
    assert check("--broker-url", url).returncode == 1  # the system's CAs: not this one
    checked = check("--broker-url", url, "--broker-tls-ca", str(certs.ca))
    assert checked.returncode == 0, checked.stdout
    assert PASSWORD not in checked.stdout
    # kombu's spelling in the URL works as well.
    assert check("--broker-url", f"{url}?ssl_ca_certs={certs.ca}").returncode == 0
    topic = topic_factory(partitions=1)
    n = 50
    stack.produce(topic, [stack.signal_record(i) for i in range(n)])
    results = redis.Redis.from_url(broker_url)
    celery_url = f"{url}?ssl_cert_reqs=required&ssl_ca_certs={certs.ca}"
    with stack.celery_worker(celery_url, env={"INGESTD_RESULTS_URL": broker_url}), \
            stack.Ingestd(*stack.ingestd_args(topic, stack.group(), url, "--broker-tls-ca",
                                              str(certs.ca))) as ingestd:
        assert stack.wait_until(lambda: results.hlen(reference_tasks.RUNS_KEY) >= n, 90), \
            ingestd.output()[-3000:]
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    assert PASSWORD not in ingestd.output()


def test_redis_that_asks_for_a_client_certificate_gets_one(
        check: Check, certs: Certs, tls_redis: Callable[..., str]) -> None:
    url = tls_redis(certs.server, certs.ca, clients=True)
    ca = ["--broker-url", url, "--broker-tls-ca", str(certs.ca)]
    assert check(*ca).returncode == 1
    checked = check(*ca, "--broker-tls-cert", str(certs.client))
    assert checked.returncode == 0, checked.stdout


def test_the_opt_out_connects_to_anyone_and_says_so(check: Check, certs: Certs,
                                                    tls_redis: Callable[..., str]) -> None:
    url = tls_redis(certs.untrusted, certs.ca)
    for args in (["--broker-url", url, "--broker-tls-insecure"],
                 ["--broker-url", f"{url}?ssl_cert_reqs=none"]):
        checked = check(*args)
        assert checked.returncode == 0, checked.stdout
        assert "warning: --broker-tls-insecure: the Celery broker's certificate is not " \
               "verified" in checked.stdout


# --- RabbitMQ ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_rabbitmq(certs: Certs) -> Iterator[int]:
    """A RabbitMQ of the module's own with a TLS listener on every address: at
    127.0.0.1 its certificate names the host, at 127.0.0.2 it does not."""
    port = stack.free_port()
    conf = "\n".join([f"listeners.ssl.default = {port}", f"ssl_options.cacertfile = {certs.ca}",
                      f"ssl_options.certfile = {certs.server}",
                      f"ssl_options.keyfile = {certs.server}",
                      "ssl_options.verify = verify_none",
                      "ssl_options.fail_if_no_peer_cert = false"])
    with private_service("rabbitmq", RABBITMQ_EXTRA_CONF=conf):
        yield port


def test_rabbitmq_is_verified_chain_and_host(check: Check, certs: Certs,
                                             tls_rabbitmq: int) -> None:
    good = f"amqps://guest:guest@127.0.0.1:{tls_rabbitmq}//"
    _refused(check("--broker-url", good), "certificate verify failed")
    _refused(check("--broker-url", good.replace("127.0.0.1", "127.0.0.2"), "--broker-tls-ca",
                    str(certs.ca)), "IP address mismatch")
    checked = check("--broker-url", good, "--broker-tls-ca", str(certs.ca))
    assert checked.returncode == 0, checked.stdout
    assert check("--broker-url", f"{good}?ssl_ca_certs={certs.ca}").returncode == 0


def test_rabbitmq_with_its_ca_given_gets_every_record(
        certs: Certs, tls_rabbitmq: int, topic_factory: Callable[..., str],
        broker_url: str) -> None:
    url = f"amqps://guest:guest@127.0.0.1:{tls_rabbitmq}//"
    topic = topic_factory(partitions=1)
    n = 50
    stack.produce(topic, [stack.signal_record(i) for i in range(n)])
    results = redis.Redis.from_url(broker_url)
    # The celery worker verifies the broker against the system's CAs: these.
    env = {"INGESTD_RESULTS_URL": broker_url, "SSL_CERT_FILE": str(certs.ca)}
    with stack.celery_worker(url, env=env), \
            stack.Ingestd(*stack.ingestd_args(topic, stack.group(), url, "--broker-tls-ca",
                                              str(certs.ca))) as ingestd:
        assert stack.wait_until(lambda: results.hlen(reference_tasks.RUNS_KEY) >= n, 90), \
            ingestd.output()[-3000:]
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    assert "guest:guest" not in ingestd.output()
