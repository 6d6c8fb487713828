"""The worker end to end: real Kafka, real Redis, a real ``celery worker``."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import redis
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from ingestd import dlq
from ingestd.celery import reference_tasks
from tests import stack

INVALID = {
    b"\xff\xfe not utf-8": "decode",
    b'{"name": "x", "value": 1,': "decode",
    b"": "decode",
    b'{"name":"n","value":NaN,"source":"s","timestamp":1}': "decode",
    b"[" * 10_000 + b"]" * 10_000: "too_large",  # 19,999 items
    b'[{"name": "n"}]': "not_object",
    b'"just a string"': "not_object",
    b"null": "not_object",
    b'{"name": "", "value": 1, "source": "s", "timestamp": 1}': "schema",
    b'{"name": "n", "value": true, "source": "s", "timestamp": 1}': "schema",
    b'{"name": "n", "value": 1, "source": "s"}': "schema",
    b'{"name": "n", "value": 1, "source": "s", "timestamp": 1, "pad": "' + b"x" * 40_000 + b'"}':
        "too_large",
}



def wait_queue(broker_url: str, n: int, timeout: float = 90) -> int:
    client = redis.Redis.from_url(broker_url)
    assert stack.wait_until(lambda: client.llen("celery") >= n, timeout), client.llen("celery")
    return int(client.llen("celery"))


def test_valid_records_become_one_task_each_and_run(topic_factory: Callable[..., str],
                                                    broker_url: str) -> None:
    topic = topic_factory(partitions=4)
    n = 3000
    records = [stack.signal_record(i, extra_field={"kept": [1, 2]}) for i in range(n)]
    stack.produce(topic, records, keys=(str(i).encode() for i in range(n)))
    g = stack.group()
    with stack.Ingestd(*stack.ingestd_args(topic, g, broker_url)) as ingestd:
        wait_queue(broker_url, n)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()
    tasks = stack.queued_tasks(broker_url)
    assert len(tasks) == n
    by_id = {t["id"]: t for t in tasks}
    assert len(by_id) == n
    produced = {orjson.loads(r)["timestamp"]: orjson.loads(r) for r in records}
    for task_id, task in by_id.items():
        t, partition, offset = task_id.rsplit("-", 2)
        assert t == topic and int(offset) >= 0 and 0 <= int(partition) < 4
        assert task["task"] == "ingest_and_score_signal"
        assert task["kwargs"] == {}
        (signal_obj,) = task["args"]
        assert signal_obj == produced[signal_obj["timestamp"]]  # unknown fields kept
    assert stack.committed_offsets(g, topic, 4) == stack.end_offsets(topic, 4)

    with stack.celery_worker(broker_url):
        results = redis.Redis.from_url(broker_url)
        assert stack.wait_until(lambda: results.hlen(reference_tasks.SCORES_KEY) >= n, 120)
    assert {k.decode() for k in results.hkeys(reference_tasks.SCORES_KEY)} == set(by_id)
    assert int(results.get(reference_tasks.EXECUTED_KEY) or 0) == n


def test_invalid_records_are_dead_lettered_with_headers(topic_factory: Callable[..., str],
                                                        broker_url: str) -> None:
    topic = topic_factory(partitions=1)
    topic_factory_dlq = f"{topic}.dlq"
    values: list[bytes | None] = [stack.signal_record(0), *INVALID, None, stack.signal_record(1)]
    stack.produce(topic, values, partition=0, keys=(f"k{i}".encode() for i in range(len(values))),
                  headers=([("trace", f"t{i}".encode()), ("ingestd.error", b"spoofed"),
                            ("trace", b"again")] for i in range(len(values))))
    g = stack.group()
    with stack.Ingestd(*stack.ingestd_args(topic, g, broker_url, "--max-record-bytes", "30000")) \
            as ingestd:
        wait_queue(broker_url, 2)
        letters = stack.consume_all(topic_factory_dlq, len(INVALID) + 1)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    try:
        assert len(letters) == len(INVALID) + 1
        expected = [*INVALID.items(), (None, "decode")]
        for i, (msg, (value, reason)) in enumerate(zip(letters, expected, strict=True)):
            headers = {k: v.decode() for k, v in msg.headers()}
            # The record's own headers first, in order (less any that claim to be
            # ingestd's), then ingestd's in a fixed order.
            assert [k for k, _ in msg.headers()] == ["trace", "trace", *dlq.HEADERS[:7]]
            assert msg.headers()[:2] == [("trace", f"t{i + 1}".encode()), ("trace", b"again")]
            assert headers["ingestd.source.group"] == g
            assert msg.value() == value
            assert msg.key() == f"k{i + 1}".encode()
            assert headers["ingestd.error"] == reason, headers
            assert 0 < len(headers["ingestd.error.detail"]) <= 1024
            assert headers["ingestd.source.topic"] == topic
            assert headers["ingestd.source.partition"] == "0"
            assert headers["ingestd.source.offset"] == str(i + 1)
            assert int(headers["ingestd.source.timestamp"]) > 0
        assert sorted(t["id"] for t in stack.queued_tasks(broker_url)) == \
            sorted([f"{topic}-0-0", f"{topic}-0-{len(values) - 1}"])
        assert stack.committed_offsets(g, topic, 1) == {0: len(values)}
    finally:
        stack.delete_topic(topic_factory_dlq)


def test_no_dead_letter_topic_counts_and_skips(topic_factory: Callable[..., str],
                                               broker_url: str) -> None:
    topic = topic_factory(partitions=1)
    stack.produce(topic, [b"bad", stack.signal_record(1)], partition=0)
    g = stack.group()
    with stack.Ingestd(*stack.ingestd_args(topic, g, broker_url, "--dlq-topic", "")) as ingestd:
        wait_queue(broker_url, 1)
        assert stack.wait_until(lambda: stack.committed_offsets(g, topic, 1) == {0: 2}, 30)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    assert "invalid record" in ingestd.output()
    assert "bad" not in ingestd.output().split("invalid record", 1)[1].split("\n", 1)[0][-5:]


def test_batch_dispatch_sends_one_task_per_partition_slice(topic_factory: Callable[..., str],
                                                           broker_url: str) -> None:
    topic = topic_factory(partitions=2)
    n = 500
    stack.produce(topic, (stack.signal_record(i) for i in range(n)))
    g = stack.group()
    with stack.Ingestd(*stack.ingestd_args(topic, g, broker_url, "--dispatch", "batch")) \
            as ingestd:
        client = redis.Redis.from_url(broker_url)
        assert stack.wait_until(lambda: sum(len(t["args"][0]) for t in
                                            stack.queued_tasks(broker_url)) >= n, 60)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    tasks = stack.queued_tasks(broker_url)
    assert all(t["task"] == "ingest_and_score_signals" for t in tasks)
    assert sum(len(t["args"][0]) for t in tasks) == n
    record_ids = []
    for t in tasks:
        _, partition, first, last = t["id"].rsplit("-", 3)
        assert int(last) - int(first) + 1 == len(t["args"][0])
        # each record's own id, aligned with the signals: what a repeat keeps
        assert t["ingestd_record_ids"] == [f"{topic}-{partition}-{o}"
                                           for o in range(int(first), int(last) + 1)]
        record_ids += t["ingestd_record_ids"]
    assert sorted(record_ids) == sorted(f"{topic}-{p}-{o}" for p, end in
                                        stack.end_offsets(topic, 2).items() for o in range(end))
    with stack.celery_worker(broker_url):
        assert stack.wait_until(lambda: client.hlen(reference_tasks.SCORES_KEY) >= n, 60)


def test_sigkill_mid_stream_then_restart_loses_nothing(topic_factory: Callable[..., str],
                                                       broker_url: str) -> None:
    topic = topic_factory(partitions=4)
    n, batch = 60_000, 500
    stack.produce(topic, (stack.signal_record(i) for i in range(n)))
    g = stack.group()
    args = stack.ingestd_args(topic, g, broker_url, "--batch-size", str(batch))
    with stack.Ingestd(*args) as ingestd:
        client = redis.Redis.from_url(broker_url)
        assert stack.wait_until(lambda: client.llen("celery") >= 5000, 60)
        for pid in ingestd.worker_pids():
            subprocess.run(["kill", "-9", str(pid)], check=True)
        ingestd.signal(signal.SIGKILL)
        ingestd.wait(10)
    with stack.Ingestd(*args) as again:
        ids = wait_ids(broker_url, topic, n)
        again.signal(signal.SIGTERM)
        assert again.wait(60) == 0
    counts = collections.Counter(stack_ids(broker_url))
    assert set(counts) == ids
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= batch, duplicates


def stack_ids(broker_url: str) -> list[str]:
    return [t["id"] for t in stack.queued_tasks(broker_url)]


def wait_ids(broker_url: str, topic: str, n: int, timeout: float = 120,
             partitions: int = 4) -> set[str]:
    expected = {f"{topic}-{p}-{o}" for p, end in stack.end_offsets(topic, partitions).items()
                for o in range(end)}
    assert len(expected) == n
    assert stack.wait_until(lambda: set(stack_ids(broker_url)) >= expected, timeout, 0.5)
    return expected


def test_redis_outage_mid_stream_loses_nothing(
        topic_factory: Callable[..., str],
        private_redis: tuple[str, Callable[[], None], Callable[[], None]]) -> None:
    url, stop_redis, start_redis = private_redis
    topic = topic_factory(partitions=4)
    n = 40_000
    stack.produce(topic, (stack.signal_record(i) for i in range(n)))
    g = stack.group()
    args = stack.ingestd_args(topic, g, url, "--batch-size", "200", "--retry-max-backoff", "1")
    with stack.Ingestd(*args) as ingestd:
        client = redis.Redis.from_url(url)
        assert stack.wait_until(lambda: client.llen("celery") >= 2000, 60)
        stop_redis()
        time.sleep(4)
        start_redis()
        ids = wait_ids(url, topic, n)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    assert "retrying" in ingestd.output()
    assert set(stack_ids(url)) == ids
    assert stack.committed_offsets(g, topic, 4) == stack.end_offsets(topic, 4)


@pytest.mark.amqp
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_amqp_broker_tasks_run_on_celery(topic_factory: Callable[..., str], redis_db: int,
                                         queue_type: str) -> None:
    """Quorum: a stock celery worker set up for quorum queues as Celery documents it
    (``tests/quorum_celeryconfig.py``) and ``--queue-type quorum`` declare the same
    queue; it is a quorum queue on the broker."""
    topic = topic_factory(partitions=2)
    n = 1000
    stack.produce(topic, (stack.signal_record(i) for i in range(n)))
    queue = f"q-{uuid.uuid4().hex[:8]}"
    results_url = stack.redis_url(redis_db)
    args = stack.ingestd_args(topic, stack.group(), stack.RABBITMQ_URL, "--queue", queue,
                              "--queue-type", queue_type)
    env = {"INGESTD_RESULTS_URL": results_url}
    if queue_type == "quorum":
        env["CELERY_CONFIG_MODULE"] = "tests.quorum_celeryconfig"
    try:
        with stack.Ingestd(*args) as ingestd, \
                stack.celery_worker(stack.RABBITMQ_URL, queue=queue, env=env):
            results = redis.Redis.from_url(results_url)
            assert stack.wait_until(lambda: results.hlen(reference_tasks.SCORES_KEY) >= n, 120)
            ingestd.signal(signal.SIGTERM)
            assert ingestd.wait(60) == 0
        assert stack.amqp_queue_type(queue) == queue_type
    finally:
        stack.amqp_delete(queue)
    ids = {k.decode() for k in results.hkeys(reference_tasks.SCORES_KEY)}
    assert ids == {f"{topic}-{p}-{o}" for p, end in stack.end_offsets(topic, 2).items()
                   for o in range(end)}


@pytest.mark.sentinel
def test_redis_sentinel_tasks_run_on_celery(topic_factory: Callable[..., str],
                                            redis_db: int) -> None:
    """ingestd and a stock celery worker set up for Sentinel as Celery documents it
    (``tests/sentinel_celeryconfig.py``), both given the stack's Sentinels: every record
    runs; ``--check`` reaches the master they name and counts its replicas."""
    topic = topic_factory(partitions=2)
    n = 1000
    stack.produce(topic, (stack.signal_record(i) for i in range(n)))
    queue = f"q-{uuid.uuid4().hex[:8]}"
    results_url = stack.redis_url(redis_db)
    sentinel = ("--broker-master-name", stack.SENTINEL_MASTER, "--broker-min-replicas", "1",
                "--queue", queue)
    args = stack.ingestd_args(topic, stack.group(), stack.sentinel_url(), *sentinel)
    check = subprocess.run([sys.executable, "-m", "ingestd", "--check", *args],
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"queue {queue} holds 0 messages" in check.stdout
    assert "the master has 1 replicas connected" in check.stdout
    env = {"INGESTD_RESULTS_URL": results_url,
           "CELERY_CONFIG_MODULE": "tests.sentinel_celeryconfig"}
    try:
        with stack.Ingestd(*args) as ingestd, \
                stack.celery_worker(stack.sentinel_url(), queue=queue, env=env):
            results = redis.Redis.from_url(results_url)
            assert stack.wait_until(lambda: results.hlen(reference_tasks.SCORES_KEY) >= n, 120)
            ingestd.signal(signal.SIGTERM)
            assert ingestd.wait(60) == 0
    finally:
        stack.sentinel_nodes()[0].delete(queue)
    ids = {k.decode() for k in results.hkeys(reference_tasks.SCORES_KEY)}
    assert ids == {f"{topic}-{p}-{o}" for p, end in stack.end_offsets(topic, 2).items()
                   for o in range(end)}


def test_librdkafka_keeps_a_partition_paused_across_unassign_and_assign(
        topic_factory: Callable[..., str]) -> None:
    """Why a worker resumes each partition it is assigned unless it pauses it: librdkafka
    resets only its own pause flag on an assign, not the application's."""
    topic = topic_factory(partitions=1)
    stack.produce(topic, (stack.signal_record(i) for i in range(10)))
    consumer = Consumer({"bootstrap.servers": stack.BOOTSTRAP, "group.id": stack.group(),
                         "enable.auto.commit": False})
    tps = [TopicPartition(topic, 0, 0)]
    try:
        consumer.incremental_assign(tps)
        consumer.pause(tps)
        assert consumer.consume(10, 0.5) == []  # served: the pause took effect
        consumer.incremental_unassign(tps)
        consumer.consume(10, 0.5)
        consumer.incremental_assign(tps)
        assert consumer.consume(10, 3) == []
        consumer.resume(tps)
        got: list[Message] = []

        def all_ten() -> bool:
            got.extend(consumer.consume(10, 0.5))
            return len(got) >= 10

        assert stack.wait_until(all_ten, 30)
    finally:
        consumer.close()


