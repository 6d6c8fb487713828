"""The local stack is real: Kafka with consumer groups, Redis, and a Celery worker."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import redis
from celery import Celery
from confluent_kafka import Consumer

from ingestd.celery import reference_tasks
from tests import stack


def test_kafka_topic_produce_consume_commit(topic_factory: Callable[..., str]) -> None:
    topic = topic_factory(partitions=2)
    stack.produce(topic, (f"r{i}".encode() for i in range(20)), partition=0)
    group = f"g-{uuid.uuid4().hex[:8]}"
    consumer = Consumer({"bootstrap.servers": stack.BOOTSTRAP, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    seen: list[bytes] = []
    try:
        assert stack.wait_until(lambda: seen.extend(
            m.value() for m in consumer.consume(100, 0.5) if m.error() is None) or len(seen) >= 20)
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    assert seen == [f"r{i}".encode() for i in range(20)]
    assert stack.committed_offsets(group, topic, 2)[0] == 20


def test_send_task_runs_on_real_celery_worker(broker_url: str) -> None:
    app = Celery("sender", broker=broker_url)
    results = redis.Redis.from_url(broker_url)
    with stack.celery_worker(broker_url):
        for i in range(5):
            app.send_task("ingest_and_score_signal", args=[{"name": "n", "value": float(i),
                                                            "source": "s", "timestamp": 1}],
                          task_id=f"stack-test-{i}")
        app.send_task("ingest_and_score_signals", args=[[{"name": "n", "value": 1.0,
                                                          "source": "s", "timestamp": 1}]],
                      task_id="stack-batch")
        assert stack.wait_until(lambda: results.hlen(reference_tasks.SCORES_KEY) == 6)
    scores = results.hgetall(reference_tasks.SCORES_KEY)
    assert set(scores) == {f"stack-test-{i}".encode() for i in range(5)} | {b"stack-batch/0"}
    assert int(results.get(reference_tasks.EXECUTED_KEY) or 0) == 6


def test_running_stats_z_score() -> None:
    stats = reference_tasks.RunningStats()
    assert [stats.add(x) for x in (1.0, 1.0)] == [0.0, 0.0]
    stats.add(3.0)
    assert stats.add(10.0) > 2.0
