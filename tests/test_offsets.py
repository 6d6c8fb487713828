"""The commit bookkeeping that lets a worker publish its next batch, with the consumer faked
at its seam; the real consumer's side is exercised by every end-to-end test."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from ingestd.worker.offsets import COMMIT_INTERVAL, Offsets


class FakeConsumer:
    def __init__(self) -> None:
        self.stored: list[list[tuple[str, int, int]]] = []
        self.commits: list[bool] = []
        self.refuse_store: KafkaError | None = None

    def store_offsets(self, offsets: list[TopicPartition]) -> None:
        if self.refuse_store is not None:
            raise KafkaException(self.refuse_store)
        self.stored.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def commit(self, asynchronous: bool) -> None:
        self.commits.append(asynchronous)


def make(owned: set[tuple[str, int]]) -> tuple[Offsets, FakeConsumer, list[Any]]:
    failures: list[Any] = []
    offsets = Offsets(lambda: owned, failures.append)
    consumer = offsets.consumer = FakeConsumer()
    return offsets, consumer, failures


def tp(partition: int, offset: int, error: KafkaError | None = None) -> Any:
    """What librdkafka's commit callback hands over for one partition (``error`` is read-only
    on a real TopicPartition)."""
    return SimpleNamespace(topic="t", partition=partition, offset=offset, error=error)


def test_only_owned_partitions_are_stored_then_committed_in_the_background() -> None:
    offsets, consumer, _ = make({("t", 0)})
    offsets.store({("t", 0): 10, ("t", 1): 7})
    assert consumer.stored == [[("t", 0, 10)]] and consumer.commits == [True]
    assert offsets.unconfirmed == {("t", 0): 10}
    offsets.store({("t", 1): 9})  # revoked meanwhile: its new owner consumes it again
    assert len(consumer.stored) == 1 and offsets.unconfirmed == {("t", 0): 10}


def test_a_result_confirms_what_it_covers_whoever_committed() -> None:
    offsets, _, failures = make({("t", 0), ("t", 1)})
    offsets.store({("t", 0): 10, ("t", 1): 20})
    offsets.confirmed(None, [tp(0, 10), tp(1, 15)])  # librdkafka's periodic commit, earlier
    assert offsets.unconfirmed == {("t", 1): 20}
    offsets.confirmed(None, [tp(0, -1001), tp(1, 20)])  # partition 0 not included
    assert offsets.unconfirmed == {} and failures == []


def test_failures_are_reported_and_confirm_nothing() -> None:
    """A refused commit (the coordinator below min.insync.replicas, say) leaves what it held
    unconfirmed, however often it is refused, until a commit covers it."""
    offsets, _, failures = make({("t", 0), ("t", 1)})
    offsets.store({("t", 0): 10, ("t", 1): 20}, records=30)
    offsets.confirmed(None, [tp(0, 10, KafkaError(KafkaError.REBALANCE_IN_PROGRESS)),
                             tp(1, 5)])
    assert offsets.unconfirmed == {("t", 0): 10, ("t", 1): 20}
    assert [f.code() for f in failures] == [KafkaError.REBALANCE_IN_PROGRESS]
    for _ in range(3):
        offsets.confirmed(KafkaError(KafkaError.NOT_ENOUGH_REPLICAS), [])
    assert offsets.unconfirmed == {("t", 0): 10, ("t", 1): 20} and len(failures) == 4
    assert offsets.at_risk == 30
    offsets.confirmed(None, [tp(0, 10), tp(1, 20)])
    assert offsets.unconfirmed == {} and offsets.at_risk == 0


def test_nothing_left_to_commit_confirms_everything() -> None:
    offsets, _, failures = make({("t", 0)})
    offsets.store({("t", 0): 10})
    offsets.confirmed(KafkaError(KafkaError._NO_OFFSET), [])
    assert offsets.unconfirmed == {} and failures == []


def test_revoked_partitions_are_not_waited_for() -> None:
    offsets, _, _ = make({("t", 0), ("t", 1)})
    offsets.store({("t", 0): 10, ("t", 1): 20})
    offsets.forget([tp(1, -1001)])
    assert offsets.unconfirmed == {("t", 0): 10}


def test_a_refused_store_is_reported_and_nothing_is_awaited() -> None:
    offsets, consumer, failures = make({("t", 0)})
    consumer.refuse_store = KafkaError(KafkaError._STATE)
    offsets.store({("t", 0): 10})
    assert offsets.unconfirmed == {} and consumer.commits == []
    assert [f.code() for f in failures] == [KafkaError._STATE]


def test_records_stay_at_risk_until_every_commit_is_confirmed() -> None:
    offsets, _, _ = make({("t", 0), ("t", 1)})
    offsets.store({("t", 0): 10}, records=4)
    offsets.store({("t", 1): 20}, records=3)
    assert offsets.at_risk == 7
    offsets.confirmed(None, [tp(0, 10)])
    assert offsets.at_risk == 3  # partition 1's batch: counted until its commit is confirmed
    offsets.confirmed(None, [tp(1, 20)])
    assert offsets.at_risk == 0
    offsets.store({("t", 0): 12}, records=2)
    offsets.forget([TopicPartition("t", 0)])
    assert offsets.at_risk == 0
    offsets.store({("t", 0): 14}, records=2)
    offsets.confirmed(KafkaError(KafkaError.REQUEST_TIMED_OUT), [])
    assert offsets.at_risk == 2 and offsets.unconfirmed == {("t", 0): 14}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_commits_are_grouped_by_time() -> None:
    """Batches of a few records 1 ms apart: one commit per COMMIT_INTERVAL, not per batch."""
    clock, sent = Clock(), []
    offsets = Offsets(lambda: {("t", 0)}, lambda err: None, lambda: sent.append(1), clock)
    consumer = offsets.consumer = FakeConsumer()
    for i in range(50):
        offsets.store({("t", 0): 10 + i}, records=1)
        clock.now += 0.001
    assert len(consumer.stored) == 50
    assert len(consumer.commits) == len(sent) == 3  # at 0, 20 and 40 ms
    clock.now += COMMIT_INTERVAL
    offsets.commit_if_due()  # the loop's tick: a quiet stream's last batches
    assert len(consumer.commits) == 4
    offsets.commit_if_due()
    assert len(consumer.commits) == 4  # nothing new was stored


def test_the_crash_bound_commits_at_once_and_waits() -> None:
    clock = Clock()
    offsets = Offsets(lambda: {("t", 0)}, lambda err: None, clock=clock)
    consumer = offsets.consumer = FakeConsumer()
    offsets.store({("t", 0): 600}, records=600)
    offsets.store({("t", 0): 900}, records=300)  # not due: no commit of its own
    assert consumer.commits == [True] and offsets.at_risk == 900
    assert not offsets.must_wait(100, limit=1000)  # fits: goes out at once
    assert offsets.must_wait(101, limit=1000) and consumer.commits == [True, True]
    assert offsets.must_wait(None, limit=1000)  # a stop: every stored offset committed
    offsets.confirmed(None, [tp(0, 900)])
    assert not offsets.must_wait(1000, limit=1000) and offsets.at_risk == 0


def test_one_confirmation_covers_several_batches_and_only_those() -> None:
    offsets, _, _ = make({("t", 0), ("t", 1)})
    offsets.store({("t", 0): 10}, records=10)
    offsets.store({("t", 0): 20, ("t", 1): 5}, records=15)
    offsets.store({("t", 1): 9}, records=4)
    offsets.confirmed(None, [tp(0, 20), tp(1, 5)])  # an older commit of partition 1
    assert offsets.at_risk == 4 and offsets.unconfirmed == {("t", 1): 9}
    offsets.confirmed(None, [tp(1, 3)])  # older still: changes nothing
    assert offsets.at_risk == 4
    offsets.confirmed(None, [tp(0, 20), tp(1, 9)])
    assert offsets.at_risk == 0 and offsets.unconfirmed == {}