def test_backpressure_pauses_above_max_queue_depth(topic_factory: Callable[..., str],
                                                   broker_url: str) -> None:
    topic = topic_factory(partitions=1)
    stack.produce(topic, (stack.signal_record(i) for i in range(5000)), partition=0)
    args = stack.ingestd_args(topic, stack.group(), broker_url, "--max-queue-depth", "1000",
                              "--batch-size", "100")
    client = redis.Redis.from_url(broker_url)
    with stack.Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: client.llen("celery") >= 1000, 60)
        time.sleep(2)
        held = client.llen("celery")
        assert 1000 <= held <= 1000 + 100, held  # at most one batch over
        client.ltrim("celery", 0, 99)  # a consumer drained the queue below 80%
        assert stack.wait_until(lambda: client.llen("celery") >= 1000, 60)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    assert "pausing" in ingestd.output() and "resuming" in ingestd.output()


def _pid_listening(port: int) -> int:
    """The pid of the redis-server of a private Redis, found by its port (redis-server
    shows itself as ``redis-server 127.0.0.1:<port>``)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"redis-server") and f":{port}".encode() in cmd:
                return int(entry.name)
    raise LookupError(port)


def test_a_stalled_broker_is_waited_for_not_killed_as_stuck(
        topic_factory: Callable[..., str],
        private_redis: tuple[str, Callable[[], None], Callable[[], None]]) -> None:
    """Redis stops answering (SIGSTOP) for longer than --worker-timeout: the worker keeps
    beating while it waits, /readyz says what it waits for, and nothing is lost."""
    url = private_redis[0]
    redis_pid = _pid_listening(int(url.rsplit(":", 1)[1].split("/")[0]))
    topic = topic_factory(partitions=4)
    n = 20_000
    stack.produce(topic, (stack.signal_record(i) for i in range(n)))
    g, port = stack.group(), stack.free_port()
    args = stack.ingestd_args(topic, g, url, "--batch-size", "200", "--worker-timeout", "5",
                              "--retry-max-backoff", "1")
    args[args.index("--metrics-addr") + 1] = f"127.0.0.1:{port}"
    reasons: list[str] = []

    def unready() -> bool:
        code, body = stack.http_get(f"http://127.0.0.1:{port}/readyz")
        if code == 503:
            reasons.extend(orjson.loads(body)["workers"].values())
        return code == 503

    with stack.Ingestd(*args) as ingestd:
        client = redis.Redis.from_url(url)
        assert stack.wait_until(lambda: client.llen("celery") >= 2000, 60)
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            assert stack.wait_until(unready, 10)
            time.sleep(12)
            unready()
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        ids = wait_ids(url, topic, n)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    assert "stuck" not in ingestd.output(), ingestd.output()[-3000:]
    assert any("broker" in reason for reason in reasons), reasons
    assert set(stack_ids(url)) == ids
    assert stack.committed_offsets(g, topic, 4) == stack.end_offsets(topic, 4)


def test_a_fenced_worker_exits_and_its_successor_rejoins(topic_factory: Callable[..., str],
                                                         broker_url: str) -> None:
    """Another consumer takes the worker's static member id: Kafka fences the worker with a
    fatal error, which must end it within seconds so that a fresh worker rejoins."""
    topic = topic_factory(partitions=2)
    stack.produce(topic, (stack.signal_record(i) for i in range(1000)))
    g, tag = stack.group(), f"fence-{uuid.uuid4().hex[:6]}"
    args = stack.ingestd_args(topic, g, broker_url, "--instance-id", tag)
    with stack.Ingestd(*args) as ingestd:
        wait_ids(broker_url, topic, 1000, partitions=2)
        (first,) = ingestd.worker_pids()
        rogue = Consumer({"bootstrap.servers": stack.BOOTSTRAP, "group.id": g,
                          "group.instance.id": f"{tag}-0",
                          "partition.assignment.strategy": "cooperative-sticky"})
        rogue.subscribe([topic])
        try:
            assert stack.wait_until(lambda: rogue.poll(0.2) is None and
                                    "fatal Kafka error" in ingestd.output(), 60)
        finally:
            rogue.close()
        assert stack.wait_until(lambda: len(ingestd.worker_pids()) == 1
                                and first not in ingestd.worker_pids(), 30)
        stack.produce(topic, (stack.signal_record(i) for i in range(1000, 2000)))
        wait_ids(broker_url, topic, 2000, partitions=2)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    assert f"(pid {first}) died (exit code 1)" in ingestd.output()


def test_a_worker_killed_as_stuck_prints_every_thread(topic_factory: Callable[..., str],
                                                      broker_url: str) -> None:
    """The supervisor SIGABRTs a stuck worker; the log then holds each thread's stack."""
    topic = topic_factory(partitions=1)
    with stack.Ingestd(*stack.ingestd_args(topic, stack.group(), broker_url)) as ingestd:
        assert stack.wait_until(lambda: "assigned" in ingestd.output(), 60)
        (pid,) = ingestd.worker_pids()
        os.kill(pid, signal.SIGABRT)
        assert stack.wait_until(lambda: "died (signal SIGABRT)" in ingestd.output(), 30)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    out = ingestd.output()
    assert "Current thread" in out and 'File "' in out and "worker/loop.py" in out, out[-3000:]


