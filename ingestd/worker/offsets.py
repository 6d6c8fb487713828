"""Offsets of accepted batches: stored, committed in the background, confirmed.

A worker stores a batch's offsets once the Celery broker accepted the batch,
commits them asynchronously, and publishes the next batch only once Kafka has
confirmed that commit (:attr:`Offsets.unconfirmed` is empty), or while the
records at risk (:attr:`Offsets.at_risk`, accepted but not confirmed) and the
next batch together fit in one full batch; so a crash repeats at most a full
batch of records. A commit Kafka refuses confirms nothing: the records stay at
risk, and the worker waits, however long the refusals last. The confirmation is
librdkafka's commit callback, which also reports librdkafka's own periodic
commits: any result that covers a stored offset confirms it. Only the worker's
thread, which owns the consumer, uses this class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

Partition = tuple[str, int]


class Offsets:
    def __init__(self, owned: Callable[[], set[Partition]],
                 failed: Callable[[KafkaError], None]) -> None:
        self.consumer: Any = None  # set once created: it takes confirmed() as its callback
        self.owned = owned  # the partitions the worker owns now
        self.failed = failed  # a refused store or commit: count it, log it
        self.unconfirmed: dict[Partition, int] = {}  # stored, commit not yet confirmed
        self.at_risk = 0  # records of stored batches while any commit is unconfirmed

    def store(self, offsets: Mapping[Partition, int], records: int = 0) -> None:
        """Store the next offset of every partition given that the worker still owns (its
        new owner consumes the others again), and commit them in the background.
        ``records``: how many the batch consumed, counted at risk until confirmed."""
        owned = self.owned()
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items() if (t, p) in owned]
        if not tps:
            return
        try:
            self.consumer.store_offsets(offsets=tps)
        except KafkaException as exc:
            self.failed(exc.args[0])
            return
        for tp in tps:
            self.unconfirmed[(tp.topic, tp.partition)] = tp.offset
        self.at_risk += records
        self.commit(asynchronous=True)

    def commit(self, asynchronous: bool) -> None:
        """Commit what was stored; nothing stored is not an error."""
        try:
            if asynchronous:
                self.consumer.commit(asynchronous=True)
            else:
                self.consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                self.failed(exc.args[0])

    def confirmed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's commit callback (``on_commit``). A failed commit confirms nothing: it
        is counted, and what it held stays unconfirmed, and at risk, until a later commit
        (librdkafka's own, within a second, or the worker's) covers it."""
        if err is not None:
            if err.code() == KafkaError._NO_OFFSET:  # nothing stored is uncommitted
                self.unconfirmed.clear()
                self.at_risk = 0
            else:
                self.failed(err)
            return
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if tp.error is not None:
                self.failed(tp.error)
            elif key in self.unconfirmed and tp.offset >= self.unconfirmed[key]:
                del self.unconfirmed[key]
        if not self.unconfirmed:
            self.at_risk = 0

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Revoked or lost partitions: their commits are librdkafka's, or nobody's."""
        for tp in partitions:
            self.unconfirmed.pop((tp.topic, tp.partition), None)
        if not self.unconfirmed:
            self.at_risk = 0

