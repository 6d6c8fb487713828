"""What every fault scenario shares: a producer that knows where each record landed, the
run's own topic, dead-letter topic and group, the ``ingestd`` processes it starts, the
wait for everything to settle and the checker's verdict."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import redis
from confluent_kafka import KafkaException
from redis.sentinel import MasterNotFoundError

from ingestd import rdkafka
from ingestd.celery import reference_tasks
from ingestd.tools import checker
from tests import stack

PARTITIONS = 4
BATCH = 500
# Not JSON, a JSON array, and an object that breaks the signal schema.
POISON = (b"not json {", b'[{"name": "n", "value": 1}]',
          b'{"name": "n", "value": 1, "source": "s"}')
POISON_EVERY = 50
QUIET = 3.0  # seconds without a new execution before a settled run is judged


class Produced(NamedTuple):
    """A record to produce with any bytes, and whether it is valid (executed by Celery)
    or poison (dead-lettered)."""

    value: bytes | None
    key: bytes | None = None
    headers: list[rdkafka.HeaderIn] | None = None
    valid: bool = True


def record(i: int) -> tuple[bytes, bool]:
    """The ``i``-th record of a load and whether it is valid: one in POISON_EVERY is poison."""
    if i % POISON_EVERY == POISON_EVERY - 1:
        return POISON[(i // POISON_EVERY) % len(POISON)], False
    return stack.signal_record(i), True


class Load:
    """Records produced with delivery reports, so that each one's coordinates are known: as a
    backlog, or spread over some seconds by a background thread while faults happen."""

    def __init__(self, topic: str, bootstrap: str) -> None:
        self.topic = topic
        self.bootstrap = bootstrap
        self.produced: dict[checker.Record, bool] = {}
        self.count = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()

    def produce(self, n: int) -> None:
        start, self.count = self.count, self.count + n
        values = [record(i) for i in range(start, start + n)]
        delivered: list[tuple[int, int, int]] = []
        stack.produce(self.topic, (v for v, _ in values),
                      keys=(str(i).encode() for i in range(start, start + n)),
                      bootstrap=self.bootstrap, delivered=delivered)
        for index, partition, offset in delivered:
            self.produced[(self.topic, partition, offset)] = values[index][1]

    def produce_any(self, records: Sequence[Produced], props: dict[str, Any] | None = None,
                    partitions: int = PARTITIONS) -> list[tuple[int, int]]:
        """Records of any bytes (keys, header names and values), through librdkafka's C API
        (:mod:`ingestd.rdkafka`), round the partitions; each one's partition and offset,
        from its delivery report."""
        producer = rdkafka.Producer({"bootstrap.servers": self.bootstrap, "acks": "all",
                                     "enable.idempotence": True, "linger.ms": 5,
                                     **(props or {})})
        errors: list[Any] = []
        where: list[tuple[int, int]] = [(-1, -1)] * len(records)

        def reporter(i: int, valid: bool) -> Callable[[Any, rdkafka.Delivery], None]:
            def report(err: Any, delivery: rdkafka.Delivery) -> None:
                if err is not None:
                    errors.append(err)
                else:
                    self.produced[(self.topic, delivery.partition(), delivery.offset())] = valid
                    where[i] = (delivery.partition(), delivery.offset())
            return report

        for i, record in enumerate(records):
            while True:
                try:
                    producer.produce(self.topic, value=record.value, key=record.key,
                                     headers=record.headers, partition=i % partitions,
                                     on_delivery=reporter(i, record.valid))
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
        assert producer.flush(60) == 0, "producer did not flush"
        producer.close()
        assert not errors, errors
        self.count += len(records)
        return where

    def start(self, n: int, seconds: float) -> Load:
        """Produce ``n`` records over about ``seconds``, in the background."""
        steps = max(1, int(seconds * 5))

        def run() -> None:
            try:
                for step in range(steps):
                    if self._cancel.is_set():
                        return
                    began = time.monotonic()
                    self.produce(n * (step + 1) // steps - n * step // steps)
                    time.sleep(max(0.0, seconds / steps - (time.monotonic() - began)))
            except BaseException as exc:  # re-raised by wait()
                self._error = exc

        self.wait()
        self._thread = threading.Thread(target=run, name="load", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop a background load after its current chunk: the test is over."""
        self._cancel.set()

    def wait(self, timeout: float = 300) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "the load did not finish"
            self._thread = None
        if self._error is not None:
            raise self._error

    @property
    def valid(self) -> int:
        return sum(self.produced.values())