# --- building messages: one record's failure is its own ----------------------------


def test_a_record_that_fails_to_build_becomes_an_internal_dead_letter() -> None:
    """At the dispatcher's seam: ``prepare`` fails for any task holding record 2."""
    from confluent_kafka import Message

    from ingestd.celery.dispatch import Task, slice_task
    from ingestd.worker.pipeline import buildable

    topic = "t-x"
    records = [Message(topic=topic, partition=3, offset=o, key=b"k%d" % o, value=b"v%d" % o,
                       headers=[("h", b"%d" % o)], timestamp=(1, 1000 + o)) for o in range(4)]
    built: list[list[str]] = []

    def prepare(tasks: list[Task]) -> None:
        for t in tasks:
            if f"{topic}-3-2" in (t.ids or [t.task_id]):
                raise ValueError("cannot build record 2")
        built.append([t.task_id for t in tasks])

    each = [Task(f"{topic}-3-{o}", topic, [b"v%d" % o], [o]) for o in range(4)]
    kept, letters = buildable(prepare, each, records)
    assert [t.task_id for t in kept] == [f"{topic}-3-0", f"{topic}-3-1", f"{topic}-3-3"]
    (letter,) = letters
    assert (letter.offset, letter.reason, letter.detail) == (2, "internal",
                                                             "ValueError: cannot build record 2")
    assert (letter.key, letter.value, letter.headers, letter.timestamp) == \
        (b"k2", b"v2", [("h", b"2")], 1002)

    ids = [f"{topic}-3-{o}" for o in range(4)]
    whole = slice_task(topic, [b"v%d" % o for o in range(4)], list(range(4)), ids)
    assert whole.task_id == f"{topic}-3-0-3"
    kept, letters = buildable(prepare, [whole], records)
    (rebuilt,) = kept
    assert rebuilt.task_id == f"{topic}-3-0-3" and rebuilt.ids == [ids[0], ids[1], ids[3]]
    assert rebuilt.raws == [b"v0", b"v1", b"v3"] and rebuilt.objs == [0, 1, 3]
    assert [x.offset for x in letters] == [2]


