"""One worker process: Kafka → validated signals → Celery tasks, at-least-once.

The loop reads top to bottom: consume → decode/validate → build messages →
publish → store offsets. An offset is stored only after every record at or
below it was accepted by the Celery broker or delivered to the dead-letter
topic, and a batch's offsets are committed before the next batch is published.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from ingestd import dispatch, kafka, logs
from ingestd.assignment import Assignment
from ingestd.config import Config
from ingestd.dlq import DeadLetter, DeadLetterProducer
from ingestd.errors import DispatchError, KafkaFatalError, RecordError
from ingestd.heartbeat import READY
from ingestd.offsets import Committer
from ingestd.schema import Validator

log = logs.get("worker")
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
BACKPRESSURE_CHECK_INTERVAL = 0.25
RETRY_INITIAL_BACKOFF = 0.1
SWITCH_INTERVAL = 0.0005
BROKER_PROBE_INTERVAL = 2.0


@dataclass
class Batch:
    """A consumed batch, split into what to dispatch and what to dead-letter."""

    tasks: list[dispatch.Task] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to consume
    consumed: dict[str, int] = field(default_factory=dict)  # per topic
    oldest_ms: int = 0


class Worker:
    """Owns one consumer, one Celery dispatcher and one dead-letter producer."""

    def __init__(self, config: Config, slot: int = 0,
                 beat: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.slot = slot
        self.beat = beat or (lambda status: None)
        self.stopping = False
        self.paused_by: set[str] = set()
        self.fatal: KafkaError | None = None
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
        self._next_depth_check = 0.0
        self._queue_depth = 0  # last answer plus what was published since
        props = kafka.consumer_config(config, slot)
        props["error_cb"] = self._on_kafka_error
        props["stats_cb"] = self._on_stats
        props["logger"] = LIBRDKAFKA_LOG
        self.consumer = Consumer(props)
        self.committer = Committer(self.consumer, self._on_commit_error)
        self.assignment = Assignment(self.consumer, config, slot, self.committer.commit_now,
                                     self._update_status)
        self.broker_error = ""
        self.status = ""
        self._last_broker_contact = time.monotonic()
        from ingestd import metrics  # after fork: PROMETHEUS_MULTIPROC_DIR is set by now

        self.metrics = metrics

    # --- the loop ---------------------------------------------------------

    def run(self) -> None:
        """Consume until asked to stop, then drain: publish, store, commit, leave."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        # The committer thread needs the GIL to start and to finish a commit;
        # at the default 5 ms switch interval that alone would double the
        # wait before the next publish.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.assignment.start()
        self._update_status()
        n, timeout = self.config.batch_size, self.config.batch_timeout_ms / 1000
        try:
            while not self.stopping:
                self.beat(self.status)
                self.assignment.refresh()
                self._check_broker()
                messages = self.consumer.consume(n, timeout)
                if not messages:
                    self._check_fatal()
                    continue
                batch = self.decode(messages)
                if self.deliver(batch):
                    self.store(batch)
        finally:
            self.close()

    def decode(self, messages: list[Message]) -> Batch:
        """Validate each record; build a task for each valid one, a dead letter for the rest."""
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

    def deliver(self, batch: Batch) -> bool:
        """Dead letters to Kafka, tasks to the Celery broker; retried until both are accepted.

        Returns False when a stop cut the retries short (nothing is stored then).
        """
        letters, tasks = batch.letters, batch.tasks
        attempt = 0
        self.committer.wait()
        while True:
            try:
                if letters and self.dlq is not None:
                    self.dlq.send(letters)
                    letters = []
                started = time.perf_counter()
                self.dispatcher.publish(tasks)
                self.metrics.dispatch_seconds.observe(time.perf_counter() - started)
                self._queue_depth += len(tasks)
                break
            except DispatchError as exc:
                delay = min(self.config.retry_max_backoff, RETRY_INITIAL_BACKOFF * 2 ** attempt)
                delay *= random.uniform(0.5, 1.0)
                attempt += 1
                self.broker_log.warning("%s; retrying in %.1fs (attempt %d), partitions paused",
                                        exc, delay, attempt)
                self._broker_down(exc)
                self._pause("broker")
                if not self._wait(delay) and self.stopping:
                    return False
        self._broker_up()
        self._resume("broker")
        self._count(batch)
        return True

    def store(self, batch: Batch) -> None:
        """Store the next offset of every partition in the batch and commit in the background.

        :meth:`deliver` waits for that commit before it publishes the next batch,
        so a crash repeats at most the batch in flight.
        """
        offsets = [TopicPartition(t, p, o) for (t, p), o in batch.offsets.items()]
        if not offsets:
            return
        try:
            self.consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:
            # A partition revoked while the batch was in flight: its new owner
            # repeats these records, so there is nothing to store here.
            log.info("offsets not stored (%s)", exc.args[0].str())
        self.committer.request()

    def _on_commit_error(self, err: KafkaError) -> None:
        self.metrics.commit_failures.inc()
        self.kafka_log.warning("offset commit failed: %s", err.str())

    # --- helpers ----------------------------------------------------------

    def _count(self, batch: Batch) -> None:
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

    def _wait(self, seconds: float) -> bool:
        """Serve Kafka (group membership, callbacks) for ``seconds`` while paused."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            self.beat(self.status)
            for msg in self.consumer.consume(self.config.batch_size, min(left, 0.5)):
                # Paused partitions deliver nothing; should one slip through,
                # rewind so it is consumed again after the resume.
                if msg.error() is None:
                    self.consumer.seek(TopicPartition(*cast(tuple[str, int, int], (
                        msg.topic(), msg.partition(), msg.offset()))))
            self._check_fatal()
        return not self.stopping

    def _pause(self, why: str) -> None:
        if why not in self.paused_by:
            if not self.paused_by:
                self.consumer.pause(self.consumer.assignment())
            self.paused_by.add(why)

    def _resume(self, why: str) -> None:
        if why in self.paused_by:
            self.paused_by.discard(why)
            if not self.paused_by:
                self.consumer.resume(self.consumer.assignment())

    def _check_broker(self) -> None:
        """Ask the Celery queue's depth now and then: for backpressure, and to notice a
        broker that went away while there was nothing to publish."""
        now = time.monotonic()
        limit = self.config.max_queue_depth
        due = (now >= self._next_depth_check and
               (limit or now - self._last_broker_contact >= BROKER_PROBE_INTERVAL))
        if due:
            self._next_depth_check = now + (BACKPRESSURE_CHECK_INTERVAL if limit
                                            else BROKER_PROBE_INTERVAL)
            try:
                self._queue_depth = self.dispatcher.queue_depth()
            except DispatchError as exc:
                self.broker_log.warning("%s", exc)
                self._broker_down(exc)
                return
            self._broker_up()
        if limit:
            self._check_backpressure()

    def _check_backpressure(self) -> None:
        """Pause while the Celery queue holds more than ``--max-queue-depth`` tasks.

        The queue is asked at most every BACKPRESSURE_CHECK_INTERVAL; between two
        asks, what this worker published is added to the last answer, so a fast
        worker does not overshoot by a whole interval's worth.
        """
        limit, depth = self.config.max_queue_depth, self._queue_depth
        if depth > limit and "backpressure" not in self.paused_by:
            log.info("queue %s holds %d > %d tasks: pausing", self.config.queue, depth, limit)
            self._pause("backpressure")
            self.metrics.backpressure_paused.set(1)
        elif depth < 0.8 * limit and "backpressure" in self.paused_by:
            log.info("queue %s holds %d tasks: resuming", self.config.queue, depth)
            self._resume("backpressure")
            self.metrics.backpressure_paused.set(0)

    def _broker_down(self, exc: DispatchError) -> None:
        self.broker_error = f"celery broker unreachable: {exc}"[:300]
        self._update_status()

    def _broker_up(self) -> None:
        self._last_broker_contact = time.monotonic()
        if self.broker_error:
            log.info("celery broker reachable again")
            self.broker_error = ""
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
        self.stopping = True

    def close(self) -> None:
        """Commit what was stored and leave the group."""
        self.committer.commit_now()
        self.committer.close()
        self.consumer.close()
        if self.dlq is not None:
            self.dlq.close()
        self.dispatcher.close()
