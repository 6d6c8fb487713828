"""Routes end to end: two topics, two tasks, two queues, a real ``celery worker``.

Each topic's records must reach its own queue as its own task, run there as
that task, and be committed; the metrics count them under that task.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from confluent_kafka import KafkaException

from ingestd.celery import reference_tasks
from tests import stack
from tests.test_cli import run_cli, sample, scrape

N = 300  # records per topic
PARTITIONS = 2


def _topics(topic_factory: Callable[..., str]) -> tuple[str, str]:
    a, b = topic_factory(partitions=PARTITIONS), topic_factory(partitions=PARTITIONS)
    for topic, base in ((a, 0), (b, N)):
        stack.produce(topic, (stack.signal_record(base + i) for i in range(N)))
    return a, b


def _committed(group: str, topics: tuple[str, ...]) -> bool:
    """Every record of the topics committed (False while the coordinator is still loading)."""
    try:
        return all(stack.committed_offsets(group, t, PARTITIONS) ==
                   stack.end_offsets(t, PARTITIONS) for t in topics)
    except KafkaException:
        return False


def _record_ids(topic: str) -> set[str]:
    return {f"{topic}-{p}-{o}" for p, end in stack.end_offsets(topic, PARTITIONS).items()
            for o in range(end)}


def _run(topics: tuple[str, str], routes: dict[str, tuple[str, str]], broker_url: str,
         results_url: str, mode: str, queues: str) -> dict[str, str]:
    """ingestd and a celery worker on both queues until every record ran; the record ids
    and the name of the task that ran each, as the reference tasks recorded them."""
    port = stack.free_port()
    g = stack.group()
    args = stack.ingestd_args(topics[0], g, broker_url, "--topic", topics[1], "--dispatch", mode,
                              "--metrics-addr", f"127.0.0.1:{port}",
                              *(a for t, (task, q) in routes.items()
                                for a in ("--route", f"{t}={task}@{q}")))
    results = redis.Redis.from_url(results_url)
    with stack.Ingestd(*args) as ingestd, \
            stack.celery_worker(broker_url, queue=queues,
                                env={"INGESTD_RESULTS_URL": results_url}):
        assert stack.wait_until(
            lambda: results.hlen(reference_tasks.TASKS_KEY) >= 2 * N, 120), ingestd.output()
        metrics = scrape(f"http://127.0.0.1:{port}")
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()
    for topic, (task, _) in routes.items():
        assert sample(metrics, "ingestd_messages_dispatched_total", topic=topic, task=task) == N
        assert stack.committed_offsets(g, topic, PARTITIONS) == stack.end_offsets(topic,
                                                                                 PARTITIONS)
    assert int(results.get(reference_tasks.EXECUTED_KEY) or 0) == 2 * N  # nothing twice
    return {k.decode(): v.decode() for k, v in results.hgetall(reference_tasks.TASKS_KEY).items()}


def _assert_routed(ran: dict[str, str], routes: dict[str, tuple[str, str]]) -> None:
    expected = {rid: task for topic, (task, _) in routes.items() for rid in _record_ids(topic)}
    assert ran == expected


@pytest.mark.parametrize("mode", ["each", "batch"])
def test_two_topics_run_as_two_tasks_from_two_queues_on_redis(
        topic_factory: Callable[..., str], broker_url: str, mode: str) -> None:
    a, b = _topics(topic_factory)
    suffix = "" if mode == "each" else "s"
    routes = {a: (f"ingest_and_score_signal{suffix}", "scores"),
              b: (f"archive_signal{suffix}", "archive")}
    # First without a celery worker: each queue holds its own topic's tasks, nothing else.
    g = stack.group()
    args = stack.ingestd_args(a, g, broker_url, "--topic", b, "--dispatch", mode,
                              *(x for t, (task, q) in routes.items()
                                for x in ("--route", f"{t}={task}@{q}")))
    client = redis.Redis.from_url(broker_url)
    with stack.Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: _committed(g, (a, b)), 90), ingestd.output()
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()
    for topic, (task, queue) in routes.items():
        queued = stack.queued_tasks(broker_url, queue)
        assert {t["task"] for t in queued} == {task}
        ids = ([t["id"] for t in queued] if mode == "each"
               else [i for t in queued for i in t["ingestd_record_ids"]])
        assert sorted(ids) == sorted(_record_ids(topic))
    assert client.llen("celery") == 0
    client.flushdb()
    # Then with one: every record runs once, as its topic's task.
    ran = _run((a, b), routes, broker_url, broker_url, mode, "scores,archive")
    _assert_routed(ran, routes)


@pytest.mark.amqp
def test_two_topics_run_as_two_tasks_from_two_queues_on_amqp(
        topic_factory: Callable[..., str], redis_db: int, amqp_queues: tuple[str, str]) -> None:
    a, b = _topics(topic_factory)
    routes = {a: ("ingest_and_score_signal", amqp_queues[0]),
              b: ("archive_signal", amqp_queues[1])}
    ran = _run((a, b), routes, stack.RABBITMQ_URL, stack.redis_url(redis_db), "each",
               ",".join(amqp_queues))
    _assert_routed(ran, routes)


@pytest.fixture
def amqp_queues() -> Iterator[tuple[str, str]]:
    """Two queue names of the test's own on RabbitMQ, deleted afterwards."""
    names = (f"q-scores-{uuid.uuid4().hex[:8]}", f"q-archive-{uuid.uuid4().hex[:8]}")
    yield names
    for name in names:
        stack.amqp_delete(name)


def test_check_shows_every_route_and_each_queue(topic_factory: Callable[..., str],
                                                broker_url: str) -> None:
    a, b, c = (topic_factory(partitions=1) for _ in range(3))
    redis.Redis.from_url(broker_url).lpush("archive", b"x")
    result = run_cli("--check", "--topic", a, "--topic", b, "--topic", c, "--bootstrap-servers",
                     stack.BOOTSTRAP, "--broker-url", broker_url, "--queue", "default-q",
                     "--route", f"{a}=ingest_and_score_signal@scores",
                     "--route", f"{b}=archive_signal@archive")
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    for line in (f"  route {a} -> task ingest_and_score_signal on queue scores",
                 f"  route {b} -> task archive_signal on queue archive",
                 f"  route {c} -> task ingest_and_score_signal on queue default-q",
                 *(f"celery broker {broker_url}: reachable, queue {q} holds {n} messages"
                   for q, n in (("scores", 0), ("archive", 1), ("default-q", 0)))):
        assert line in lines, result.stdout
    assert lines[-1] == "check: ok"
