"""One worker process: Kafka → validated signals → Celery tasks, at-least-once.

The loop reads top to bottom: consume → decode/validate → build messages →
publish → store offsets. Publishing, storing and committing a batch run on the
in-flight thread (:mod:`ingestd.inflight`) while this one consumes and builds
the next batch. An offset is stored only after every record at or below it
was accepted by the Celery broker or delivered to the dead-letter topic, and
a batch's offsets are committed before the next batch is published.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from ingestd import dispatch, kafka, logs
from ingestd.assignment import Assignment
from ingestd.backpressure import QueueWatch
from ingestd.config import Config
from ingestd.dlq import DeadLetter, DeadLetterProducer
from ingestd.errors import DispatchError, KafkaFatalError, RecordError
from ingestd.heartbeat import READY, REPLACE
from ingestd.inflight import InFlight
from ingestd.schema import Validator

log = logs.get("worker")
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
RETRY_INITIAL_BACKOFF = 0.1
# The in-flight thread needs the GIL to start and to finish its round trips;
# at the default 5 ms switch interval that wait alone would rival them.
SWITCH_INTERVAL = 0.0005
DRAIN_SHARE = 0.8  # of --drain-timeout, spent retrying an unsent batch after a stop
LEAVE_TIMEOUT = 3.0


@dataclass
class Batch:
    """A consumed batch, split into what to dispatch and what to dead-letter."""

    tasks: list[dispatch.Task] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to consume
    consumed: dict[str, int] = field(default_factory=dict)  # per topic
    oldest_ms: int = 0
    messages: Any = None  # what the dispatcher built from ``tasks``
    letters_sent: bool = False  # a retry must not send them again


class Worker:
    """Owns one consumer, one Celery dispatcher and one dead-letter producer."""

    def __init__(self, config: Config, slot: int = 0,
                 beat: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.slot = slot
        self.beat = beat or (lambda status: None)
        self.stopping = False
        self.leave_group = True  # on a stop; not when a successor takes over (REPLACE)
        self.give_up_at = float("inf")
        self.paused_by: set[str] = set()
        self.fatal: KafkaError | None = None
        self.broker_error = ""
        self.status = ""
        self.validator = Validator(config.schema, config.max_record_bytes)
        self.dispatcher = dispatch.create(config)
        self.task_name = config.batch_task if config.dispatch == "batch" else config.task
        dlq_topic = config.dead_letter_topic
        self.dlq = (DeadLetterProducer(dlq_topic, {**kafka.producer_config(config),
                                                   "logger": LIBRDKAFKA_LOG})
                    if dlq_topic else None)
        self.invalid_log = logs.RateLimited(logs.get("invalid_record"))
        self.kafka_log = logs.RateLimited(logs.get("kafka"))
        self.broker_log = logs.RateLimited(logs.get("broker"), burst=1)
        props = kafka.consumer_config(config, slot)
        props.update(error_cb=self._on_kafka_error, stats_cb=self._on_stats,
                     logger=LIBRDKAFKA_LOG)
        self.consumer = Consumer(props)
        self.inflight: InFlight[Batch] = InFlight()
        self.assignment = Assignment(self.consumer, config, slot, self._commit_on_revoke,
                                     self._update_status)
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
        if stops_before:
            self._on_stop(stops_before[0], None)
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.assignment.start()
        self._update_status()
        n, timeout = self.config.batch_size, self.config.batch_timeout_ms / 1000
        try:
            while not self.stopping:
                self.beat(self.status)
                self.assignment.refresh()
                self.watch.check()
                messages = self.consumer.consume(n, timeout)
                if not messages:
                    self._check_fatal()
                    self.settle()
                    continue
                batch = self.decode(messages)
                batch.messages = self.dispatcher.prepare(batch.tasks)
                self.settle()
                self.watch.handed_over(len(batch.tasks))
                self.inflight.submit(batch, self.publish_and_store)
            self.settle()
        finally:
            self.close()

    def decode(self, messages: list[Message]) -> Batch:
        """Validate each record; a task for each valid one, a dead letter for the rest."""
        batch = Batch()
        # Bound to locals: this loop runs once per record.
        check = self.validator.check
        task, add_task = dispatch.Task, batch.tasks.append
        offsets, consumed = batch.offsets, batch.consumed
        each = self.config.dispatch == "each"
        slices: dict[tuple[str, int], tuple[int, int, list[bytes], list[Any]]] = {}
        oldest = 0
        for msg in messages:
            err = msg.error()
            if err is not None:
                self._on_message_error(err)
                continue
            # Set on every message without an error.
            topic, partition, offset = cast(tuple[str, int, int],
                                            (msg.topic(), msg.partition(), msg.offset()))
            offsets[(topic, partition)] = offset + 1
            consumed[topic] = consumed.get(topic, 0) + 1
            ts = msg.timestamp()[1]
            if ts > 0 and (ts < oldest or not oldest):
                oldest = ts
            raw = msg.value()
            try:
                obj = check(raw)
            except RecordError as exc:
                batch.letters.append(DeadLetter(topic, partition, offset, ts, msg.key(), raw,
                                                exc.reason, exc.detail))
                continue
            assert raw is not None  # check() refuses tombstones
            if each:
                add_task(task(f"{topic}-{partition}-{offset}", topic, [raw], [obj]))
            else:
                first, _, raws, objs = slices.get((topic, partition), (offset, 0, [], []))
                raws.append(raw)
                objs.append(obj)
                slices[(topic, partition)] = (first, offset, raws, objs)
        for (topic, partition), (first, last, raws, objs) in slices.items():
            add_task(task(f"{topic}-{partition}-{first}-{last}", topic, raws, objs))
        batch.oldest_ms = oldest
        return batch

    def publish_and_store(self, batch: Batch) -> None:
        """On the in-flight thread: dead letters, then tasks, then offsets; raises
        DispatchError (nothing stored) when either is refused."""
        if batch.letters and self.dlq is not None and not batch.letters_sent:
            self.dlq.send(batch.letters)
            batch.letters_sent = True
        started = time.perf_counter()
        self.dispatcher.send(batch.messages)
        self.metrics.dispatch_seconds.observe(time.perf_counter() - started)
        self._count(batch)
        self.store(batch)

    def store(self, batch: Batch) -> None:
        """Store the next offset of every partition in the batch, and commit it."""
        offsets = [TopicPartition(t, p, o) for (t, p), o in batch.offsets.items()]
        if not offsets:
            return
        try:
            self.consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:
            # A partition revoked while the batch was in flight: its new owner
            # repeats these records, so there is nothing to store here.
            log.info("offsets not stored (%s)", exc.args[0].str())
        self.commit()

    # --- the batch in flight ----------------------------------------------

    def settle(self) -> None:
        """Wait for the batch in flight; if the broker refused it, retry it here until it
        is accepted, keeping the partitions paused and the group membership alive."""
        done = self.inflight.wait()
        if done is not None:
            self.watch.accepted(len(done.tasks))
            self._broker_state(None)
        failed = self.inflight.take_failed()
        if failed is None:
            return
        batch, exc = failed
        attempt = 0
        self._pause("broker", True)
        while True:
            delay = min(self.config.retry_max_backoff, RETRY_INITIAL_BACKOFF * 2 ** attempt)
            delay *= random.uniform(0.5, 1.0)
            attempt += 1
            self.broker_log.warning("%s; retrying in %.1fs (attempt %d), partitions paused",
                                    exc, delay, attempt)
            self._broker_state(exc)
            if not self._wait(delay):
                log.warning("stopping with a batch the broker did not accept; its records "
                            "were not committed and will be consumed again")
                return
            try:
                self.publish_and_store(batch)
                break
            except DispatchError as again:
                exc = again
        self.watch.accepted(len(batch.tasks))
        self._broker_state(None)
        self._pause("broker", False)

    def _wait(self, seconds: float) -> bool:
        """Serve Kafka (group membership, callbacks) for ``seconds`` while paused.
        False when a stop leaves no more time to retry."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if time.monotonic() > self.give_up_at:
                return False
            self.beat(self.status)
            for msg in self.consumer.consume(self.config.batch_size, min(left, 0.5)):
                # Paused partitions deliver nothing; should one slip through,
                # rewind so it is consumed again after the resume.
                if msg.error() is None:
                    self.consumer.seek(TopicPartition(*cast(tuple[str, int, int], (
                        msg.topic(), msg.partition(), msg.offset()))))
            self._check_fatal()
        return True

    def commit(self) -> None:
        """Commit the stored offsets synchronously; nothing stored is not an error."""
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() != KafkaError._NO_OFFSET:
                self.metrics.commit_failures.inc()
                self.kafka_log.warning("offset commit failed: %s", err.str())

    def _commit_on_revoke(self) -> None:
        done = self.inflight.wait()  # its offsets are stored before the partitions go
        if done is not None:
            self.watch.accepted(len(done.tasks))
        self.commit()

    # --- state ------------------------------------------------------------

    def _pause(self, why: str, on: bool) -> None:
        """Pause the assigned partitions while any reason (broker, backpressure) holds."""
        before = bool(self.paused_by)
        if on:
            self.paused_by.add(why)
        else:
            self.paused_by.discard(why)
        if before != bool(self.paused_by):
            tps = self.consumer.assignment()
            if self.paused_by:
                self.consumer.pause(tps)
            else:
                self.consumer.resume(tps)

    def _backpressure(self, on: bool) -> None:
        self._pause("backpressure", on)
        self.metrics.backpressure_paused.set(1 if on else 0)

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

    def _update_status(self) -> None:
        """The status line the supervisor reads for /readyz: ``ready`` or why not."""
        if self.broker_error:
            self.status = self.broker_error
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
            m.dispatched.labels(topic, self.task_name).inc(n)
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

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = err
        else:
            self.kafka_log.warning("%s (librdkafka retries)", err.str())

    def _on_message_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = err
        elif err.code() != KafkaError._PARTITION_EOF:
            self.kafka_log.warning("%s", err.str())

    def _check_fatal(self) -> None:
        if self.fatal is not None:
            raise KafkaFatalError(f"fatal Kafka error: {self.fatal.str()}")

    def _on_stats(self, stats_json: str) -> None:
        import orjson

        stats: dict[str, Any] = orjson.loads(stats_json)
        gauge = self.metrics.consumer_lag
        for topic, tdata in stats.get("topics", {}).items():
            for pid, pdata in tdata.get("partitions", {}).items():
                lag = pdata.get("consumer_lag", -1)
                if pid != "-1" and lag >= 0 and pdata.get("fetch_state") == "active":
                    gauge.labels(topic, pid).set(lag)

    def _on_stop(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            self.give_up_at = time.monotonic() + DRAIN_SHARE * self.config.drain_timeout
            self.leave_group = signum != REPLACE

    def close(self) -> None:
        """Commit what was stored and leave the group."""
        self.inflight.close()
        self.commit()
        # librdkafka's close waits for a pending rebalance with no bound; the offsets
        # are committed by now, so a close that overruns the drain is abandoned.
        closing = threading.Thread(target=self._leave_and_close, name="close", daemon=True)
        closing.start()
        closing.join(max(1.0, (1 - DRAIN_SHARE) * self.config.drain_timeout - 1.0))
        if closing.is_alive():
            log.warning("consumer close did not finish in time; exiting without it")

    def _leave_and_close(self) -> None:
        if self.leave_group:
            self.assignment.leave(LEAVE_TIMEOUT)
        self.consumer.close()
        if self.dlq is not None:
            self.dlq.close()
        self.watch.close()
        self.dispatcher.close()
