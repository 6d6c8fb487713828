"""Helpers for tests that run against the real local stack (scripts/stack up)."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ingestd.supervisor.supervisor import WATCHER_NAME

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
RABBITMQ_URL = f"amqp://guest:guest@127.0.0.1:{os.environ.get('RABBITMQ_PORT', '5672')}//"
# scripts/stack up --with-registry: Apicurio Registry's Confluent-compatible API
REGISTRY_URL = f"http://127.0.0.1:{os.environ.get('REGISTRY_PORT', '8081')}/apis/ccompat/v7"
SENTINEL_MASTER = os.environ.get("SENTINEL_MASTER_NAME", "ingestd")
SENTINEL_PORTS = [int(p) for p in os.environ.get("SENTINEL_PORTS", "26379 26380 26381").split()]
REDIS_DATABASES = 64  # scripts/stack starts redis-server with --databases 64

_db_numbers = itertools.cycle(range(1, REDIS_DATABASES))
_CLAIM = "ingestd-test-db:{}"


def redis_url(db: int) -> str:
    return f"redis://127.0.0.1:{REDIS_PORT}/{db}"


def sentinel_url(ports: list[int] = SENTINEL_PORTS) -> str:
    """The ``--broker-url`` of Redis Sentinels: each of them, as kombu spells a list."""
    return ";".join(f"sentinel://127.0.0.1:{port}" for port in ports)


def sentinel_nodes(ports: list[int] = SENTINEL_PORTS,
                   master: str = SENTINEL_MASTER) -> tuple[Any, list[Any]]:
    """Clients of the master and of each replica, as the Sentinels name them."""
    from redis.sentinel import Sentinel

    sentinel = Sentinel([("127.0.0.1", port) for port in ports], socket_timeout=5)
    host, port = sentinel.discover_master(master)
    return redis.Redis(host, port), [redis.Redis(h, p)
                                     for h, p in sentinel.discover_slaves(master)]


def fresh_redis_db() -> int:
    """A Redis database number of this test's own, emptied.

    Claimed in database 0, so that test runs in parallel never share one.
    """
    control = redis.Redis(port=REDIS_PORT, db=0)
    for _ in range(REDIS_DATABASES):
        db = next(_db_numbers)
        if control.set(_CLAIM.format(db), os.getpid(), nx=True, ex=3600):
            redis.Redis(port=REDIS_PORT, db=db).flushdb()
            return db
    raise RuntimeError("every Redis test database is claimed")


def release_redis_db(db: int) -> None:
    redis.Redis(port=REDIS_PORT, db=0).delete(_CLAIM.format(db))


_admins: dict[str, AdminClient] = {}


def admin(bootstrap: str = BOOTSTRAP) -> AdminClient:
    """One AdminClient per cluster for the test session; its futures need it alive."""
    if bootstrap not in _admins:
        _admins[bootstrap] = AdminClient({"bootstrap.servers": bootstrap})
    return _admins[bootstrap]


def forget_admin(bootstrap: str) -> None:
    """Drop a cluster's AdminClient: for a broker that a test started and stops."""
    _admins.pop(bootstrap, None)


def create_topic(partitions: int = 1, prefix: str = "t", bootstrap: str = BOOTSTRAP,
                 name: str | None = None, config: dict[str, str] | None = None) -> str:
    """A new topic, replicated as the cluster's default says; ``config`` holds topic
    settings such as ``max.message.bytes``."""
    name = name or f"{prefix}-{uuid.uuid4().hex[:12]}"
    futures = admin(bootstrap).create_topics([NewTopic(name, partitions, config=config or {})],
                                             operation_timeout=15)
    futures[name].result(timeout=30)
    wait_for_topic(name, partitions, bootstrap=bootstrap)
    return name


def set_group_config(group: str, config: dict[str, str], bootstrap: str = BOOTSTRAP) -> None:
    """Set a group's own configs (a share group's record lock, say)."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    resource = ConfigResource(ConfigResource.Type.GROUP, group, incremental_configs=[
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
        for k, v in config.items()])
    admin(bootstrap).incremental_alter_configs([resource])[resource].result(30)


def wait_for_topic(name: str, partitions: int, timeout: float = 30,
                   bootstrap: str = BOOTSTRAP) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = admin(bootstrap).list_topics(name, timeout=5).topics.get(name)
        if meta and meta.error is None and len(meta.partitions) == partitions:
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} not ready")


def delete_topic(name: str, bootstrap: str = BOOTSTRAP) -> None:
    for future in admin(bootstrap).delete_topics([name], operation_timeout=15).values():
        future.result(timeout=30)


def produce(topic: str, records: Iterable[bytes | None], partition: int | None = None,
            keys: Iterable[bytes | None] | None = None, bootstrap: str = BOOTSTRAP,
            delivered: list[tuple[int, int, int]] | None = None,
            headers: Iterable[list[tuple[str, bytes]] | None] | None = None,
            props: dict[str, Any] | None = None) -> int:
    """Produce records and wait until Kafka acknowledged every one.

    ``delivered`` receives ``(index in records, partition, offset)`` for each, from
    its delivery report: where every record landed.
    """
    # Idempotent: a retry after a broker failure writes no second copy at another offset.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                         "enable.idempotence": True, **(props or {})})
    errors: list[Any] = []

    def reporter(index: int) -> Callable[[Any, Any], None]:
        def report(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(err)
            elif delivered is not None:
                delivered.append((index, msg.partition(), msg.offset()))
        return report

    n = 0
    key_iter = iter(keys) if keys is not None else itertools.repeat(None)
    header_iter = iter(headers) if headers is not None else itertools.repeat(None)
    # Keyless records go round the partitions: the sticky partitioner could put a small
    # set all in one, and an empty partition has no committed offset for a test to see.
    spread = 0 if partition is not None or keys is not None else len(
        producer.list_topics(topic, timeout=10).topics[topic].partitions)
    for value in records:
        kwargs: dict[str, Any] = {"value": value, "key": next(key_iter),
                                  "headers": next(header_iter), "on_delivery": reporter(n)}
        if partition is not None:
            kwargs["partition"] = partition
        elif spread:
            kwargs["partition"] = n % spread
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        n += 1
    assert producer.flush(60) == 0, "producer did not flush"
    assert not errors, errors
    return n


def consume_all(topic: str, expected: int, timeout: float = 60,
                bootstrap: str = BOOTSTRAP) -> list[Any]:
    """Read ``expected`` records from the start of ``topic`` without a group commit."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    out.append(msg)
    finally:
        consumer.close()
    return out