# --- the batch bound: what a crash can repeat --------------------------------------


def test_a_batch_holds_at_most_batch_size_records_even_after_a_commit_wait() -> None:
    """A commit wait carries up to two batches; each batch handed on still holds at most
    ``--batch-size`` records, the bound on what a crash repeats."""
    from confluent_kafka import Message

    from ingestd.config import Config
    from ingestd.quarantine import Quarantine
    from ingestd.worker.feed import Feed

    class Fetcher:
        def __init__(self) -> None:
            self.asked: list[int] = []

        def consume(self, n: int, timeout: float) -> list[Message]:
            self.asked.append(n)
            return [Message(topic="t", partition=0, offset=100 + i, value=b"v")
                    for i in range(n)]

    fetcher = Fetcher()
    feed = Feed(fetcher, Config(batch_size=5), 5, Quarantine(()),  # type: ignore[arg-type]
                lambda: False, lambda: False)
    feed.keep([Message(topic="t", partition=0, offset=o, value=b"v") for o in range(12)])
    first, second, third = feed.next(), feed.next(), feed.next()
    assert [m.offset() for m in first] == [0, 1, 2, 3, 4]
    assert [m.offset() for m in second] == [5, 6, 7, 8, 9]
    assert [m.offset() for m in third] == [10, 11, 100, 101, 102]
    assert fetcher.asked == [3] and feed.carry == []


