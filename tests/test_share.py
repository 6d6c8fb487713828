"""The share worker's own rules (``--group-type share``), at the seam and against the
real broker: which records go alone, in what order, and the group's terms. The
scenarios under load are in ``tests/faults/test_share.py``."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import AcknowledgeType
from confluent_kafka.admin import ConfigResource

from ingestd import config
from ingestd.dlq import DeadLetter
from ingestd.worker.pipeline import Batch
from ingestd.worker.share import DELIVERY_LIMIT, LOCK_MS, ShareWorker, Terms, agree_terms
from tests import stack


class Record:
    """What the share worker reads of a polled record."""

    def __init__(self, offset: int, deliveries: int, partition: int = 0) -> None:
        self._offset, self._deliveries, self._partition = offset, deliveries, partition

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def delivery_count(self) -> int:
        return self._deliveries


def chunks(records: list[Record], batch_size: int = 2) -> list[tuple[list[int], bool]]:
    worker: Any = SimpleNamespace(terms=Terms(), batch_size=batch_size)
    return [([m.offset() for m in chunk], alone)
            for chunk, alone in ShareWorker.chunks(worker, records)]  # type: ignore[arg-type]


def test_first_and_second_deliveries_go_in_batches() -> None:
    records = [Record(i, 1 + i % 2) for i in range(5)]
    assert chunks(records) == [([0, 1], False), ([2, 3], False), ([4], False)]


@pytest.mark.parametrize(("deliveries", "order"), [(3, [2, 3, 4]), (4, [4, 3, 2])])
def test_suspects_go_alone_after_the_rest_in_alternating_order(deliveries: int,
                                                               order: list[int]) -> None:
    """From the third delivery a record goes alone, after the others; in offset order on
    an odd delivery and in reverse on an even one, so that the record that kills is
    taken first on one of two deliveries and last on the other."""
    records = [Record(0, 1), Record(3, deliveries), Record(1, DELIVERY_LIMIT),
               Record(2, deliveries), Record(4, deliveries), Record(5, 2)]
    assert chunks(records) == [([0, 1], False), ([5], False),
                               *[([o], True) for o in order]]


@pytest.mark.parametrize(("accepted", "expected"), [
    (True, ["ACCEPT", "ACCEPT", "ACCEPT"]),
    (False, ["RELEASE", "ACCEPT", "RELEASE"])])
def test_a_refused_batch_is_released_but_its_delivered_letters_are_accepted(
        accepted: bool, expected: list[str]) -> None:
    """The Celery broker refused the batch past the lock after the dead-letter topic took
    its letter: that record is done (accepted); the others go back to the group."""
    acks: list[tuple[int, str]] = []
    letter = DeadLetter("t", 0, 1, 0, None, b"x", "decode", "not JSON")

    def publish(batch: Batch, _deadline: float) -> bool:
        batch.unsent = []  # the letters were delivered; then the tasks were refused
        return accepted

    worker: Any = SimpleNamespace(
        terms=Terms(), _build=lambda records, deadline: Batch(letters=[letter]),
        _publish=publish, consumer=SimpleNamespace(acknowledge=lambda msg, kind: acks.append(
            (msg.offset(), AcknowledgeType(kind).name))))
    assert ShareWorker.handle(worker, [Record(i, 1) for i in range(3)], 0.0) is accepted
    assert acks == list(enumerate(expected))


def test_terms_leave_a_retry_in_place_inside_the_lock() -> None:
    assert Terms().retry_budget == LOCK_MS / 1000 - 12.0
    assert Terms(lock_ms=1000).retry_budget == 0.0


@pytest.mark.stack
def test_agree_terms_sets_where_a_new_group_starts(kafka: str) -> None:
    group = f"share-{uuid.uuid4().hex[:8]}"
    stack.set_group_config(group, {"share.record.lock.duration.ms": "20000"})
    loaded = config.load(["--group-id", group, "--group-type", "share",
                          "--bootstrap-servers", stack.BOOTSTRAP], {}).config
    assert agree_terms(loaded, stack.admin()) == Terms(20000, DELIVERY_LIMIT)
    resource = ConfigResource(ConfigResource.Type.GROUP, group)
    entries = stack.admin().describe_configs([resource])[resource].result(30)
    assert entries["share.auto.offset.reset"].value == "earliest"