def committed_offsets(group: str, topic: str, partitions: int,
                      bootstrap: str = BOOTSTRAP) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()


def end_offsets(topic: str, partitions: int, bootstrap: str = BOOTSTRAP) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions)}
    finally:
        consumer.close()


@contextmanager
def celery_worker(broker_url: str, queue: str = "celery", concurrency: int = 2,
                  env: dict[str, str] | None = None, app: str = "ingestd.celery.reference_tasks",
                  pool: str = "prefork") -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery worker`` running the reference tasks (or ``app``'s), stopped on
    exit."""
    log = Path(os.environ.get("INGESTD_TEST_LOGS", "/tmp")) / f"celery-{uuid.uuid4().hex[:8]}.log"
    full_env = {**os.environ, "CELERY_BROKER_URL": broker_url, **(env or {})}
    cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "--pool", pool,
           "--loglevel", "INFO", "-Q", queue, "-c", str(concurrency), "--without-gossip",
           "--without-mingle", "--without-heartbeat", "-n", f"ref-{uuid.uuid4().hex[:8]}@%h"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def amqp_queue_type(queue: str, url: str = RABBITMQ_URL) -> str:
    """How RabbitMQ holds ``queue``: only a quorum queue accepts a redeclare as one."""
    from amqp.exceptions import PreconditionFailed
    from kombu.connection import Connection

    with Connection(url, connect_timeout=5) as conn:
        try:
            conn.channel().queue_declare(queue=queue, durable=True, auto_delete=False,
                                         arguments={"x-queue-type": "quorum"})
        except PreconditionFailed:
            return "classic"
    return "quorum"


def amqp_delete(queue: str, url: str = RABBITMQ_URL) -> None:
    """Delete ``queue`` and its exchange of the same name, if there."""
    from kombu.connection import Connection

    with Connection(url, connect_timeout=5) as conn:
        conn.default_channel.queue_delete(queue)
        conn.default_channel.exchange_delete(queue)


def wait_until(predicate: Any, timeout: float = 60, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Ingestd:
    """``ingestd`` run as a real process, as an operator would run it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.log = Path(os.environ.get("INGESTD_TEST_LOGS", "/tmp")) / \
            f"ingestd-{uuid.uuid4().hex[:8]}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Ingestd:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ingestd", *self.args],
                                         stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=REPO)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def worker_pids(self) -> list[int]:
        """The supervisor's children but its ownership watcher (named by the supervisor)."""
        return [pid for pid in self.children() if _comm(pid) != WATCHER_NAME]

    def watcher_pid(self) -> int | None:
        return next((pid for pid in self.children() if _comm(pid) == WATCHER_NAME), None)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.children():
                with suppress(ProcessLookupError):
                    os.kill(pid, 9)
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Ingestd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def ingestd_args(topic: str, group: str, broker_url: str, *extra: str,
                 bootstrap: str = BOOTSTRAP) -> list[str]:
    """The flags every end-to-end test passes: its own topic, group and broker database."""
    return ["--topic", topic, "--group-id", group, "--bootstrap-servers", bootstrap,
            "--broker-url", broker_url, "--metrics-addr", "", "--workers", "1", *extra]


def signal_record(i: int, **extra: Any) -> bytes:
    import orjson

    return orjson.dumps({"name": "cpu.load", "value": i * 0.25, "source": f"host-{i % 7}",
                         "timestamp": 1732800000 + i, "tags": {"dc": "eu1"}, **extra})


def queued_tasks(broker_url: str, queue: str = "celery") -> list[dict[str, Any]]:
    """Every task message waiting in a Redis queue, decoded: headers plus args."""
    import base64
    import json

    client = redis.Redis.from_url(broker_url)
    out = []
    for raw in client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        out.append({**envelope["headers"], "args": args, "kwargs": kwargs})
    return out


def group() -> str:
    """A consumer group of the test's own."""
    return f"g-{uuid.uuid4().hex[:10]}"


def survivors(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (a test's own group id)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, bytes]:
    """Status and body; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except OSError:
        return 0, b""
