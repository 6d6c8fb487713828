"""The worker's intake: the next batch, from what was carried over and what Kafka has.

Records that come while the worker waits (for a commit, for the broker, with its
partitions paused) are the next ones in order: they are carried into the next
batches, never dropped and sought back to, because a seek on a paused partition can
leave librdkafka's fetcher stopped after the resume.
"""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import Consumer, Message

from ingestd.config import Config
from ingestd.quarantine import Quarantine
from ingestd.worker.pipeline import Partition, size


class Feed:
    """Batches for the loop, and the records carried between them. ``paused`` says when
    nothing may be handed on; ``busy`` when a batch is in flight."""

    def __init__(self, consumer: Consumer, config: Config, batch_size: int,
                 quarantine: Quarantine, paused: Callable[[], bool],
                 busy: Callable[[], bool]) -> None:
        self.consumer = consumer
        self.config = config
        self.batch_size = batch_size  # --batch-size, or less under --max-rate
        self.quarantine = quarantine
        self.paused = paused
        self.busy = busy
        self.carry: list[Message] = []  # consumed already: the next batches'
        self.suspect = False  # the last batch handed on is a suspected record, alone

    def next(self) -> list[Message]:
        """The next batch: what was carried over, then what Kafka has, up to the batch size
        (the pipeline cuts it at ``--max-batch-bytes``). While the partitions are paused
        (backpressure, the rate limit, ...) nothing is handed on: what was carried waits
        with them. A record a dead worker held goes alone (see :mod:`ingestd.quarantine`),
        and :attr:`suspect` says so."""
        messages = self._take()
        self.suspect = False
        return self._alone(messages) if self.quarantine.suspected and messages else messages

    def keep(self, messages: list[Message]) -> None:
        """Records that came while the worker waited: after what is carried."""
        self.carry += messages

    def put_back(self, messages: list[Message]) -> None:
        """Records a batch could not hold: ahead of what is carried."""
        self.carry[:0] = messages

    def drop(self, gone: set[Partition]) -> None:
        """Forget the carried records of partitions the worker no longer owns."""
        if gone and self.carry:
            self.carry = [m for m in self.carry if (m.topic(), m.partition()) not in gone]

    def _alone(self, messages: list[Message]) -> list[Message]:
        """The records before the first suspected one; or that one alone, if it is first.
        The rest is carried into the next batches."""
        suspects = self.quarantine.suspects
        for i, msg in enumerate(messages):
            where = msg.topic(), msg.partition(), msg.offset()
            if msg.error() is None and suspects(*where):  # type: ignore[arg-type]
                cut = max(i, 1)
                self.suspect = i == 0
                self.put_back(messages[cut:])
                return messages[:cut]
        return messages

    def _take(self) -> list[Message]:
        n, carry = self.batch_size, self.carry
        if self.paused():
            self.carry += self.consumer.consume(n, self.config.batch_timeout_ms / 1000)
            return []
        if len(carry) >= n:  # a commit wait can carry up to two batches: hand on one
            self.carry = carry[n:]
            return carry[:n]
        self.carry = []
        if carry and size(carry) >= self.config.max_batch_bytes:
            return carry
        more = self._fetch(n - len(carry), wait=not carry)
        return carry + more if carry else more

    def _fetch(self, n: int, wait: bool) -> list[Message]:
        """Up to ``n`` records, batched naturally: what librdkafka has fetched already,
        at once; when it has nothing (and ``wait``), the first record that comes, within
        ``--batch-timeout-ms``. Then ``--linger-ms`` more for the rest of the batch. So
        a batch is large under load and small when load is light, and no record waits
        for others to arrive. With nothing fetched and a batch in flight it does not
        wait: the loop settles that batch first, so that its commit is confirmed by the
        time the next record comes, and that record waits for no commit."""
        consume, config = self.consumer.consume, self.config
        got = consume(n, 0)
        if not got and wait and not self.busy():
            got = consume(1, config.batch_timeout_ms / 1000)
            if got and n > 1:
                got += consume(n - 1, 0)
        if got and config.linger_ms and len(got) < n:
            got += consume(n - len(got), config.linger_ms / 1000)
        return got
