from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import KafkaException

from tests import stack


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

    def make(partitions: int = 1, prefix: str = "t") -> str:
        name = stack.create_topic(partitions, prefix)
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