def test_records_carried_for_a_revoked_partition_are_dropped() -> None:
    """Were the partition given back, they would go out ahead of the records before them
    (fetched again from the committed offset) and their stored offset would pass those."""
    from types import SimpleNamespace

    from confluent_kafka import Message, TopicPartition

    from ingestd import metrics
    from ingestd.config import Config
    from ingestd.quarantine import Quarantine
    from ingestd.worker.feed import Feed
    from ingestd.worker.inflight import InFlight
    from ingestd.worker.loop import Worker
    from ingestd.worker.offsets import Offsets

    worker = Worker.__new__(Worker)
    worker.slot, worker.metrics = 0, metrics
    worker.inflight = InFlight()
    worker.offsets = Offsets(lambda: {("t", 0), ("t", 1)}, lambda err: None)
    worker.offsets.consumer = SimpleNamespace(store_offsets=lambda offsets: None,
                                              commit=lambda asynchronous: None)
    worker.offsets.store({("t", 0): 5, ("t", 1): 7}, records=6)
    worker.feed = Feed(None, Config(), 1000, Quarantine(()),  # type: ignore[arg-type]
                       lambda: False, lambda: False)
    worker.feed.keep([Message(topic="t", partition=p, offset=o, value=b"v")
                      for o in range(3) for p in (0, 1)])
    worker.revoking([TopicPartition("t", 0)])
    assert [(m.partition(), m.offset()) for m in worker.feed.carry] == [(1, 0), (1, 1), (1, 2)]
    assert worker.offsets.unconfirmed == {("t", 1): 7}
    worker.lost([TopicPartition("t", 1)])
    assert worker.feed.carry == [] and worker.offsets.unconfirmed == {}
    worker.inflight.close()


