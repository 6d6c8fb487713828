from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
import trustme
from confluent_kafka import KafkaException

from tests import stack
from tests.harness import PARTITIONS, PrivateService, Run, private_service


@pytest.fixture(scope="session")
def kafka() -> str:
    try:
        stack.admin().list_topics(timeout=5)
    except KafkaException as exc:
        pytest.fail(f"Kafka is not reachable at {stack.BOOTSTRAP} ({exc}); run scripts/stack up")
    return stack.BOOTSTRAP


@pytest.fixture
def topic_factory(kafka: str) -> Iterator[Callable[..., str]]:
    made: list[str] = []

    def make(partitions: int = 1, prefix: str = "t", name: str | None = None,
             config: dict[str, str] | None = None) -> str:
        name = stack.create_topic(partitions, prefix, name=name, config=config)
        made.append(name)
        return name

    yield make
    for name in made:
        stack.delete_topic(name)


@pytest.fixture
def redis_db() -> Iterator[int]:
    """This test's own Redis database number, empty."""
    db = stack.fresh_redis_db()
    yield db
    stack.release_redis_db(db)


@pytest.fixture
def broker_url(redis_db: int) -> str:
    return stack.redis_url(redis_db)


class PrivateRedis(NamedTuple):
    """A ``redis-server`` of one test's own: its URL, and how to stop and start it."""

    url: str
    stop: Callable[[], None]
    start: Callable[[], None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def private_redis_factory(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    """Starts Redis servers of this test's own (``make(password=None)``); each can be
    stopped and started again, keeping its data. All are killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def make(password: str | None = None) -> PrivateRedis:
        port = _free_port()
        directory = tmp_path / f"redis-{port}"
        directory.mkdir()
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(directory)]
        if password is not None:
            cmd += ["--requirepass", password]

        mine: list[subprocess.Popen[bytes]] = []

        def client() -> redis.Redis:
            return redis.Redis(port=port, password=password)

        def start() -> None:
            mine.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
            procs.append(mine[-1])
            assert stack.wait_until(lambda: _pings(client()), 10)

        def stop() -> None:
            client().shutdown(save=True)  # data survives the restart
            mine[-1].wait(10)

        start()
        auth = f":{password}@" if password is not None else ""
        return PrivateRedis(f"redis://{auth}127.0.0.1:{port}/0", stop, start)

    yield make
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture
def private_redis(private_redis_factory: Callable[..., PrivateRedis]) -> PrivateRedis:
    """A Redis of this test's own that it can stop and start, keeping its data."""
    return private_redis_factory()


# --- the fault and hostile-input scenarios (tests/harness.py) ---------------------------


@pytest.fixture
def make_run(topic_factory: Callable[..., str], redis_db: int) -> Iterator[Callable[..., Run]]:
    """Builds the scenario's run, with a real ``celery worker`` on its Celery broker (by
    default this test's Redis database; results always go there) unless ``celery`` is
    False (the test starts it later). Its ingestd processes, any worker they left behind,
    and the celery worker are stopped at the end."""
    with contextlib.ExitStack() as cleanup:
        def make(broker_url: str | None = None, bootstrap: str = stack.BOOTSTRAP,
                 celery: bool = True, topic_config: dict[str, str] | None = None,
                 create_dlq: bool = True) -> Run:
            """``topic_config``: the source topic's settings; ``create_dlq`` False names a
            dead-letter topic that does not exist."""
            results = stack.redis_url(redis_db)
            dlq = stack.group().replace("g-", "dlq-")
            if bootstrap == stack.BOOTSTRAP:
                topic = topic_factory(PARTITIONS, config=topic_config)
                if create_dlq:
                    topic_factory(1, name=dlq)
            else:  # a private broker: its topics go with it
                topic = stack.create_topic(PARTITIONS, bootstrap=bootstrap, config=topic_config)
                if create_dlq:
                    stack.create_topic(1, bootstrap=bootstrap, name=dlq)
            run = Run(topic, dlq, stack.group(), broker_url or results, results, bootstrap)
            cleanup.callback(run.close)
            if celery:
                run.start_celery()
            return run

        yield make


@pytest.fixture
def run(make_run: Callable[..., Run]) -> Run:
    return make_run()


@pytest.fixture
def private_kafka() -> Iterator[PrivateService]:
    """A Kafka broker of this test's own (scripts/stack up kafka), that it may SIGKILL."""
    with private_service("kafka") as kafka:
        yield kafka


@pytest.fixture
def private_rabbitmq() -> Iterator[PrivateService]:
    """A RabbitMQ of this test's own (scripts/stack up rabbitmq), that it may restart."""
    with private_service("rabbitmq") as rabbitmq:
        yield rabbitmq


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fault scenarios take minutes each: ``-m 'not slow'`` skips them locally."""
    for item in items:
        if "faults" in item.path.parts:
            item.add_marker(pytest.mark.slow)


# --- TLS: a CA of the tests' own ---------------------------------------------------


class Certs(NamedTuple):
    ca: Path  # the CA's certificate: what --broker-tls-ca (--schema-registry-tls-ca) names
    server: Path  # key and certificate for 127.0.0.1 and localhost, from the CA
    wrong_host: Path  # from the CA, for wrong.example
    untrusted: Path  # for 127.0.0.1, from another CA
    client: Path  # a client certificate from the CA


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    # Not under pytest's tmp_path (mode 0700): RabbitMQ reads them as its own user.
    directory = Path(tempfile.mkdtemp(prefix="ingestd-tls-"))
    directory.chmod(0o755)
    ca, other = trustme.CA(), trustme.CA()
    out = {"ca": directory / "ca.pem"}
    ca.cert_pem.write_to_path(str(out["ca"]))
    for name, issuer, hosts in [("server", ca, ("127.0.0.1", "localhost")),
                                ("wrong_host", ca, ("wrong.example",)),
                                ("untrusted", other, ("127.0.0.1", "localhost")),
                                ("client", ca, ("ingestd@example",))]:
        issued = issuer.issue_cert(*hosts)
        out[name] = directory / f"{name}.pem"
        issued.private_key_and_cert_chain_pem.write_to_path(str(out[name]))
    for path in out.values():
        path.chmod(0o644)
    yield Certs(**out)
    shutil.rmtree(directory, ignore_errors=True)