@dataclass
class Run:
    """One scenario's topic, dead-letter topic, group, brokers and ``ingestd`` processes."""

    topic: str
    dlq: str
    group: str
    broker_url: str  # the Celery broker
    results_url: str  # where the reference tasks record what ran
    bootstrap: str = stack.BOOTSTRAP
    started: list[stack.Ingestd] = field(default_factory=list)
    load: Load = field(init=False)

    def __post_init__(self) -> None:
        self.load = Load(self.topic, self.bootstrap)
        self.results = redis.Redis.from_url(self.results_url, decode_responses=True)
        self._celery: contextlib.ExitStack | None = None

    def start_celery(self, broker_url: str | None = None,
                     env: dict[str, str] | None = None) -> None:
        """A real ``celery worker`` on this run's Celery broker (or ``broker_url``: one
        node of a failover list, say), recording in results_url; stopped by close().
        ``env``: more of its environment (``CELERY_CONFIG_MODULE``, say)."""
        if self._celery is None:
            self._celery = contextlib.ExitStack()
        self._celery.enter_context(stack.celery_worker(
            broker_url or self.broker_url,
            env={"INGESTD_RESULTS_URL": self.results_url, **(env or {})}))

    def ingestd(self, *extra: str, instance: str | None = None,
                workers: int = 2) -> stack.Ingestd:
        """A started ``ingestd`` on this run's topic and group; ``instance`` names a second
        host (its own ``--instance-id``)."""
        args = ["--dlq-topic", self.dlq, "--batch-size", str(BATCH), "--workers", str(workers),
                *extra]
        if instance is not None:
            args += ["--instance-id", f"{instance}-{self.group}"]
        proc = stack.Ingestd(*stack.ingestd_args(self.topic, self.group, self.broker_url, *args,
                                                 bootstrap=self.bootstrap))
        self.started.append(proc)
        return proc.start()

    # --- progress -----------------------------------------------------------

    def committed(self, timeout: float = 30) -> dict[checker.Partition, int]:
        """The group's committed offsets; retried while the group coordinator is not
        there yet (a new broker, a broker coming back)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                offsets = stack.committed_offsets(self.group, self.topic, PARTITIONS,
                                                  self.bootstrap)
                return {(self.topic, p): o for p, o in offsets.items()}
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def progress(self) -> int:
        """Records committed so far, over every partition."""
        return sum(max(o, 0) for o in self.committed().values())

    def wait_progress(self, records: int, timeout: float = 120) -> None:
        """Wait until the group committed ``records`` more than now."""
        goal = self.progress() + records
        assert stack.wait_until(lambda: self.progress() >= goal, timeout, 0.5), \
            f"committed {self.progress()} of {goal}\n{self.logs()}"

    def executed(self) -> int:
        return int(self.results.get(reference_tasks.EXECUTED_KEY) or 0)

    def queued(self) -> int:
        """Task messages the Celery broker still holds, taken or not; -1 while it does not
        answer. Redis only: 0 for AMQP, where the quiet wait alone tells."""
        if not self.broker_url.startswith("redis"):
            return 0
        try:
            broker = redis.Redis.from_url(self.broker_url)
            return int(broker.llen("celery")) + int(broker.hlen("unacked"))
        except redis.RedisError:
            return -1

    def quiet(self, seconds: float = QUIET, timeout: float = 300) -> bool:
        """Wait until the Celery broker holds no task and the celery worker has executed
        nothing new for ``seconds``."""
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.executed()
            if now != last or self.queued():
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= seconds:
                return True
            time.sleep(0.5)
        return False

    def settled(self) -> bool:
        """Committed up to the end, every valid record executed, every poison one
        dead-lettered."""
        try:
            ends = stack.end_offsets(self.topic, PARTITIONS, self.bootstrap)
            committed = self.committed()
            letters = sum(stack.end_offsets(self.dlq, 1, self.bootstrap).values())
        except KafkaException:  # a broker that is coming back
            return False
        poison = len(self.load.produced) - self.load.valid
        return (committed == {(self.topic, p): o for p, o in ends.items()}
                and int(self.results.hlen(reference_tasks.RUNS_KEY)) >= self.load.valid
                and letters >= poison)

    def settle(self, timeout: float = 300) -> bool:
        """Wait for the load to end and everything to settle; False after ``timeout`` (the
        checker then says what is missing)."""
        deadline = time.monotonic() + timeout
        self.load.wait()
        done = stack.wait_until(self.settled, deadline - time.monotonic(), 1.0)
        return self.quiet(timeout=max(30.0, deadline - time.monotonic())) and done

    def assigned(self, proc: stack.Ingestd) -> bool:
        """Whether a worker of ``proc`` has been given a partition of the topic."""
        return f"assigned {self.topic}[" in proc.output()

    # --- verdict ------------------------------------------------------------

    def dead_letters(self) -> list[checker.Record]:
        return checker.read_dead_letters(self.bootstrap, self.dlq)

    def report(self, committed: dict[checker.Partition, int] | None = None) -> checker.Report:
        self.load.wait()
        executed = {str(k): int(v)
                    for k, v in self.results.hgetall(reference_tasks.RUNS_KEY).items()}
        return checker.check(self.load.produced, executed, self.dead_letters(),
                             self.committed() if committed is None else committed)

    def verify(self, max_duplicates: int | None = 0) -> checker.Report:
        """The checker's verdict on the whole run; duplicates up to ``max_duplicates`` (None:
        any number) pass."""
        report = self.report()
        print(f"\n{report.summary()}")
        assert not report.failures(max_duplicates), \
            f"{report.explain(max_duplicates)}\n{self.logs()}"
        return report

    def logs(self, limit: int = 12) -> str:
        """Each ingestd's log path and its distinct warnings and errors (invalid records
        aside), so that a failure says where to look."""
        out = []
        for proc in self.started:
            seen: dict[str, str] = {}
            for line in proc.output().splitlines():
                if (" ERROR " in line or " WARNING " in line) and "invalid_record" not in line:
                    seen.setdefault(re.sub(r"\d+", "#", line.partition(" ")[2])[:100], line[:300])
            shown = list(seen.values())
            code = proc.proc.poll() if proc.proc is not None else None
            out.append(f"{proc.log} (exit {code}): {len(shown)} distinct warnings/errors")
            out += [f"  {line}" for line in shown[:limit]]
        return "\n".join(out)

    def stuck(self) -> list[str]:
        """The supervisor's lines about workers it killed as stuck."""
        return [line for proc in self.started for line in proc.output().splitlines()
                if "stuck for" in line]

    def stop(self, proc: stack.Ingestd, timeout: float = 90) -> int:
        """TERM: drain and leave the group."""
        proc.signal(signal.SIGTERM)
        return proc.wait(timeout)

    def close(self) -> None:
        self.load.cancel()
        for proc in self.started:
            proc.stop()
        for pid in stack.survivors(self.group):
            os.kill(pid, signal.SIGKILL)
        if self._celery is not None:
            self._celery.close()