def test_a_refused_batch_retried_after_a_revoke_drops_the_revoked_partitions() -> None:
    """Its records, its letters still to send and its offsets: the new owner consumes
    them again from the committed offset. No connection: the AMQP dispatcher only builds."""
    from ingestd.celery import dispatch
    from ingestd.config import Config
    from ingestd.dlq import DeadLetter
    from ingestd.quarantine import Quarantine
    from ingestd.worker.pipeline import Batch, Pipeline

    config = Config(topic=("t",), broker_url="amqp://127.0.0.1:1//")
    pipeline = Pipeline(config, dispatch.create(config), Quarantine(()), lambda err: None)
    tasks = [dispatch.Task(f"t-{p}-{o}", "t", [b'{"a": 1}'], [{"a": 1}])
             for p in (0, 1) for o in range(3)]
    letters = [DeadLetter("t", p, 9, 0, None, b"x", "decode", "d") for p in (0, 1)]
    batch = Batch(tasks=tasks, letters=letters, offsets={("t", 0): 10, ("t", 1): 10},
                  messages=pipeline.dispatcher.prepare(tasks), unsent=letters[1:], revision=1)
    kept = pipeline.without(batch, {("t", 0)}, 2)
    assert [m.task.task_id for m in kept.messages] == ["t-0-0", "t-0-1", "t-0-2"]
    assert [t.task_id for t in kept.tasks] == ["t-0-0", "t-0-1", "t-0-2"]
    assert kept.letters == letters[:1] and kept.unsent == []
    assert kept.offsets == {("t", 0): 10} and kept.revision == 2
    pipeline.dispatcher.close()


