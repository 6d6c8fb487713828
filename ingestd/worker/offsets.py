"""Offsets of accepted batches: stored, committed in groups, confirmed; the commit policy.

A worker stores a batch's offsets once the Celery broker accepted the batch.
What a crash would repeat is what was stored and not yet confirmed committed: the
records *at risk*, counted batch by batch (:attr:`Offsets.at_risk`). The policy:

- **The crash bound.** The next batch is published only while it and the records at
  risk fit in one full batch (``--batch-size``); otherwise the worker commits at once
  and waits for the confirmation (:meth:`Offsets.must_wait`). A crash therefore
  repeats at most a full batch.
- **Grouped commits.** Otherwise a commit goes out at most every
  :data:`COMMIT_INTERVAL`, covering every batch stored since: at 10,000 records a
  second in batches of a few records, some 50 commits a second, not 1,400. Under a
  backlog of full batches every batch has to wait for its commit: one commit a batch.
- **Confirmation.** librdkafka's commit callback, which also reports its own
  periodic commits: a batch stops being at risk once a confirmed offset covers each
  of its partitions, whatever commit covered it. A commit Kafka refuses confirms
  nothing: its records stay at risk, and the worker waits, however long the refusals
  last.

Only the worker's thread, which owns the consumer, uses this class.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

Partition = tuple[str, int]
# A worker sends a commit of its own at most this often (50 a second), unless the crash
# bound needs one at once.
COMMIT_INTERVAL = 0.02


class Offsets:
    """``owned`` gives the partitions the worker owns now; ``failed`` hears of a refused
    store or commit, ``sent`` of each commit sent."""

    def __init__(self, owned: Callable[[], set[Partition]],
                 failed: Callable[[KafkaError], None],
                 sent: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer: Any = None  # set once created: it takes confirmed() as its callback
        self.owned = owned
        self.failed = failed
        self.sent = sent
        self.clock = clock
        # Stored batches not yet confirmed committed, in order: their offsets, their records.
        self.pending: list[tuple[dict[Partition, int], int]] = []
        self.confirmed_at: dict[Partition, int] = {}  # the highest confirmed, by partition
        self.uncommitted = False  # something was stored since the last commit went out
        self.last_sent = float("-inf")

    @property
    def at_risk(self) -> int:
        """Records of stored batches whose commit is not confirmed: what a crash repeats."""
        return sum(records for _, records in self.pending)

    @property
    def unconfirmed(self) -> dict[Partition, int]:
        """The highest stored offset of every partition whose commit is not confirmed."""
        out: dict[Partition, int] = {}
        for stored, _ in self.pending:
            out.update((p, o) for p, o in stored.items() if self.confirmed_at.get(p, -1) < o)
        return out

    def store(self, offsets: Mapping[Partition, int], records: int = 0) -> None:
        """Store the next offset of every partition given that the worker still owns (its
        new owner consumes the others again); ``records``: how many the batch consumed,
        at risk until confirmed. Committed now if the last commit is old enough."""
        owned = self.owned()
        stored = {p: o for p, o in offsets.items() if p in owned}
        if not stored:
            return
        try:
            self.consumer.store_offsets(offsets=[TopicPartition(t, p, o)
                                                 for (t, p), o in stored.items()])
        except KafkaException as exc:
            self.failed(exc.args[0])
            return
        self.pending.append((stored, records))
        self.uncommitted = True
        self.commit_if_due()

    def must_wait(self, records: int | None, limit: int) -> bool:
        """Whether the next batch (of ``records``; None: none follows, the worker stops)
        must wait for a confirmation: it and the records at risk would not fit in
        ``limit``. If so, what was stored is committed now."""
        if not self.pending or (records is not None and self.at_risk + records <= limit):
            return False
        if self.uncommitted:
            self.commit_stored()
        return True

    def commit_if_due(self) -> None:
        """Commit what was stored if the last commit is :data:`COMMIT_INTERVAL` old."""
        if self.uncommitted and self.clock() - self.last_sent >= COMMIT_INTERVAL:
            self.commit_stored()

    def commit_stored(self) -> None:
        """Commit, in the background, every offset stored so far."""
        self.uncommitted = False
        self.last_sent = self.clock()
        self.sent()
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
        is counted, and what it held stays at risk until a later commit (librdkafka's own,
        within a second, or the worker's) covers it."""
        if err is not None:
            if err.code() == KafkaError._NO_OFFSET:  # nothing stored is uncommitted
                self.pending.clear()
            else:
                self.failed(err)
            return
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if tp.error is not None:
                self.failed(tp.error)
            elif tp.offset > self.confirmed_at.get(key, -1):
                self.confirmed_at[key] = tp.offset
        confirmed = self.confirmed_at
        self.pending[:] = [(stored, n) for stored, n in self.pending
                           if any(confirmed.get(p, -1) < o for p, o in stored.items())]

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Revoked or lost partitions: their commits are librdkafka's, or nobody's."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        for p in gone:
            self.confirmed_at.pop(p, None)
        kept = []
        for stored, records in self.pending:
            left = {p: o for p, o in stored.items() if p not in gone}
            if left:
                kept.append((left, records))
        self.pending[:] = kept
