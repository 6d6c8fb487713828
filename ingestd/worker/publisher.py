"""Publish a built batch: its dead letters to Kafka, then its tasks to the Celery broker.

A batch goes out on the in-flight thread (:mod:`ingestd.worker.inflight`), overlapping
the next batch's consume, decode and build; a small one goes out on the worker's own
thread, where the hand-off would cost more than the overlap saves. Nothing here
touches the Kafka consumer.
"""

from __future__ import annotations

import logging
import time
from types import ModuleType

from ingestd import kafka, logs
from ingestd.celery import dispatch
from ingestd.config import Config
from ingestd.dlq import DeadLetterError, DeadLetterProducer
from ingestd.worker.backpressure import QueueWatch
from ingestd.worker.inflight import InFlight
from ingestd.worker.pipeline import Batch, count

LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
# A batch of at most this many records is published on the loop's own thread: building
# the next batch would overlap little of its round trip, and the hand-off to the
# publish thread (two switches, each waiting for the GIL) costs more than it saves.
# Only while the broker answers within FAST seconds, and never a batch with dead
# letters (their delivery reports can take long): a broker that stalls is waited for on
# the publish thread, with the partitions paused and the heartbeat going.
INLINE, FAST = 64, 0.02


class Publisher:
    """The worker's dispatcher, dead-letter producer and in-flight thread."""

    def __init__(self, config: Config, slot: int, dispatcher: dispatch.Dispatcher,
                 watch: QueueWatch, metrics: ModuleType) -> None:
        self.config = config
        self.slot = slot
        self.dispatcher = dispatcher
        self.watch = watch
        self.metrics = metrics
        dlq_topic = config.dead_letter_topic
        self.dlq = (DeadLetterProducer(dlq_topic, {**kafka.producer_config(config),
                                                   "logger": LIBRDKAFKA_LOG}, config.group_id)
                    if dlq_topic else None)
        self.inflight: InFlight[Batch] = InFlight()
        self.invalid_log = logs.RateLimited(logs.get("invalid_record"))
        self.fast = True  # the broker answered the last batch within FAST
        # A stall inline blocks the loop for a socket timeout at most: never past the
        # heartbeat's limit.
        self.inline = config.worker_timeout > 2 * dispatch.BROKER_TIMEOUT

    def hand_over(self, batch: Batch, signals: int) -> bool:
        """Publish ``batch`` (of ``signals``): inline, then True (its result is ready to
        take), or on the in-flight thread. The thread must be idle."""
        if signals <= INLINE and not batch.letters and self.fast and self.inline:
            self.inflight.run(batch, self.publish)
            return True
        self.inflight.submit(batch, self.publish)
        return False

    def publish(self, batch: Batch) -> None:
        """Dead letters, then tasks; raises DispatchError when either is refused."""
        unsent = batch.letters if batch.unsent is None else batch.unsent
        if unsent and self.dlq is not None:
            try:
                self.dlq.send(unsent)
            except DeadLetterError as exc:  # a retry sends only what was not delivered
                batch.unsent = exc.undelivered
                raise
        batch.unsent = []
        started = time.perf_counter()
        self.fast = False  # until it answers, and in time
        self.dispatcher.send(batch.messages)
        elapsed = time.perf_counter() - started
        self.fast = elapsed < FAST
        # Now, not when this batch's result is collected: a queue depth asked in between
        # would count the batch twice. (A batch is handed over only when the in-flight
        # thread is idle, so the two threads never change the count at once.)
        self.watch.accepted(len(batch.tasks))
        self.metrics.dispatch_seconds.observe(elapsed)
        count(batch, self.config, self.slot, self.invalid_log)

    def close(self) -> None:
        """The producers and connections, once the consumer is closed."""
        if self.dlq is not None:
            self.dlq.close()
        self.watch.close()
        self.dispatcher.close()
