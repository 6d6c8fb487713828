"""End to end, one worker: Kafka topic with a lag of N signals → tasks in a Redis queue.

Three pipelines drain the same preloaded 4-partition topic, each with a
consumer group and a Redis database of its own, in the same run:

- ``ingestd``: the real ``ingestd --workers 1`` process, until all N tasks are queued;
- ``baseline``: the old script's loop: one ``send_task`` per message after ``json.loads``
  (it reads only the first ``BASELINE_RECORDS``; the rate is what counts);
- ``raw pipe``: the same consume loop LPUSHing each record's bytes unchanged, one
  multi-value LPUSH per batch: no decoding, no Celery format.

Each reports ``signals_per_s`` in ``extra_info``; ingestd also reports its
worker's peak RSS. ``scripts/bench`` prints the table the README quotes.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from confluent_kafka import Consumer, TopicPartition

from ingestd import kafka
from ingestd.config import Config
from tests import stack

RECORDS = int(os.environ.get("INGESTD_BENCH_RECORDS", "200000"))
BASELINE_RECORDS = min(RECORDS, int(os.environ.get("INGESTD_BENCH_BASELINE_RECORDS", "20000")))
PARTITIONS = 4
TIMEOUT = 600.0

pytestmark = [pytest.mark.stack, pytest.mark.benchmark(group="end-to-end")]


@pytest.fixture(scope="module")
def lagging_topic() -> Iterator[str]:
    topic = stack.create_topic(PARTITIONS, prefix="bench")
    stack.produce(topic, (stack.signal_record(i) for i in range(RECORDS)))
    yield topic
    stack.delete_topic(topic)


@pytest.fixture
def queue_db() -> Iterator[tuple[str, redis.Redis]]:
    db = stack.fresh_redis_db()
    client = redis.Redis.from_url(stack.redis_url(db))
    yield stack.redis_url(db), client
    client.flushdb()
    stack.release_redis_db(db)


def _report(benchmark: Any, n: int, seconds: float, first_at: float, **extra: Any) -> None:
    """``signals_per_s`` over the whole run; ``steady_signals_per_s`` from the first record
    out to the last, leaving out process start and the group join."""
    steady = seconds - (first_at - _started[0])
    benchmark.extra_info.update(records=n, seconds=round(seconds, 3),
                                signals_per_s=round(n / seconds),
                                steady_signals_per_s=round(n / steady), **extra)


_started: list[float] = []


def _consumer(topic: str) -> Consumer:
    """The consumer ingestd itself would build, in a group of its own."""
    config = Config(topic=(topic,), bootstrap_servers=stack.BOOTSTRAP,
                    group_id=f"bench-{uuid.uuid4().hex[:8]}")
    consumer = Consumer(kafka.consumer_config(config, 0))
    consumer.subscribe([topic])
    return consumer


def _timed(benchmark: Any, run: Callable[[], int]) -> float:
    _started.clear()

    def once() -> None:
        _started.append(time.perf_counter())
        run()

    benchmark.pedantic(once, rounds=1, iterations=1)
    return time.perf_counter() - _started[0]


def _vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))
    return round(kb / 1024, 1)


@pytest.mark.parametrize("dispatch", ["each", "batch"])
def test_ingestd_one_worker(benchmark: Any, lagging_topic: str, dispatch: str,
                            queue_db: tuple[str, redis.Redis]) -> None:
    url, client = queue_db
    group = f"bench-{uuid.uuid4().hex[:8]}"
    args = stack.ingestd_args(lagging_topic, group, url, "--dispatch", dispatch)
    ingestd = stack.Ingestd(*args, env={"INGESTD_LOG_LEVEL": "WARNING"})
    offsets = Consumer({"bootstrap.servers": stack.BOOTSTRAP, "group.id": group})
    partitions = [TopicPartition(lagging_topic, p) for p in range(PARTITIONS)]
    peak: list[float] = []
    first: list[float] = []

    def done() -> int:
        """Signals accepted by Redis. In batch mode a task carries a partition slice of
        them, so count what the group committed: ingestd commits only what Redis took."""
        if dispatch == "each":
            return int(client.llen("celery"))
        return sum(max(tp.offset, 0) for tp in offsets.committed(partitions, timeout=10))

    def run() -> int:
        ingestd.start()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if not first and client.llen("celery"):
                first.append(time.perf_counter())
            if first and done() >= RECORDS:
                break
            pids = ingestd.worker_pids()
            if pids:
                peak.append(_vm_hwm_mb(pids[0]))
            time.sleep(0.02)
        return done()

    try:
        seconds = _timed(benchmark, run)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    finally:
        ingestd.stop()
        offsets.close()
    assert sum(len(t["args"][0]) if dispatch == "batch" else 1
               for t in stack.queued_tasks(url)) == RECORDS
    _report(benchmark, RECORDS, seconds, first[0], peak_rss_mb=max(peak, default=0.0),
            tasks=int(client.llen("celery")))


def test_baseline_send_task_per_message(benchmark: Any, lagging_topic: str,
                                        queue_db: tuple[str, redis.Redis]) -> None:
    url, client = queue_db
    app = Celery("old_script", broker=url)
    consumer = _consumer(lagging_topic)

    first: list[float] = []

    def run() -> int:
        done = 0
        while done < BASELINE_RECORDS:
            msg = consumer.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            if not first:
                first.append(time.perf_counter())
            app.send_task("ingest_and_score_signal", args=[json.loads(msg.value())])
            done += 1
        return done

    try:
        seconds = _timed(benchmark, run)
    finally:
        consumer.close()
    assert client.llen("celery") == BASELINE_RECORDS
    _report(benchmark, BASELINE_RECORDS, seconds, first[0])


def test_raw_pipe_lpush_bytes(benchmark: Any, lagging_topic: str,
                              queue_db: tuple[str, redis.Redis]) -> None:
    _url, client = queue_db
    consumer = _consumer(lagging_topic)

    first: list[float] = []

    def run() -> int:
        done = 0
        while done < RECORDS:
            values = [m.value() for m in consumer.consume(1000, 0.05) if m.error() is None]
            if values:
                if not first:
                    first.append(time.perf_counter())
                client.lpush("celery", *values)
                done += len(values)
        return done

    try:
        seconds = _timed(benchmark, run)
    finally:
        consumer.close()
    assert client.llen("celery") == RECORDS
    _report(benchmark, RECORDS, seconds, first[0])
