"""One worker process: Kafka → validated signals → Celery tasks, at-least-once.

The loop reads as its steps, each a collaborator of its own:

- **consume**: :class:`~ingestd.worker.feed.Feed`, the next batch, batched naturally;
- **decode and build**: :class:`~ingestd.worker.pipeline.Pipeline`, the records to task
  messages and dead letters;
- **publish**: on the in-flight thread (:mod:`ingestd.worker.inflight`), while this one
  consumes and builds the next batch;
- **store and commit**: :class:`~ingestd.worker.offsets.Offsets`.

Only this thread touches the consumer: it stores and commits a batch's offsets once
the in-flight thread reports that the Celery broker accepted the batch, and it serves
librdkafka's callbacks (:mod:`ingestd.worker.events`). An offset is stored only after
every record at or below it was accepted by the Celery broker or delivered to the
dead-letter topic. A batch is published only after the previous batch's commit was
confirmed, or while it and the records whose commit is unconfirmed fit in one full
batch (``--batch-size``), so a crash repeats at most a full batch of records.

Every wait (a slow broker, a refused batch, a commit) keeps the heartbeat going and
keeps serving Kafka with the partitions paused (:mod:`ingestd.worker.pauses`), and
the status that ``/readyz`` shows says what the worker waits for
(:mod:`ingestd.worker.status`).
"""

from __future__ import annotations

import gc
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from ingestd import kafka, logs
from ingestd.celery import dispatch
from ingestd.config import Config
from ingestd.errors import DispatchError
from ingestd.heartbeat import REJOIN, REPLACE
from ingestd.quarantine import Holding, Quarantine, ranges_of
from ingestd.ratelimit import RateLimit, batch_size
from ingestd.registry import RegistryUnavailable
from ingestd.worker.assignment import Assignment
from ingestd.worker.backpressure import QueueWatch
from ingestd.worker.events import KafkaEvents
from ingestd.worker.feed import Feed
from ingestd.worker.offsets import Offsets
from ingestd.worker.pauses import SLICE, Pauses
from ingestd.worker.pipeline import Batch, Pipeline, size
from ingestd.worker.publisher import Publisher
from ingestd.worker.status import Status

log = logs.get("worker")
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
RETRY_INITIAL_BACKOFF = 0.1
# The in-flight thread needs the GIL to start and to finish its round trips;
# at the default 5 ms switch interval that wait alone would rival them.
SWITCH_INTERVAL = 0.0005
DRAIN_SHARE = 0.8  # of --drain-timeout, spent retrying an unsent batch after a stop
ORPHAN_DRAIN = 3.0  # seconds a worker whose supervisor died spends on its drain
LEAVE_TIMEOUT = 3.0
SLOW = 1.0  # a wait longer than this pauses the partitions and shows on /readyz
COMMIT_POLL = 0.001
COMMIT_AGAIN = 5.0  # while a commit is not confirmed, commit the stored offsets this often
COMMIT_STATUS = "waiting for Kafka to confirm a commit"
REVOKE_WAIT = 10.0  # longest a revoke waits for the batch in flight to be accepted
# A batch holds some 30,000 young objects (decoded records, tasks, messages) that live
# until it is built. At Python's default gen-0 threshold (700) the cycle collector
# walks them some 40 times a batch, and the long-lived objects of the libraries at
# every older pass: about a tenth of a worker's CPU (9.4 -> 8.6 us a signal on a
# backlog here). The records are acyclic and freed by reference counting; the
# collector need only run now and then.
GC_THRESHOLDS = (50_000, 20, 100)


def backoff(max_backoff: float, attempt: int) -> float:
    """How long to wait before retry ``attempt`` (0, 1, ...) of something refused or not
    answering: doubling up to ``max_backoff`` (``--retry-max-backoff``), jittered."""
    delay: float = min(max_backoff, RETRY_INITIAL_BACKOFF * 2 ** attempt)
    return delay * random.uniform(0.5, 1.0)