def wait_gone(pid: int, timeout: float = 30) -> bool:
    """Until ``pid`` is reaped: a zombie still answers ``kill -0``, which scripts/stack
    takes for a running service."""
    return stack.wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout)


class PrivateService:
    """One service of ``scripts/stack`` on its own ports and folder, beside the shared stack,
    so that a test can kill and restart it."""

    def __init__(self, service: str, ports: tuple[tuple[str, int], ...] | None = None,
                 **env: str) -> None:
        self.service = service
        # Free ports for each of the service's port variables (``ports``, by default
        # :data:`PORTS`'s); the first is the one it is reached on.
        self.ports = {variable: [stack.free_port() for _ in range(count)]
                      for variable, count in ports or PORTS[service]}
        self.port = next(iter(self.ports.values()))[0]
        # Not under pytest's tmp_path (mode 0700): RabbitMQ runs as its own user.
        self.directory = Path(tempfile.mkdtemp(prefix=f"ingestd-{service}-"))
        self.directory.chmod(0o755)
        self.env = {**os.environ, "INGESTD_STACK_DIR": str(self.directory),
                    **{v: " ".join(map(str, ports)) for v, ports in self.ports.items()}, **env}

    def _stack(self, *args: str) -> None:
        done = subprocess.run([str(stack.REPO / "scripts" / "stack"), *args], env=self.env,
                              capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, f"scripts/stack {' '.join(args)}: {done.stderr}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def up(self) -> None:
        self._stack("up", self.service)

    def down(self) -> None:
        self._stack("down")

    def pid(self) -> int:
        return int((self.directory / self.service / f"{self.service}.pid").read_text())

    @property
    def node(self) -> str:
        """A RabbitMQ's Erlang node name, as scripts/stack names it."""
        return f"ingestd-{self.port}@localhost"

    def kill(self, pid: int | None = None) -> None:
        """SIGKILL the service (or its process ``pid``), and wait until it is gone."""
        pid = pid or self.pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid)

    def remove(self) -> None:
        """Stop it and remove its folder."""
        try:
            self.down()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def rabbitmqctl(node: str, *args: str) -> str:
    """``rabbitmqctl -n node args``; its output."""
    done = subprocess.run(["rabbitmqctl", "-n", node, *args], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr}"
    return done.stdout


@contextlib.contextmanager
def rabbitmq_cluster(size: int) -> Iterator[list[PrivateService]]:
    """``size`` RabbitMQ nodes of scripts/stack on loopback, clustered: each but the first
    joins the first (Debian's nodes share the rabbitmq user's Erlang cookie)."""
    with contextlib.ExitStack() as nodes:
        cluster = [nodes.enter_context(private_service("rabbitmq")) for _ in range(size)]
        for node in cluster[1:]:
            rabbitmqctl(node.node, "stop_app")
            rabbitmqctl(node.node, "join_cluster", cluster[0].node)
            rabbitmqctl(node.node, "start_app")
        yield cluster


