"""One worker process: Kafka → validated signals → Celery tasks, at-least-once.

The loop reads top to bottom: consume → decode/validate → build messages →
publish → store offsets. Publishing runs on the in-flight thread
(:mod:`ingestd.worker.inflight`) while this one consumes and builds the next batch.

Only this thread touches the consumer: it stores and commits a batch's
offsets once the in-flight thread reports that the Celery broker accepted the
batch, and it serves librdkafka's callbacks. An offset is stored only after
every record at or below it was accepted by the Celery broker or delivered to
the dead-letter topic. A batch is published only after the previous batch's
commit was confirmed, or while it and the records whose commit is unconfirmed
fit in one full batch (``--batch-size``), so a crash repeats at most a full
batch of records.

Every wait (a slow broker, a refused batch, a commit) keeps the heartbeat
going and keeps serving Kafka with the partitions paused, and the status that
``/readyz`` shows says what the worker waits for.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from ingestd import kafka, logs, rdkafka
from ingestd.celery import codec, dispatch
from ingestd.config import Config
from ingestd.dlq import DeadLetter, DeadLetterError, DeadLetterProducer
from ingestd.errors import DispatchError, KafkaFatalError, RecordError
from ingestd.heartbeat import READY, REJOIN, REPLACE
from ingestd.metadata import kafka_metadata, trace_context
from ingestd.quarantine import DETAIL as QUARANTINED
from ingestd.quarantine import Holding, Quarantine, ranges_of
from ingestd.ratelimit import RateLimit, batch_cap
from ingestd.schema import INTERNAL, TOO_LARGE, Validator
from ingestd.worker.assignment import Assignment
from ingestd.worker.backpressure import QueueWatch
from ingestd.worker.inflight import InFlight
from ingestd.worker.offsets import Offsets

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
SLICE = 0.02  # a long wait serves Kafka and checks what it waits for this often
COMMIT_POLL = 0.001
COMMIT_AGAIN = 5.0  # while a commit is not confirmed, commit the stored offsets this often
COMMIT_STATUS = "waiting for Kafka to confirm a commit"
# librdkafka's error for a fetch response over receive.message.max.bytes; the status it
# gives stands until the error has not come again for this long.
TOO_LARGE_TO_FETCH = "Invalid response size"
FETCH_ERROR_KEPT = 30.0
# A task message's bytes besides its records' (base64 and kwargs aside): the envelope,
# the headers with argsrepr and kwargsrepr; and a batch task's per record (its id).
MESSAGE_OVERHEAD, RECORD_OVERHEAD = 16384, 64
REVOKE_WAIT = 10.0  # longest a revoke waits for the batch in flight to be accepted
# A batch holds some 30,000 young objects (decoded records, tasks, messages) that live
# until it is built. At Python's default gen-0 threshold (700) the cycle collector
# walks them some 40 times a batch, and the long-lived objects of the libraries at
# every older pass: about a tenth of a worker's CPU (9.4 -> 8.6 us a signal on a
# backlog here). The records are acyclic and freed by reference counting; the
# collector need only run now and then.
GC_THRESHOLDS = (50_000, 20, 100)


@dataclass
class Batch:
    """A consumed batch, split into what to dispatch and what to dead-letter."""

    tasks: list[dispatch.Task] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to consume
    consumed: dict[str, int] = field(default_factory=dict)  # per topic
    oldest_ms: int = 0
    messages: Any = None  # what the dispatcher built from ``tasks``
    unsent: list[DeadLetter] | None = None  # letters still to send (None: all of them)
    revision: int = 0  # the assignment's revision when it was decoded
    records: list[Message] = field(default_factory=list)  # consumed; kept until built

    def drop_objects(self) -> None:
        """Free the decoded records once the messages are built: only the batch being
        built holds decoded objects (up to 20 times its bytes), not the one in flight."""
        for task in self.tasks:
            task.objs.clear()


class Worker:
    """Owns one consumer, one Celery dispatcher and one dead-letter producer."""

    def __init__(self, config: Config, slot: int = 0,
                 beat: Callable[[str], None] | None = None, holding: Holding | None = None,
                 quarantine: Quarantine | None = None,
                 rate_limit: RateLimit | None = None) -> None:
        self.config = config
        # --max-rate: the host's bucket (the supervisor's; a worker of its own without one).
        # Without a limit, none: a batch then costs no lock.
        self.rate_limit = (rate_limit or RateLimit(config.max_rate)) if config.max_rate \
            else None
        self.rate_paused_until = 0.0
        self.batch_size = min(config.batch_size, batch_cap(config.max_rate) or config.batch_size)
        self.slot = slot
        self.beat = beat or (lambda status: None)
        self.holding = holding
        self.quarantine = quarantine if quarantine is not None else Quarantine(())
        self.parent = os.getppid()
        self.stopping = False
        self.rejoin = False  # asked by the supervisor (REJOIN)
        self.leave_group = True  # on a stop; not when a successor takes over (REPLACE)
        self.give_up_at = float("inf")
        self.abandoned = False  # a stop gave up a refused batch: publish and store nothing more
        self.paused_by: set[str] = set()
        self.waiting = ""  # what a long wait waits for, shown on /readyz
        self.carry: list[Message] = []  # consumed while waiting for a commit: the next batch's
        self.refused: tuple[Batch, DispatchError] | None = None
        self.fatal: KafkaError | None = None
        self.broker_error = ""
        self.dlq_error = ""  # the dead-letter topic refuses letters: why
        self.fetch_error, self.fetch_error_at = "", 0.0  # a record too large to fetch
        self.status = ""
        self.validator = validator(config)
        self.task_bound = task_bound(config)
        self.dispatcher = dispatch.create(config)
        dlq_topic = config.dead_letter_topic
        self.dlq = (DeadLetterProducer(dlq_topic, {**kafka.producer_config(config),
                                                   "logger": LIBRDKAFKA_LOG}, config.group_id)
                    if dlq_topic else None)
        self.invalid_log = logs.RateLimited(logs.get("invalid_record"))
        self.kafka_log = logs.RateLimited(logs.get("kafka"))
        self.broker_log = logs.RateLimited(logs.get("broker"), burst=1)
        props = kafka.consumer_config(config, slot)
        self.offsets = Offsets(lambda: self.assignment.owned, self._commit_failed)
        props.update(error_cb=self._on_kafka_error, stats_cb=self._on_stats,
                     on_commit=self.offsets.confirmed, logger=LIBRDKAFKA_LOG)
        self.consumer = self.offsets.consumer = Consumer(props)
        self.inflight: InFlight[Batch] = InFlight()
        self.assignment = Assignment(self.consumer, config, slot, self)
        self.watch = QueueWatch(config, self._backpressure, self._broker_state)
        from ingestd import metrics  # after fork: PROMETHEUS_MULTIPROC_DIR is set by now

        self.metrics = metrics

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
                messages = self.consume()
                if not messages or self.abandoned:
                    self.settle()
                    continue
                # The batch in flight is published while this one is decoded and built: if
                # it is accepted by now, its commit goes out before the work, not after.
                self._collect()
                if self.holding is not None:  # while the records could kill the process
                    self.holding.hold(ranges_of(messages))
                batch = self.decode(messages)
                self.build(batch)
                if self.holding is not None:
                    self.holding.hold([])
                self.settle()
                if self.abandoned:
                    break
                self.await_commit(sum(batch.consumed.values()))
                if self.abandoned:
                    break
                if batch.revision != self.assignment.revision:
                    batch = self._without_revoked(batch)
                self.watch.handed_over(len(batch.tasks))
                self._take_rate(batch)
                batch.drop_objects()
                self.inflight.submit(batch, self.publish)
            self.settle()
            if not self.abandoned:
                self.await_commit()
        finally:
            self.close()

    def _tick(self) -> None:
        """Once per loop: beat, say how things stand, and look after the assignment and the
        Celery queue."""
        self._check_fatal()
        if self.parent != os.getppid() and not self.stopping:
            log.warning("the supervisor is gone: stopping")
            self._on_stop(signal.SIGTERM, None)
        if self.rejoin:
            self.rejoin = False
            self.assignment.rejoin(LEAVE_TIMEOUT)
        self._update_status()
        self.assignment.refresh()
        self.watch.check()
        self._check_rate()

    def consume(self) -> list[Message]:
        """The next batch: what was carried over, then what Kafka has, up to the batch size
        (:meth:`decode` cuts it at ``--max-batch-bytes``; ``--max-rate`` caps the size).
        While the partitions are paused (backpressure, the rate limit, ...) nothing is
        handed on: what was carried waits with them. A record a dead worker held goes
        alone (see :mod:`ingestd.quarantine`)."""
        messages = self._consume()
        return self._alone(messages) if self.quarantine.suspected and messages else messages

    def _alone(self, messages: list[Message]) -> list[Message]:
        """The records before the first suspected one; or that one alone, if it is first.
        The rest is carried into the next batches."""
        suspects = self.quarantine.suspects
        for i, msg in enumerate(messages):
            where = msg.topic(), msg.partition(), msg.offset()
            if msg.error() is None and suspects(*where):  # type: ignore[arg-type]
                cut = max(i, 1)
                self.carry[:0] = messages[cut:]
                return messages[:cut]
        return messages

    def _consume(self) -> list[Message]:
        n, carry = self.batch_size, self.carry
        if self.paused_by:
            self.carry += self.consumer.consume(n, self.config.batch_timeout_ms / 1000)
            return []
        if len(carry) >= n:  # a commit wait can carry up to two batches: hand on one
            self.carry = carry[n:]
            return carry[:n]
        self.carry = []
        if carry and _size(carry) >= self.config.max_batch_bytes:
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
        if not got and wait and not self.inflight.busy:
            got = consume(1, config.batch_timeout_ms / 1000)
            if got and n > 1:
                got += consume(n - 1, 0)
        if got and config.linger_ms and len(got) < n:
            got += consume(n - len(got), config.linger_ms / 1000)
        return got

    def decode(self, messages: list[Message]) -> Batch:
        """Validate each record; a task for each valid one, a dead letter for the rest.
        Records of partitions taken away since they were consumed are left out: their new
        owner consumes them again from the committed offset, and a clean rebalance
        repeats nothing.

        A batch holds runs of records of one partition, in offset order: what is the
        same for a whole run (ownership; the timestamp, for the latency metric) is
        looked at once per run, not once per record."""
        batch = Batch(revision=self.assignment.revision)
        owned = self.assignment.owned
        # Bound to locals: this loop runs once per record.
        check = self.validator.check
        # A Task from its fields in C: NamedTuple's own __new__ is Python, twice the cost.
        new, task, add_task = tuple.__new__, dispatch.Task, batch.tasks.append
        offsets, consumed = batch.offsets, batch.consumed
        each = self.config.dispatch == "each"
        with_metadata = self.config.with_metadata
        read_headers, headers_size = rdkafka.headers, rdkafka.headers_size
        size, max_size = 0, self.config.max_batch_bytes
        quarantine = self.quarantine or None
        slices: dict[tuple[str, int], tuple[str, list[bytes], list[Any], list[str],
                                            list[dict[str, Any]] | None]] = {}
        oldest = 0
        run: tuple[str, int] | None = None  # the partition of the current run
        mine = False
        prefix = ""  # of the run's record ids
        for i, msg in enumerate(messages):
            if size >= max_size:  # the rest is the next batch's
                self.carry[:0] = messages[i:]
                messages = messages[:i]
                break
            headers = read_headers(msg)  # None, and cheap, for a record without headers
            key = msg.key()
            extra = (len(key) if key else 0) + (headers_size(headers) if headers else 0)
            size += len(msg) + extra
            err = msg.error()
            if err is not None:
                self._on_message_error(err)
                run = None
                continue
            # Set on every message without an error.
            topic: str = msg.topic()  # type: ignore[assignment]
            partition: int = msg.partition()  # type: ignore[assignment]
            offset: int = msg.offset()  # type: ignore[assignment]
            if run is None or partition != run[1] or topic != run[0]:
                run = (topic, partition)
                prefix = f"{topic}-{partition}-"
                mine = run in owned
                if mine:  # a run's first record stands for its run's timestamps
                    ts = msg.timestamp()[1]
                    if ts > 0 and (ts < oldest or not oldest):
                        oldest = ts
            if not mine:
                continue
            offsets[run] = offset + 1
            consumed[topic] = consumed.get(topic, 0) + 1
            if quarantine is not None and quarantine.holds(topic, partition, offset):
                batch.letters.append(_letter(msg, INTERNAL, QUARANTINED, headers))
                continue
            raw = msg.value()
            try:
                obj = check(raw, extra)
            except RecordError as exc:
                batch.letters.append(_letter(msg, exc.reason, exc.detail, headers))
                continue
            except Exception as exc:  # a bug or a library's limit: this record's alone
                batch.letters.append(_letter(msg, INTERNAL, _describe(exc), headers))
                continue
            assert raw is not None  # check() refuses tombstones
            if each:
                add_task(new(task, (f"{prefix}{offset}", topic, [raw], [obj], None,
                                    [kafka_metadata(msg, headers)] if with_metadata else None,
                                    trace_context(headers) if headers else None)))
            else:
                _, raws, objs, ids, meta = slices.setdefault(
                    run, (topic, [], [], [], [] if with_metadata else None))
                raws.append(raw)
                objs.append(obj)
                ids.append(f"{prefix}{offset}")
                if meta is not None:
                    meta.append(kafka_metadata(msg, headers))
        for topic, raws, objs, ids, meta in slices.values():
            add_task(dispatch.slice_task(topic, raws, objs, ids, meta))
        batch.oldest_ms = oldest
        batch.records = messages
        return batch

    def build(self, batch: Batch) -> None:
        """The batch's messages. A record that cannot be built (any exception) becomes a
        dead letter (``internal``) on its own; the others are built as usual. So does a
        record whose task the broker would refuse as too large (:func:`fitting`)."""
        if self.task_bound > self.config.task_limit:
            batch.tasks, letters = fitting(self.dispatcher.task_size, self.config.task_limit,
                                           batch.tasks, batch.records)
            batch.letters += letters
        try:
            batch.messages = self.dispatcher.prepare(batch.tasks)
        except Exception:
            batch.tasks, letters = buildable(self.dispatcher.prepare, batch.tasks, batch.records)
            batch.letters += letters
            batch.messages = self.dispatcher.prepare(batch.tasks)
        batch.records = []

    def _without_revoked(self, batch: Batch) -> Batch:
        """The batch less the records of partitions taken away while it waited (see
        :meth:`decode`), before it is published or a refused batch is retried: their new
        owner consumes them again. Messages of the partitions kept are not built again,
        and a retry still sends only what the broker did not accept."""
        owned = self.assignment.owned
        gone = {p for p in batch.offsets if p not in owned}
        if not gone:
            return dataclasses.replace(batch, revision=self.assignment.revision)

        def kept(letters: list[DeadLetter]) -> list[DeadLetter]:
            return [x for x in letters if (x.topic, x.partition) not in gone]

        return dataclasses.replace(
            batch, tasks=[t for t in batch.tasks if (t.topic, t.partition()) not in gone],
            letters=kept(batch.letters), unsent=None if batch.unsent is None
            else kept(batch.unsent), revision=self.assignment.revision,
            offsets={k: v for k, v in batch.offsets.items() if k not in gone},
            messages=self.dispatcher.without(batch.messages, gone))

    def publish(self, batch: Batch) -> None:
        """On the in-flight thread: dead letters, then tasks; raises DispatchError when
        either is refused. Nothing here touches the consumer."""
        unsent = batch.letters if batch.unsent is None else batch.unsent
        if unsent and self.dlq is not None:
            try:
                self.dlq.send(unsent)
            except DeadLetterError as exc:  # a retry sends only what was not delivered
                batch.unsent = exc.undelivered
                raise
        batch.unsent = []
        started = time.perf_counter()
        self.dispatcher.send(batch.messages)
        # Now, not when this thread's result is collected: a queue depth asked in between
        # would count the batch twice. (The loop hands a batch over only when this thread
        # is idle, so the two threads never change the count at once.)
        self.watch.accepted(len(batch.tasks))
        self.metrics.dispatch_seconds.observe(time.perf_counter() - started)
        self._count(batch)

    # --- the batch in flight ----------------------------------------------

    def settle(self) -> None:
        """Wait for the batch in flight and store its offsets once the broker accepted it.
        A refused batch is retried here, with the partitions paused, until it is accepted;
        a stop that leaves no time for it abandons it, and nothing after it is published
        or stored."""
        if not self.inflight.wait(SLOW):
            self._serve(lambda: self.inflight.wait(0), float("inf"), "publish",
                        "waiting for the Celery broker to accept a batch")
        self._collect()
        attempt = 0
        while self.refused is not None and not self.abandoned:
            batch, exc = self.refused
            delay = min(self.config.retry_max_backoff, RETRY_INITIAL_BACKOFF * 2 ** attempt)
            delay *= random.uniform(0.5, 1.0)
            attempt += 1
            self.broker_log.warning("%s; retrying in %.1fs (attempt %d), partitions paused",
                                    exc, delay, attempt)
            self._refused_state(exc)
            if self._serve(lambda: False, delay, "broker", ""):
                self.refused = None
                if batch.revision != self.assignment.revision:
                    batch = self._without_revoked(batch)
                self.inflight.submit(batch, self.publish)
                self._serve(lambda: self.inflight.wait(0), float("inf"), "broker", "")
                self._collect()
        if self.abandoned and (self.refused or self.inflight.busy):
            log.warning("stopping with a batch the broker did not accept; it and the records "
                        "after it were not committed and will be consumed again")

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
        self._refused_state(None)
        self.offsets.store(batch.offsets, sum(batch.consumed.values()))

    def await_commit(self, records: int | None = None) -> None:
        """Before the next batch (of ``records``; None: none follows) is published: the last
        batch's commit is confirmed, so that a crash repeats at most one full batch. Under
        light load batches are small, and the next one goes out at once while it and the
        records whose commit is still unconfirmed (:attr:`Offsets.at_risk`) fit in
        ``--batch-size``: a small batch then waits for no commit round trip. The commit
        was sent before this batch was built and usually is confirmed by now. librdkafka
        puts commit results ahead of the fetched records, so a consume of one record
        serves it; what such consumes return is carried into the next batches: up to a
        batch (in records or bytes) at once, then one record a millisecond, and past two
        batches (a commit slower than a second, say while the group coordinator moves)
        the partitions are paused."""
        pending = self.offsets.unconfirmed
        # --batch-size, not the --max-rate cap: the bound on what a crash repeats.
        n, max_size = self.config.batch_size, self.config.max_batch_bytes
        if pending and records is not None and self.offsets.at_risk + records <= n:
            return
        deadline = time.monotonic() + SLOW
        size = _size(self.carry) if pending else 0
        while (pending and len(self.carry) < 2 * n and size < 2 * max_size
               and time.monotonic() < deadline):
            got = self.consumer.consume(1, COMMIT_POLL)
            if got:
                self.carry += got
                size += len(got[0])
            if pending and (len(self.carry) >= n or size >= max_size):
                time.sleep(COMMIT_POLL)
        while pending and not self.abandoned:
            if self._serve(lambda: not pending, COMMIT_AGAIN, "commit", COMMIT_STATUS) \
                    and pending:
                self.kafka_log.warning("offset commit not confirmed for %.0fs (%d records at "
                                       "risk): committing again, partitions paused",
                                       COMMIT_AGAIN, self.offsets.at_risk)
                self.offsets.commit(asynchronous=True)

    def _serve(self, done: Callable[[], bool], seconds: float, why: str, status: str) -> bool:
        """Serve Kafka with every partition paused until ``done()`` or ``seconds`` pass:
        group membership, rebalances and callbacks go on. Records that come all the same
        (fetched before the pause took effect) are the next ones in order: they are
        carried into the next batch, not dropped and sought back to, because a seek on a
        paused partition can leave librdkafka's fetcher stopped after the resume. False
        when a stop leaves no more time: the caller's batch is abandoned."""
        self._pause(why, True)
        self.waiting = status
        deadline = time.monotonic() + seconds
        try:
            while not done() and (left := deadline - time.monotonic()) > 0:
                if time.monotonic() > self.give_up_at:
                    self.abandoned = True
                    return False
                self._check_fatal()
                self._update_status()
                self.carry += self.consumer.consume(self.config.batch_size, min(left, SLICE))
            return True
        finally:
            self.waiting = ""
            self._pause(why, False)

    # --- partitions coming and going (called inside consume()) --------------

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """New partitions start paused while any pause reason holds."""
        self._owned(partitions, True)
        if self.paused_by:
            self.consumer.pause(partitions)

    def revoking(self, partitions: list[TopicPartition]) -> None:
        """Let the batch in flight finish, so that its offsets are stored before the
        partitions go: librdkafka commits them as part of the revoke. The in-flight thread
        never needs the consumer, so this wait cannot wait for itself."""
        deadline = time.monotonic() + REVOKE_WAIT
        while not self.inflight.wait(SLICE) and time.monotonic() < deadline:
            self.beat(self.status)
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
        gone = {(tp.topic, tp.partition) for tp in partitions}
        if gone and self.carry:
            self.carry = [m for m in self.carry if (m.topic(), m.partition()) not in gone]

    def _owned(self, partitions: list[TopicPartition], owned: bool) -> None:
        """What ``ingestd status`` shows: which partitions this worker owns. A partition
        given up shows no lag here any more (another worker reports it)."""
        slot = str(self.slot)
        for tp in partitions:
            self.metrics.assigned_partitions.labels(slot, tp.topic, str(tp.partition)).set(
                1 if owned else 0)
            if not owned:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(0)

    # --- state ------------------------------------------------------------

    def _pause(self, why: str, on: bool) -> None:
        """Pause the assigned partitions while any reason (broker, backpressure, a slow
        publish or commit, the rate limit) holds."""
        before = bool(self.paused_by)
        if on:
            self.paused_by.add(why)
        else:
            self.paused_by.discard(why)
        log.debug("%s %s: partitions paused by %s", "pause" if on else "unpause", why,
                  sorted(self.paused_by) or "nothing")
        if before != bool(self.paused_by):
            tps = self.consumer.assignment()
            if self.paused_by:
                self.consumer.pause(tps)
            else:
                self.consumer.resume(tps)

    def _take_rate(self, batch: Batch) -> None:
        """--max-rate: take the batch's signals from the host's bucket. The batch goes out
        all the same; if that took the bucket into debt, the partitions pause until it is
        out of it (:meth:`_check_rate`)."""
        if self.rate_limit is None:
            return
        self._rate_pause(self.rate_limit.take(sum(len(t.raws) for t in batch.tasks)))

    def _check_rate(self) -> None:
        """Once per loop: pause while the host is over --max-rate (other workers may have
        taken the bucket into debt), resume once it is not."""
        if self.rate_limit is None or time.monotonic() < self.rate_paused_until:
            return
        self._rate_pause(self.rate_limit.debt())

    def _rate_pause(self, wait: float) -> None:
        """Paused for ``wait`` seconds (the bucket's debt) when it is > 0, else resumed."""
        paused = "rate" in self.paused_by
        if wait > 0:
            self.rate_paused_until = time.monotonic() + wait
            if not paused:
                self._pause("rate", True)
                self.metrics.rate_limited.set(1)
        elif paused:
            self._pause("rate", False)
            self.metrics.rate_limited.set(0)

    def _backpressure(self, on: bool) -> None:
        self._pause("backpressure", on)
        self.metrics.backpressure_paused.set(1 if on else 0)

    def _refused_state(self, exc: DispatchError | None) -> None:
        """A batch was refused (by the Celery broker or the dead-letter topic), or accepted
        (None: both took it)."""
        if exc is None or isinstance(exc, DeadLetterError):
            self._dlq_state(exc)
        if not isinstance(exc, DeadLetterError):
            self._broker_state(exc)

    def _broker_state(self, exc: DispatchError | None) -> None:
        error = f"celery broker unreachable: {exc}"[:300] if exc else ""
        if error == self.broker_error:
            return
        if exc is None:
            log.info("celery broker reachable again")
        else:
            self.broker_log.warning("%s", exc)
        self.broker_error = error
        self._update_status()

    def _dlq_state(self, exc: DeadLetterError | None) -> None:
        error = str(exc)[:300] if exc else ""
        if error == self.dlq_error:
            return
        if exc is None:
            log.info("dead-letter topic accepts letters again")
        self.dlq_error = error
        self.metrics.dlq_refused.set(1 if exc else 0)
        self._update_status()

    def _update_status(self) -> None:
        """The status line the supervisor reads for /readyz: ``ready`` or why not."""
        if self.fetch_error and time.monotonic() - self.fetch_error_at > FETCH_ERROR_KEPT:
            self.fetch_error = ""
            self.metrics.fetch_too_large.set(0)
        if self.broker_error or self.dlq_error or self.fetch_error:
            self.status = self.broker_error or self.dlq_error or self.fetch_error
        elif self.waiting:
            self.status = self.waiting
        elif not self.assignment.joined:
            self.status = "waiting for partition assignment"
        else:
            self.status = READY
        self.beat(self.status)

    def _count(self, batch: Batch) -> None:
        """Metrics, once per batch (not per record), and the rate-limited invalid log."""
        m = self.metrics
        for topic, n in batch.consumed.items():
            m.consumed.labels(topic).inc(n)
        m.batch_size.observe(sum(batch.consumed.values()))
        dispatched: dict[str, int] = {}
        for task in batch.tasks:
            dispatched[task.topic] = dispatched.get(task.topic, 0) + len(task.raws)
        for topic, n in dispatched.items():
            m.dispatched.labels(topic, self.config.route_of(topic).task).inc(n)
        if dispatched:
            m.worker_dispatched.labels(str(self.slot)).inc(sum(dispatched.values()))
        invalid: dict[tuple[str, str], int] = {}
        for letter in batch.letters:
            key = (letter.topic, letter.reason)
            invalid[key] = invalid.get(key, 0) + 1
            self.invalid_log.warning("invalid record %s-%d-%d (%s): %s", letter.topic,
                                     letter.partition, letter.offset, letter.reason,
                                     letter.detail[:200])
        for (topic, reason), n in invalid.items():
            m.invalid.labels(topic, reason).inc(n)
            if self.dlq is not None:
                m.dlq_produced.labels(topic).inc(n)
        if batch.oldest_ms and batch.tasks:
            m.end_to_end_latency.observe(max(0.0, time.time() - batch.oldest_ms / 1000))

    # --- Kafka callbacks and signals ---------------------------------------

    def _commit_failed(self, err: KafkaError) -> None:
        if _fatal(err):
            self.fatal = err
        self.metrics.commit_failures.inc()
        self.kafka_log.warning("offsets not stored or committed: %s", err.str())

    def _on_kafka_error(self, err: KafkaError) -> None:
        if _fatal(err):
            self.fatal = err
            return
        self.kafka_log.warning("%s (librdkafka retries)", err.str())
        if err.code() == KafkaError._BAD_MSG and TOO_LARGE_TO_FETCH in err.str():
            # A record larger than the consumer takes: no fetch from that broker can
            # succeed, and librdkafka retries forever. Say so, and what to raise.
            self.fetch_error = (
                "a record too large to fetch stops consuming from a broker: raise -X "
                f"receive.message.max.bytes (and -X fetch.max.bytes below it): {err.str()}"
            )[:300]
            self.fetch_error_at = time.monotonic()
            self.metrics.fetch_too_large.set(1)

    def _on_message_error(self, err: KafkaError) -> None:
        if _fatal(err):
            self.fatal = err
        elif err.code() != KafkaError._PARTITION_EOF:
            self.kafka_log.warning("%s", err.str())

    def _check_fatal(self) -> None:
        if self.fatal is not None:
            raise KafkaFatalError(f"fatal Kafka error: {self.fatal.str()}; exiting so that "
                                  "a fresh worker rejoins")

    def _on_stats(self, stats_json: str) -> None:
        import orjson

        stats: dict[str, Any] = orjson.loads(stats_json)
        gauge = self.metrics.consumer_lag
        for topic, tdata in stats.get("topics", {}).items():
            for pid, pdata in tdata.get("partitions", {}).items():
                lag = pdata.get("consumer_lag", -1)
                # Owned only: a report made while a partition was being revoked would
                # otherwise set the lag of a partition this worker no longer has.
                if (pid != "-1" and lag >= 0 and pdata.get("fetch_state") == "active"
                        and (topic, int(pid)) in self.assignment.owned):
                    gauge.labels(topic, pid).set(lag)

    def _on_stop(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            budget = DRAIN_SHARE * self.config.drain_timeout
            if self.parent != os.getppid():  # the supervisor died: nobody waits for us
                budget = min(budget, ORPHAN_DRAIN)
            self.give_up_at = time.monotonic() + budget
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
        try:
            if self.fatal is None:
                self.offsets.commit(asynchronous=False)
            if self.leave_group and self.fatal is None:
                self.assignment.leave(LEAVE_TIMEOUT)
            self.consumer.close()
        except KafkaException as exc:
            log.warning("consumer close: %s", exc.args[0].str())
        if self.dlq is not None:
            self.dlq.close()
        self.watch.close()
        self.dispatcher.close()


def validator(config: Config) -> Validator:
    """The worker's validator. In each mode a task's argsrepr comes from the record's bytes
    (codec.record_argsrepr): the validator keeps nothing, and builds only the struct it
    validates with."""
    return Validator(config.schema, config.max_record_bytes, config.max_record_items,
                     typed=config.dispatch == "each" and codec.native is not None)


def task_bound(config: Config) -> int:
    """More than any task's message can take, given the record and batch limits: base64
    takes 4/3 of the records' bytes, ``--with-metadata`` adds about as much again of
    their keys and headers, and each message and record some fixed overhead. Within the
    broker's limit (by default, always), tasks are never measured."""
    records = config.max_record_bytes if config.dispatch == "each" else \
        config.max_batch_bytes + config.max_record_bytes
    per_record = RECORD_OVERHEAD + max(map(len, config.topic))
    return 2 * records + per_record * config.batch_size + MESSAGE_OVERHEAD


def fitting(size_of: Callable[[dispatch.Task], int], limit: int, tasks: list[dispatch.Task],
            records: list[Message]) -> tuple[list[dispatch.Task], list[DeadLetter]]:
    """``tasks`` with each whose message is over ``limit`` bytes split into smaller ones
    (batch dispatch), and the dead letters (``too_large``) of records whose own task is
    over it."""
    by_offset = _by_offset(records)
    kept: list[dispatch.Task] = []
    letters: list[DeadLetter] = []

    def fit(task: dispatch.Task) -> None:
        quick = (2 * sum(map(len, task.raws)) + MESSAGE_OVERHEAD
                 + (RECORD_OVERHEAD + len(task.topic)) * len(task.raws))
        if task.meta is not None:
            quick += 2 * len(orjson.dumps(task.meta))
        size = 0 if quick <= limit else size_of(task)
        if size <= limit:
            kept.append(task)
        elif len(task.raws) == 1:
            rid = task.ids[0] if task.ids else task.task_id
            letters.append(_letter_of(by_offset, task.topic, rid, TOO_LARGE,
                                      f"its task message is {size} bytes > {limit} (the "
                                      "Celery broker's limit, --max-task-bytes)"))
        else:
            assert task.ids is not None
            half = len(task.raws) // 2
            for part in (slice(0, half), slice(half, None)):
                fit(dispatch.slice_task(task.topic, task.raws[part], task.objs[part],
                                        task.ids[part],
                                        None if task.meta is None else task.meta[part]))

    for task in tasks:
        fit(task)
    return kept, letters


def buildable(prepare: Callable[[list[dispatch.Task]], Any], tasks: list[dispatch.Task],
              records: list[Message]) -> tuple[list[dispatch.Task], list[DeadLetter]]:
    """``tasks`` less the records whose message fails to build, and their dead letters
    (``internal``, or the reason a :class:`RecordError` names). A batch task that fails
    is built again from the records that do build."""
    by_offset = _by_offset(records)
    kept, letters = [], []
    for task in tasks:
        if _fails(prepare, task) is None:
            kept.append(task)
            continue
        ids = task.ids or [task.task_id]
        meta: list[Any] = list(task.meta or ()) or [None] * len(ids)
        good = []
        for rid, raw, obj, m in zip(ids, task.raws, task.objs, meta, strict=True):
            one = dispatch.Task(rid, task.topic, [raw], [obj], task.ids and [rid],
                                None if m is None else [m], task.trace)
            exc = _fails(prepare, one)
            if exc is None:
                good.append(one)
                continue
            reason, detail = (exc.reason, exc.detail) if isinstance(exc, RecordError) \
                else (INTERNAL, _describe(exc))
            letters.append(_letter_of(by_offset, task.topic, rid, reason, detail))
        if task.ids is None:
            kept += good
        elif good:
            kept.append(dispatch.slice_task(task.topic, [t.raws[0] for t in good],
                                            [t.objs[0] for t in good],
                                            [t.task_id for t in good],
                                            None if task.meta is None else
                                            [t.meta[0] for t in good if t.meta]))
    return kept, letters


def _by_offset(records: list[Message]) -> dict[tuple[str, int, int], Message]:
    return {(m.topic(), m.partition(), m.offset()): m for m in records}  # type: ignore[misc]


def _letter_of(by_offset: dict[tuple[str, int, int], Message], topic: str, record_id: str,
               reason: str, detail: str) -> DeadLetter:
    """The dead letter of the record whose id (``<topic>-<partition>-<offset>``) is given."""
    partition, offset = map(int, record_id[len(topic) + 1:].split("-"))
    msg = by_offset[(topic, partition, offset)]
    return _letter(msg, reason, detail, rdkafka.headers(msg))


def _fails(prepare: Callable[[list[dispatch.Task]], Any], task: dispatch.Task) -> Exception | None:
    try:
        prepare([task])
    except Exception as exc:
        return exc
    return None


def _size(messages: list[Message]) -> int:
    """The bytes of the records: values, keys and headers."""
    size = 0
    for msg in messages:
        headers, key = rdkafka.headers(msg), msg.key()
        size += len(msg) + (len(key) if key else 0) + rdkafka.headers_size(headers)
    return size


def _letter(msg: Message, reason: str, detail: str,
            headers: list[rdkafka.Header] | None) -> DeadLetter:
    """The dead letter of a consumed record (``msg`` has no error) whose headers are
    ``headers``."""
    return DeadLetter(cast(str, msg.topic()), cast(int, msg.partition()),
                      cast(int, msg.offset()), msg.timestamp()[1], msg.key(), msg.value(),
                      reason, detail, headers)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _fatal(err: KafkaError) -> bool:
    """librdkafka reports a fatal error (fencing, an instance id still in use) to the
    error callback and as a consumed error with the code _FATAL, where ``fatal()`` is
    False."""
    return bool(err.fatal()) or err.code() == KafkaError._FATAL