class Worker:
    """Owns one consumer, one Celery dispatcher and one dead-letter producer, and the
    collaborators that share them."""

    def __init__(self, config: Config, slot: int = 0,
                 beat: Callable[[str], None] | None = None, holding: Holding | None = None,
                 quarantine: Quarantine | None = None,
                 rate_limit: RateLimit | None = None) -> None:
        from ingestd import metrics  # after fork: PROMETHEUS_MULTIPROC_DIR is set by now

        self.config = config
        self.slot = slot
        self.holding = holding  # the records this worker may die on, for the supervisor
        self.metrics = metrics
        self.parent = os.getppid()
        self.stopping = False
        self.rejoin = False  # asked by the supervisor (REJOIN)
        self.leave_group = True  # on a stop; not when a successor takes over (REPLACE)
        self.refused: tuple[Batch, DispatchError] | None = None  # to publish again
        self.status = Status(beat or (lambda line: None), metrics)
        self.events = KafkaEvents(self.status, metrics, lambda: self.assignment.owned)
        dispatcher = dispatch.create(config)
        self.offsets = Offsets(lambda: self.assignment.owned, self.events.commit_failed,
                               metrics.commits.inc)
        props = kafka.consumer_config(config, slot)
        props.update(error_cb=self.events.on_error, stats_cb=self.events.on_stats,
                     on_commit=self.offsets.confirmed, logger=LIBRDKAFKA_LOG)
        self.consumer = self.offsets.consumer = Consumer(props)
        quarantine = quarantine if quarantine is not None else Quarantine(())
        # --max-rate: the host's bucket (the supervisor's; a worker of its own without one).
        # Without a limit, none: a batch then costs no lock. Its batches are capped.
        bucket = (rate_limit or RateLimit(config.max_rate)) if config.max_rate else None
        self.feed = Feed(self.consumer, config, batch_size(config.batch_size, config.max_rate),
                         quarantine, lambda: bool(self.pauses), lambda: self.inflight.busy)
        self.pauses = Pauses(self.consumer, self.feed, self._waited, bucket, metrics)
        self.pipeline = Pipeline(config, dispatcher, quarantine, self.events.on_record_error)
        self.assignment = Assignment(self.consumer, config, slot, self)
        self.watch = QueueWatch(config, self.pauses.backpressure, self._broker_state, metrics)
        self.publisher = Publisher(config, slot, dispatcher, self.watch, metrics)
        self.inflight = self.publisher.inflight

    # --- the loop ---------------------------------------------------------

    def run(self, stops_before: list[int] | None = None) -> None:
        """Consume until asked to stop, then drain: publish, store, commit, leave.

        ``stops_before`` holds the signals that came while the process booted.
        """
        for sig in (signal.SIGTERM, signal.SIGINT, REPLACE):
            signal.signal(sig, self._on_stop)
        signal.signal(REJOIN, self._on_rejoin)
        if stops_before:
            self._on_stop(stops_before[0], None)
        sys.setswitchinterval(SWITCH_INTERVAL)
        gc.freeze()  # what start-up built lives as long as the process: never walked again
        gc.set_threshold(*GC_THRESHOLDS)
        self.assignment.start()
        try:
            while not self.stopping:
                self._tick()
                messages = self.feed.next()
                if not messages or self.pauses.abandoned:
                    self.settle()
                    continue
                # The batch in flight is published while this one is decoded and built: if
                # it is accepted by now, its commit goes out before the work, not after.
                self._collect()
                batch = self.decode_and_build(messages)
                self.settle()
                if self.pauses.abandoned:
                    break
                self.await_commit(sum(batch.consumed.values()), self.feed.suspect)
                if self.pauses.abandoned:
                    break
                if batch.revision != self.assignment.revision:
                    batch = self.pipeline.without(batch, self.assignment.owned,
                                                  self.assignment.revision)
                self.watch.handed_over(len(batch.tasks))
                signals = sum(len(t.raws) for t in batch.tasks)
                self.pauses.take_rate(signals)
                batch.drop_objects()
                if self.publisher.hand_over(batch, signals):  # published inline
                    self._collect()
            self.settle()
            if not self.pauses.abandoned:
                self.await_commit()
        finally:
            self.close()

    def _tick(self) -> None:
        """Once per loop: beat, say how things stand, and look after the assignment and the
        Celery queue."""
        self.events.check()
        if self.parent != os.getppid() and not self.stopping:
            log.warning("the supervisor is gone: stopping")
            self._on_stop(signal.SIGTERM, None)
        if self.rejoin:
            self.rejoin = False
            self.assignment.rejoin(LEAVE_TIMEOUT)
        self._update_status()
        self.assignment.refresh()
        self.watch.check()
        self.pauses.check_rate()
        self.offsets.commit_if_due()  # what a quiet stream stored: within COMMIT_INTERVAL

    def decode_and_build(self, messages: list[Message]) -> Batch:
        """The batch of ``messages``: what a batch cannot hold goes back to the feed. While
        the records could kill the process, the supervisor knows which they are."""
        if self.pipeline.registry is not None:
            self.resolve_schemas(messages)
        if self.holding is not None:
            self.holding.hold(ranges_of(messages))
        batch, rest = self.pipeline.decode(messages, self.assignment.owned,
                                           self.assignment.revision)
        self.feed.put_back(rest)
        self.pipeline.build(batch)
        if self.holding is not None:
            self.holding.hold([])
        return batch

    def resolve_schemas(self, messages: list[Message]) -> None:
        """Before a batch of a registry format is decoded: every schema it names, from the
        registry. While the registry does not answer, the partitions are paused and it is
        asked again with backoff, as a Celery broker is; a stop may abandon the batch."""
        registry = self.pipeline.registry
        assert registry is not None
        attempt = 0
        while not self.pauses.abandoned:
            try:
                registry.resolve(messages)
            except RegistryUnavailable as exc:
                delay = self._backoff(attempt)
                attempt += 1
                self.status.registry(f"{exc}; retrying in {delay:.1f}s (attempt {attempt}), "
                                     "partitions paused")
                self.pauses.wait(lambda: False, delay, "registry", "")
                continue
            self.status.registry("")
            return

    # --- the batch in flight ----------------------------------------------

    def settle(self) -> None:
        """Wait for the batch in flight and store its offsets once the broker accepted it.
        A refused batch is retried here, with the partitions paused, until it is accepted;
        a stop that leaves no time for it abandons it, and nothing after it is published
        or stored. A partition revoked meanwhile takes its records out of the retry."""
        wait = self.pauses.wait
        if not self.inflight.wait(SLOW):
            wait(lambda: self.inflight.wait(0), float("inf"), "publish",
                 "waiting for the Celery broker to accept a batch")
        self._collect()
        attempt = 0
        while self.refused is not None and not self.pauses.abandoned:
            batch, exc = self.refused
            delay = self._backoff(attempt)
            attempt += 1
            self.status.broker_log.warning("%s; retrying in %.1fs (attempt %d), partitions paused",
                                    exc, delay, attempt)
            self.status.refused(exc)
            self._update_status()
            if wait(lambda: False, delay, "broker", ""):
                self.refused = None
                if batch.revision != self.assignment.revision:
                    batch = self.pipeline.without(batch, self.assignment.owned,
                                                  self.assignment.revision)
                self.inflight.submit(batch, self.publisher.publish)
                wait(lambda: self.inflight.wait(0), float("inf"), "broker", "")
                self._collect()
        if self.pauses.abandoned and (self.refused or self.inflight.busy):
            log.warning("stopping with a batch the broker did not accept; it and the records "
                        "after it were not committed and will be consumed again")

    def _backoff(self, attempt: int) -> float:
        return backoff(self.config.retry_max_backoff, attempt)

    def _collect(self) -> None:
        """Act on the batch in flight if it finished: store its offsets, or keep it for a
        retry."""
        result = self.inflight.take()
        if result is None:
            return
        batch, exc = result
        if exc is not None:
            self.refused = (batch, exc)
            return
        self.status.refused(None)
        self.offsets.store(batch.offsets, sum(batch.consumed.values()))

    def await_commit(self, records: int | None = None, suspect: bool = False) -> None:
        """Before the next batch (of ``records``; None: none follows) is published: wait
        while the crash bound needs a commit confirmed (:meth:`Offsets.must_wait`). A
        suspected record, alone (see :mod:`ingestd.quarantine`), waits until everything
        before it is confirmed: the death it may cause repeats only the record before it. The
        commit usually is confirmed by now. librdkafka puts commit results ahead of the
        fetched records, so any consume serves it; what such consumes return is carried
        into the next batches: up to a batch's records in one consume (a consume a
        record cost six times as much a record), then one record a millisecond, and
        past two batches, in records or in bytes (a commit slower than a
        second, say while the group coordinator moves) the partitions are paused. A
        commit Kafka refuses is asked for again, however long that takes."""
        offsets, feed = self.offsets, self.feed
        # --batch-size, not the --max-rate cap: the bound on what a crash repeats.
        n, max_size = self.config.batch_size, self.config.max_batch_bytes
        if not offsets.must_wait(records, 1 if suspect else n):
            return
        deadline = time.monotonic() + SLOW
        carried = size(feed.carry)
        while (offsets.pending and len(feed.carry) < 2 * n and carried < 2 * max_size
               and time.monotonic() < deadline):
            got = self.consumer.consume(max(1, n - len(feed.carry)), COMMIT_POLL)
            if got:
                feed.keep(got)
                carried += size(got)
            if offsets.pending and (len(feed.carry) >= n or carried >= max_size):
                time.sleep(COMMIT_POLL)
        while offsets.pending and not self.pauses.abandoned:
            if self.pauses.wait(lambda: not offsets.pending, COMMIT_AGAIN, "commit",
                                COMMIT_STATUS) and offsets.pending:
                self.events.log.warning("offset commit not confirmed for %.0fs (%d records "
                                        "at risk): committing again, partitions paused",
                                        COMMIT_AGAIN, offsets.at_risk)
                offsets.commit_stored()

    # --- partitions coming and going (called inside consume()) --------------

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """New partitions start paused while any pause reason holds, and resumed
        otherwise: librdkafka keeps a partition paused by the application across its
        unassign and assign, so one lost or revoked during a wait (a commit that waited
        on a dead group coordinator, say) would come back paused for good."""
        self._owned(partitions, True)
        if self.pauses:
            self.consumer.pause(partitions)
        else:
            self.consumer.resume(partitions)

    def revoking(self, partitions: list[TopicPartition]) -> None:
        """Let the batch in flight finish, so that its offsets are stored before the
        partitions go: librdkafka commits them as part of the revoke. The in-flight thread
        never needs the consumer, so this wait cannot wait for itself."""
        deadline = time.monotonic() + REVOKE_WAIT
        while not self.inflight.wait(SLICE) and time.monotonic() < deadline:
            self.status.beat(self.status.line)
        if self.inflight.wait(0):
            self._collect()
        self.lost(partitions)

    def lost(self, partitions: list[TopicPartition]) -> None:
        """Forget what the worker holds of partitions it no longer owns: their commits,
        and their carried records. Were the partitions given back, those records would
        otherwise go out ahead of the ones before them, which the new assignment fetches
        again from the committed offset, and the stored offset would pass them."""
        self.offsets.forget(partitions)
        self._owned(partitions, False)
        self.feed.drop({(tp.topic, tp.partition) for tp in partitions})

    def _owned(self, partitions: list[TopicPartition], owned: bool) -> None:
        """What ``ingestd status`` shows: which partitions this worker owns. A partition
        given up shows no lag here any more (another worker reports it)."""
        slot = str(self.slot)
        for tp in partitions:
            self.metrics.assigned_partitions.labels(slot, tp.topic, str(tp.partition)).set(
                1 if owned else 0)
            if not owned:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(0)

    # --- status, signals, the end -------------------------------------------

    def _update_status(self) -> None:
        self.status.update(self.pauses.waiting, self.assignment.joined)

    def _waited(self) -> None:
        """Once a slice of every wait: a fatal error ends it, the status is beaten."""
        self.events.check()
        self._update_status()

    def _broker_state(self, exc: DispatchError | None) -> None:
        """The queue-depth probe reached the Celery broker (None), or did not."""
        self.status.broker(exc)
        self._update_status()

    def _on_stop(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            budget = DRAIN_SHARE * self.config.drain_timeout
            if self.parent != os.getppid():  # the supervisor died: nobody waits for us
                budget = min(budget, ORPHAN_DRAIN)
            self.pauses.stop_at = time.monotonic() + budget
            self.leave_group = signum != REPLACE

    def _on_rejoin(self, _signum: int, _frame: Any) -> None:
        self.rejoin = True

    def close(self) -> None:
        """Commit what was stored and leave the group; after a fatal error, just close.
        A commit to an unreachable coordinator, and librdkafka's close while a rebalance
        is pending, wait with no bound: they run on a thread of their own that this one
        waits for (not touching the consumer meanwhile) only as long as the drain
        allows."""
        self.inflight.close()
        closing = threading.Thread(target=self._leave_and_close, name="close", daemon=True)
        closing.start()
        orphan = self.parent != os.getppid()
        closing.join(1.0 if orphan else max(1.0, (1 - DRAIN_SHARE) * self.config.drain_timeout
                                            - 1.0))
        if closing.is_alive():
            log.warning("consumer close did not finish in time; exiting without it")

    def _leave_and_close(self) -> None:
        fatal = self.events.fatal is not None
        try:
            if not fatal:
                self.offsets.commit(asynchronous=False)
            if self.leave_group and not fatal:
                self.assignment.leave(LEAVE_TIMEOUT)
            self.consumer.close()
        except KafkaException as exc:
            log.warning("consumer close: %s", exc.args[0].str())
        self.publisher.close()