def quorum_leader(queue: str, node: PrivateService) -> str:
    """The node holding ``queue``'s quorum leader, as ``node`` of its cluster sees it."""
    out = rabbitmqctl(node.node, "list_queues", "name", "leader", "--formatter", "json")
    rows = json.loads(out[out.index("["):])  # after any banner line
    return next(str(row["leader"]) for row in rows if row["name"] == queue)


class Sentinels(PrivateService):
    """scripts/stack's Redis Sentinel set of a test's own: a master, a replica and three
    Sentinels watching it as ``ingestd``."""

    MASTER = "ingestd"

    def __init__(self, **env: str) -> None:
        super().__init__("sentinel", **env)

    @property
    def url(self) -> str:
        return stack.sentinel_url(self.ports["SENTINEL_PORTS"])

    def master(self) -> int | None:
        """The port of the master, as the Sentinels name it; None while they name none."""
        try:
            master, _ = stack.sentinel_nodes(self.ports["SENTINEL_PORTS"], self.MASTER)
        except MasterNotFoundError:
            return None
        return int(master.connection_pool.connection_kwargs["port"])

    def kill_master(self) -> int:
        """SIGKILL the master; its port."""
        port = self.master()
        assert port is not None, "no Sentinel names a master"
        self.kill(int((self.directory / "sentinel" / f"redis-{port}.pid").read_text()))
        return port


class KafkaCluster(PrivateService):
    """scripts/stack's Kafka as a cluster of ``size`` KRaft nodes of a test's own (each a
    broker and a controller; topics replicated 3 times, min.insync.replicas=2), whose
    nodes it may kill and restart."""

    def __init__(self, size: int) -> None:
        super().__init__("kafka", (("KAFKA_PORTS", size), ("KAFKA_CONTROLLER_PORTS", size)))
        self.size = size

    @property
    def address(self) -> str:
        """The bootstrap servers: every node."""
        return ",".join(f"127.0.0.1:{port}" for port in self.ports["KAFKA_PORTS"])

    def node_pid(self, node: int) -> int:
        folder = "kafka" if node == 1 else f"kafka-{node}"
        return int((self.directory / folder / "kafka.pid").read_text())

    def leaders(self, topic: str) -> dict[int, int]:
        """Each partition's leader (a node id) as the cluster says now."""
        meta = stack.admin(self.address).list_topics(topic, timeout=10).topics[topic]
        return {p: m.leader for p, m in meta.partitions.items()}

    def coordinator(self, group: str) -> int:
        """The node of the group's coordinator."""
        future = stack.admin(self.address).describe_consumer_groups([group])[group]
        return int(future.result(timeout=30).coordinator.id)

    def in_sync(self) -> bool:
        """Whether every partition of every topic has all its replicas in sync: a node that
        came back has caught up."""
        try:
            topics = stack.admin(self.address).list_topics(timeout=10).topics.values()
        except KafkaException:
            return False
        return all(len(p.isrs) == len(p.replicas) for t in topics for p in t.partitions.values())


PORTS = {"kafka": (("KAFKA_PORT", 1), ("KAFKA_CONTROLLER_PORT", 1)),
         "rabbitmq": (("RABBITMQ_PORT", 1), ("RABBITMQ_DIST_PORT", 1)),
         "sentinel": (("SENTINEL_PORTS", 3), ("SENTINEL_REDIS_PORTS", 2)),
         "registry": (("REGISTRY_PORT", 1),)}


def private_service(service: str, **env: str) -> contextlib.AbstractContextManager[PrivateService]:
    """A service of ``scripts/stack`` of the caller's own, up until the block ends; ``env``
    configures it (``KAFKA_AUTO_CREATE_TOPICS``, say)."""
    return running(PrivateService(service, **env))


def kafka_cluster(size: int = 3) -> contextlib.AbstractContextManager[KafkaCluster]:
    """A Kafka cluster of the caller's own (scripts/stack up kafka, on ``size`` nodes)."""
    return running(KafkaCluster(size))


def private_sentinels() -> contextlib.AbstractContextManager[Sentinels]:
    """A Redis Sentinel set of the caller's own (scripts/stack up sentinel)."""
    return running(Sentinels())


Service = TypeVar("Service", bound=PrivateService)


@contextlib.contextmanager
def running(private: Service) -> Iterator[Service]:
    """``private`` up until the block ends, then stopped and removed."""
    try:
        private.up()
        yield private
    finally:
        if private.service == "kafka":
            stack.forget_admin(private.address)
        private.remove()
