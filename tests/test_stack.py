"""The local stack is real: Kafka with consumer groups, Redis, and a Celery worker."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

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


def test_a_kafka_folder_formatted_by_another_release_is_refused(tmp_path: Path) -> None:
    """Storage keeps the features of the release that formatted it (share groups came
    with 4.2): scripts/stack says so in one line instead of starting it."""
    data = tmp_path / "kafka" / "data"
    data.mkdir(parents=True)
    (data / "meta.properties").write_text("cluster.id=x\n")
    (tmp_path / "kafka" / "kafka-version").write_text("4.1.1\n")
    env = {**os.environ, "INGESTD_STACK_DIR": str(tmp_path),
           "KAFKA_PORT": str(stack.free_port()), "KAFKA_CONTROLLER_PORT": str(stack.free_port())}
    done = subprocess.run([str(stack.REPO / "scripts" / "stack"), "up", "kafka"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert "holds a Kafka formatted by 4.1.1, not 4." in done.stderr, done.stderr
    assert "remove" in done.stderr.splitlines()[-1]


def test_share_groups_are_on(topic_factory: Callable[..., str]) -> None:
    """Kafka 4.2's share groups (KIP-932): confluent-kafka's preview ShareConsumer gets
    every record of a topic, each delivered once, and acknowledges it explicitly."""
    from confluent_kafka import AcknowledgeType, ShareConsumer
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    topic = topic_factory(partitions=2)
    group = f"share-{uuid.uuid4().hex[:8]}"
    # A share group starts at the end of each partition unless told otherwise.
    earliest = ConfigResource(ConfigResource.Type.GROUP, group, incremental_configs=[
        ConfigEntry("share.auto.offset.reset", "earliest",
                    incremental_operation=AlterConfigOpType.SET)])
    stack.admin().incremental_alter_configs([earliest])[earliest].result(30)
    stack.produce(topic, [b"r%d" % i for i in range(10)])
    consumer = ShareConsumer({"bootstrap.servers": stack.BOOTSTRAP, "group.id": group,
                              "share.acknowledgement.mode": "explicit"})
    got: list[tuple[bytes, int]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(got) < 10 and time.monotonic() < deadline:
            for msg in consumer.poll(1.0).records():
                assert msg.error() is None, msg.error()
                got.append((msg.value(), msg.delivery_count()))
                consumer.acknowledge(msg, AcknowledgeType.ACCEPT)
        consumer.commit_sync(30)
    finally:
        consumer.close()
    assert sorted(got) == sorted((b"r%d" % i, 1) for i in range(10))
