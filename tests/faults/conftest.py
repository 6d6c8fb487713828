from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from tests import stack
from tests.faults.harness import PARTITIONS, PrivateService, Run


@pytest.fixture
def make_run(topic_factory: Callable[..., str], redis_db: int) -> Iterator[Callable[..., Run]]:
    """Builds the scenario's run, with a real ``celery worker`` on its Celery broker (by
    default this test's Redis database; results always go there) unless ``celery`` is
    False (the test starts it later). Its ingestd processes, any worker they left behind,
    and the celery worker are stopped at the end."""
    with contextlib.ExitStack() as cleanup:
        def make(broker_url: str | None = None, bootstrap: str = stack.BOOTSTRAP,
                 celery: bool = True) -> Run:
            results = stack.redis_url(redis_db)
            if bootstrap == stack.BOOTSTRAP:
                topic, dlq = topic_factory(PARTITIONS), topic_factory(1, prefix="dlq")
            else:  # a private broker: its topics go with it
                topic = stack.create_topic(PARTITIONS, bootstrap=bootstrap)
                dlq = stack.create_topic(1, prefix="dlq", bootstrap=bootstrap)
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
    kafka = PrivateService("kafka", "KAFKA_PORT", "KAFKA_CONTROLLER_PORT")
    try:
        kafka.up()
        yield kafka
    finally:
        stack.forget_admin(kafka.address)
        kafka.remove()


@pytest.fixture
def private_rabbitmq() -> Iterator[PrivateService]:
    """A RabbitMQ of this test's own (scripts/stack up rabbitmq), that it may restart."""
    rabbitmq = PrivateService("rabbitmq", "RABBITMQ_PORT", "RABBITMQ_DIST_PORT")
    try:
        rabbitmq.up()
        yield rabbitmq
    finally:
        rabbitmq.remove()