@pytest.mark.parametrize("mode", ["each", "batch"])
def test_a_task_over_the_brokers_limit_is_split_or_dead_lettered(mode: str) -> None:
    """--max-task-bytes 60,000: a 70 KB record is too_large on its own; in batch mode the
    slice of the other records is split until each task fits."""
    from confluent_kafka import Message

    from ingestd.celery import dispatch
    from ingestd.config import Config
    from tests import seams

    config = Config(topic=("t",), broker_url="redis://127.0.0.1:1/0", dispatch=mode,
                    max_task_bytes=60_000)
    pipeline = seams.decoder(config, {("t", 0)}, dispatch.create(config))
    values = [stack.signal_record(i, pad="x" * (70_000 if i == 3 else 9_000))
              for i in range(8)]
    records = [Message(topic="t", partition=0, offset=o, value=v, key=b"k%d" % o,
                       timestamp=(1, 1)) for o, v in enumerate(values)]
    batch = pipeline.decode(records)
    pipeline.build(batch)
    (letter,) = batch.letters
    assert (letter.offset, letter.reason, letter.key) == (3, "too_large", b"k3")
    assert letter.detail.endswith("> 60000 (the Celery broker's limit, --max-task-bytes)")
    ids = [rid for t in batch.tasks for rid in (t.ids or [t.task_id])]
    assert ids == [f"t-0-{o}" for o in range(8) if o != 3]
    assert all(pipeline.dispatcher.task_size(t) <= 60_000 for t in batch.tasks)
    assert len(batch.tasks) == (7 if mode == "each" else 3)  # batch: [0, 1] [2] [4-7]


def test_celerys_own_environment_does_not_move_the_tasks(topic_factory: Callable[..., str],
                                                          broker_url: str) -> None:
    """CELERY_BROKER_URL and CELERY_BROKER_WRITE_URL win over an app's broker inside
    Celery, and CELERY_LOADER=default imports CELERY_CONFIG_MODULE: none of them changes
    where ingestd publishes, which --check shows with its source."""
    topic = topic_factory(partitions=1)
    stack.produce(topic, [stack.signal_record(i) for i in range(5)])
    celery_env = {"CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
                  "CELERY_BROKER_WRITE_URL": "redis://127.0.0.1:1/1",
                  "CELERY_LOADER": "default", "CELERY_CONFIG_MODULE": "no.such.module"}
    args = stack.ingestd_args(topic, stack.group(), broker_url)
    checked = subprocess.run([sys.executable, "-m", "ingestd", *args, "--check"],
                             capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, **celery_env}, cwd=stack.REPO)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "broker_url" in checked.stdout and f"'{broker_url}'  (flag)" in checked.stdout
    assert f"celery broker {broker_url}: reachable" in checked.stdout
    with stack.Ingestd(*args, env=celery_env) as ingestd:
        wait_queue(broker_url, 5)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()[-3000:]


def _metric_sum(port: int, name: str) -> float:
    _, body = stack.http_get(f"http://127.0.0.1:{port}/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith((f"{name} ", f"{name}{{")))


def test_commits_are_grouped_at_any_load(topic_factory: Callable[..., str],
                                         broker_url: str) -> None:
    """A steady trickle in batches of a few records: at most one commit per 20 ms. A
    backlog of full batches: about one commit a batch, the crash bound's."""
    topic = topic_factory(partitions=2)
    g, port = stack.group(), stack.free_port()
    args = stack.ingestd_args(topic, g, broker_url)
    args[args.index("--metrics-addr") + 1] = f"127.0.0.1:{port}"
    with stack.Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: "assigned" in ingestd.output(), 60)
        began, before = time.monotonic(), _metric_sum(port, "ingestd_commits_total")
        producer = Producer({"bootstrap.servers": stack.BOOTSTRAP, "linger.ms": 0})
        for i in range(4000):  # a record every 0.5 ms or so, each a request of its own
            producer.produce(topic, stack.signal_record(i), partition=i % 2)
            producer.poll(0)
            time.sleep(0.0005)
        assert producer.flush(30) == 0
        wait_queue(broker_url, 4000)
        commits = _metric_sum(port, "ingestd_commits_total") - before
        batches = _metric_sum(port, "ingestd_batch_size_count")
        assert commits <= (time.monotonic() - began) / 0.02 + 2, (commits, batches)
        assert batches >= 2 * commits, (commits, batches)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    backlog = topic_factory(partitions=1)
    stack.produce(backlog, [stack.signal_record(i) for i in range(20_000)], partition=0)
    args = stack.ingestd_args(backlog, stack.group(), broker_url, "--batch-size", "1000")
    args[args.index("--metrics-addr") + 1] = f"127.0.0.1:{port}"
    with stack.Ingestd(*args) as ingestd:
        wait_queue(broker_url, 24_000)
        batches = _metric_sum(port, "ingestd_batch_size_count")
        commits = _metric_sum(port, "ingestd_commits_total")
        assert batches >= 20 and commits <= batches + 2, (commits, batches)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
