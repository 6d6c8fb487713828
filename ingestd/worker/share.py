"""One worker of a share group (``--group-type share``, experimental): Kafka's share
groups (KIP-932) → Celery tasks, at-least-once, in no order.

A share group hands records, not partitions, to its members: every worker takes
records of every partition, so ``--workers`` may exceed the partition count. Each
record a poll returns is *acquired* by this worker for the group's record lock
(``share.record.lock.duration.ms``, 30 s by default) and must be acknowledged:

- **ACCEPT** once the Celery broker has accepted its task, or the dead-letter topic
  its letter;
- **RELEASE** when the broker refuses the batch for longer than the lock allows (a
  retry in place would then race the lock), or when a stop abandons it: another worker
  gets it again, at once;
- a record a worker dies holding comes back when its lock expires, or sooner, once
  Kafka sees the worker's share session close with its connection.

Kafka counts the deliveries of each record, and archives one delivered
``group.share.delivery.count.limit`` times (5 by default) unacknowledged: it would be
lost. So a record on its last delivery is dead-lettered (``internal``) instead of
dispatched: a record that kills the worker that takes it stops there, after as many
deaths as the limit allows, and nothing reaches the limit without a letter.

Backpressure, ``--max-rate`` and a Celery broker that does not answer (a batch refused
past the lock, or the queue watch's probe) hold the worker back by not polling: it
then holds no record, and no lock runs out. So an outage costs a record at most one
delivery, not one per retry. A worker that does not poll for ``max.poll.interval.ms``
(5 minutes) leaves the group, holding nothing, and rejoins when it polls again. A
refused batch's records whose letters the dead-letter topic took are accepted, the
rest released.

The task ids stay ``<topic>-<partition>-<offset>``: a record delivered again (after a
crash or a release) gets the task id it had.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    AcknowledgeType,
    KafkaError,
    KafkaException,
    Message,
    ShareConsumer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # not in __all__
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)

from ingestd import kafka, logs
from ingestd.celery import dispatch
from ingestd.config import Config
from ingestd.errors import DispatchError
from ingestd.heartbeat import REJOIN, REPLACE
from ingestd.quarantine import Quarantine
from ingestd.ratelimit import RateLimit, batch_size
from ingestd.registry import RegistryUnavailable
from ingestd.schema import INTERNAL
from ingestd.worker.backpressure import QueueWatch
from ingestd.worker.events import KafkaEvents
from ingestd.worker.loop import (
    DRAIN_SHARE,
    LIBRDKAFKA_LOG,
    ORPHAN_DRAIN,
    SLOW,
    SWITCH_INTERVAL,
    backoff,
)
from ingestd.worker.pauses import SLICE, Pauses
from ingestd.worker.pipeline import Batch, Pipeline, letter
from ingestd.worker.publisher import Publisher
from ingestd.worker.status import Status

log = logs.get("worker")
LOCK_MS, DELIVERY_LIMIT = 30000, 5  # Kafka's defaults, until the cluster says otherwise
POLL_TIMEOUT = 0.1  # seconds a poll waits for records: the loop's beat while idle
ADMIN_TIMEOUT = 10.0
# A record delivered this often has come back twice (the workers that had it died, its
# lock ran out, or it was released): it goes alone, so that if it is what kills workers,
# nothing else comes back with it. A record back once (after a crash, or an outage's
# release) still goes in batches.
SUSPECT = 3
JOIN_STATUS = "waiting for the share group"
BROKER_PAUSE = "broker"  # not polling: the Celery broker is unreachable
REGISTRY_PAUSE = "registry"  # not polling: the schema registry does not answer


@dataclass(frozen=True)
class Terms:
    """What the share group promises a record: how long it is locked to the worker that
    took it, and how many deliveries it gets."""

    lock_ms: int = LOCK_MS
    delivery_limit: int = DELIVERY_LIMIT

    @property
    def retry_budget(self) -> float:
        """Seconds after a poll that a refused batch may be retried in place: the lock,
        less a publish's own timeout and a margin for the acknowledgement."""
        return max(0.0, self.lock_ms / 1000 - dispatch.BROKER_TIMEOUT - 2.0)


def agree_terms(config: Config, admin: AdminClient) -> Terms:
    """Set where the group starts (``--offset-reset``: ``share.auto.offset.reset``, the
    group's config, which Kafka defaults to latest) and read its terms. Raises
    KafkaException when the cluster does not answer."""
    group = ConfigResource(ConfigResource.Type.GROUP, config.group_id, incremental_configs=[
        ConfigEntry("share.auto.offset.reset", config.offset_reset,
                    incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([group])[group].result(ADMIN_TIMEOUT)
    described = ConfigResource(ConfigResource.Type.GROUP, config.group_id)
    entries = admin.describe_configs([described])[described].result(ADMIN_TIMEOUT)
    lock = entries.get("share.record.lock.duration.ms")
    broker = str(admin.describe_cluster(request_timeout=ADMIN_TIMEOUT)
                 .result(ADMIN_TIMEOUT).nodes[0].id)
    node = ConfigResource(ConfigResource.Type.BROKER, broker)
    limit = admin.describe_configs([node])[node].result(ADMIN_TIMEOUT).get(
        "group.share.delivery.count.limit")
    return Terms(int(lock.value) if lock is not None and lock.value else LOCK_MS,
                 int(limit.value) if limit is not None and limit.value else DELIVERY_LIMIT)


class NotPolling:
    """What :class:`Pauses` pauses and serves while a share worker holds back: nothing.
    A share consumer has no partitions to pause; a worker that holds back does not
    poll, and a wait's slice is a sleep."""

    batch_size = 0

    def assignment(self) -> list[TopicPartition]:
        return []

    def pause(self, _partitions: list[TopicPartition]) -> None:
        pass

    def resume(self, _partitions: list[TopicPartition]) -> None:
        pass

    def consume(self, _n: int, timeout: float) -> list[Message]:
        time.sleep(timeout)
        return []

    def keep(self, _messages: list[Message]) -> None:
        pass


class ShareWorker:
    """Owns one share consumer, one Celery dispatcher and one dead-letter producer."""

    def __init__(self, config: Config, slot: int = 0,
                 beat: Callable[[str], None] | None = None,
                 rate_limit: RateLimit | None = None) -> None:
        from ingestd import metrics  # after fork: PROMETHEUS_MULTIPROC_DIR is set by now

        self.config = config
        self.slot = slot
        self.metrics = metrics
        self.parent = os.getppid()
        self.stopping = False
        self.joined = False  # a poll has returned since the subscribe
        self.terms = Terms()
        self.status = Status(beat or (lambda line: None), metrics)
        self.events = KafkaEvents(self.status, metrics, set)
        dispatcher = dispatch.create(config)
        props = kafka.share_consumer_config(config, slot)
        props.update(error_cb=self.events.on_error, stats_cb=self.events.on_stats,
                     logger=LIBRDKAFKA_LOG)
        self.consumer = ShareConsumer(props)
        self.consumer.set_acknowledgement_commit_callback(self._acknowledged)
        bucket = (rate_limit or RateLimit(config.max_rate)) if config.max_rate else None
        self.batch_size = batch_size(config.batch_size, config.max_rate)
        idle: Any = NotPolling()
        self.pauses = Pauses(idle, idle, self._waited, bucket, metrics)
        self.pipeline = Pipeline(config, dispatcher, Quarantine(()), self.events.on_record_error)
        self.watch = QueueWatch(config, self.pauses.backpressure, self._broker_state, metrics)
        self.publisher = Publisher(config, slot, dispatcher, self.watch, metrics)
        self.inflight = self.publisher.inflight
        self.ack_log = logs.RateLimited(logs.get("kafka"))
        # Records released because the schema registry did not answer: their schemas are
        # asked for again before the worker polls again.
        self.unresolved: list[Message] = []
        self.resolve_attempt, self.next_resolve = 0, 0.0

    # --- the loop ---------------------------------------------------------

    def run(self, stops_before: list[int] | None = None) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, REPLACE):
            signal.signal(sig, self._on_stop)
        signal.signal(REJOIN, signal.SIG_IGN)  # a share group has no partitions to hand out
        if stops_before:
            self._on_stop(stops_before[0], None)
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            self.terms = self._agree_terms()
            self.consumer.subscribe(list(self.config.topic))
            while not self.stopping:
                self._tick()
                if self.pauses:  # backpressure, the rate limit, the broker: do not poll
                    time.sleep(SLICE)
                    continue
                polled = time.monotonic()
                chunks = self.chunks(self._poll())
                for i, (chunk, alone) in enumerate(chunks):
                    if alone:  # what this worker accepted so far reaches Kafka first
                        self._commit()
                    if not self.handle(chunk, polled):
                        self._release([m for rest, _ in chunks[i + 1:] for m in rest])
                        break
                    if alone:
                        self._commit()
        finally:
            self.close()

    def _tick(self) -> None:
        self.events.check()
        if self.parent != os.getppid() and not self.stopping:
            log.warning("the supervisor is gone: stopping")
            self._on_stop(signal.SIGTERM, None)
        self._update_status()
        self.watch.check()
        self.pauses.check_rate()
        if self.unresolved and time.monotonic() >= self.next_resolve:
            self._resolve_again()

    def _resolve_again(self) -> None:
        """While the schema registry does not answer, the worker holds back; the schemas
        of the records it released are asked for again, with backoff, and once the
        registry answers it polls again."""
        registry = self.pipeline.registry
        assert registry is not None
        try:
            registry.resolve(self.unresolved)
        except RegistryUnavailable as exc:
            delay = backoff(self.config.retry_max_backoff, self.resolve_attempt)
            self.resolve_attempt += 1
            self.next_resolve = time.monotonic() + delay
            self.status.registry(f"{exc}; retrying in {delay:.1f}s (attempt "
                                 f"{self.resolve_attempt}), polling no more until it answers")
            return
        self.unresolved, self.resolve_attempt = [], 0
        self.status.registry("")
        self.pauses.set(REGISTRY_PAUSE, False)

    def _poll(self) -> list[Message]:
        """The records of one poll, errors reported and left out. The acknowledgements of
        the last poll go out with it. A worker that held back longer than
        ``max.poll.interval.ms`` was taken out of the group; this poll rejoins it."""
        try:
            polled = self.consumer.poll(POLL_TIMEOUT).records()
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() != KafkaError._MAX_POLL_EXCEEDED:
                raise
            log.info("held back longer than max.poll.interval.ms: rejoining the share group")
            return []
        self.joined = True
        records: list[Message] = []
        for msg in polled:
            failed = msg.error()
            if failed is None:
                records.append(msg)
            else:
                self.events.on_record_error(failed)
        return records

    def chunks(self, records: list[Message]) -> list[tuple[list[Message], bool]]:
        """A poll's records as batches, and whether each is a suspect alone: a record
        delivered :data:`SUSPECT` times or more may be what killed the workers before; the
        others go first, in batches of ``--batch-size``. (A record on its last delivery
        is dead-lettered in any batch: it cannot kill.)"""
        limit, size = self.terms.delivery_limit, self.batch_size
        suspects = [m for m in records if SUSPECT <= (m.delivery_count() or 1) < limit]
        if suspects:
            chosen = set(map(id, suspects))
            records = [m for m in records if id(m) not in chosen]
            # A death on one suspect sends the suspects after it back, a delivery more. In
            # offset order one delivery, in reverse the next: whichever record kills,
            # every other is taken before it within two deliveries, below the limit.
            suspects.sort(key=lambda m: (m.topic(), m.partition(), m.offset()),
                          reverse=max(m.delivery_count() or 1 for m in suspects) % 2 == 0)
        return ([(records[i:i + size], False) for i in range(0, len(records), size)]
                + [([m], True) for m in suspects])

    def handle(self, records: list[Message], polled: float) -> bool:
        """Dispatch ``records`` (acquired at ``polled``) and acknowledge them: ACCEPT once
        the broker accepted them; RELEASE when it refused them past the lock's budget,
        and then hold back until it answers again. False when they were released."""
        if not records:
            return True
        last: list[Message] = []
        rest: list[Message] = []
        for msg in records:
            (last if (msg.delivery_count() or 1) >= self.terms.delivery_limit
             else rest).append(msg)
        deadline = polled + self.terms.retry_budget
        batch = self._build(rest, deadline)
        if batch is None:
            self._release(records)
            return False
        batch.letters += [letter(msg, INTERNAL, f"delivered {msg.delivery_count()} times, the "
                                 "share group's limit (group.share.delivery.count.limit): "
                                 "the workers it was delivered to before died or let its "
                                 "lock expire") for msg in last]
        if not self._publish(batch, deadline):
            # Those whose letters the dead-letter topic took are done: not sent again.
            unsent = batch.letters if batch.unsent is None else batch.unsent
            done = ({(x.topic, x.partition, x.offset) for x in batch.letters}
                    - {(x.topic, x.partition, x.offset) for x in unsent})
            for msg in records:
                self.consumer.acknowledge(msg, AcknowledgeType.ACCEPT if (
                    msg.topic(), msg.partition(), msg.offset()) in done
                    else AcknowledgeType.RELEASE)
            return False
        for msg in records:
            self.consumer.acknowledge(msg, AcknowledgeType.ACCEPT)
        return True

    def _build(self, records: list[Message], deadline: float) -> Batch | None:
        """The batch of ``records``; None when the schema registry did not answer before
        ``deadline``."""
        registry, attempt = self.pipeline.registry, 0
        while registry is not None:
            try:
                registry.resolve(records)
                self.status.registry("")
                break
            except RegistryUnavailable as exc:
                if not self._retry_wait(attempt, deadline, "registry retry"):
                    self.status.registry(f"{exc}; records released, polling no more until "
                                         "it answers")
                    self.unresolved = records
                    self.pauses.set(REGISTRY_PAUSE, True)
                    return None
                self.status.registry(f"{exc}; retrying (attempt {attempt + 1})")
                attempt += 1
        owned = {(m.topic(), m.partition()) for m in records}
        batch, rest = self.pipeline.decode(records, owned, 0)  # type: ignore[arg-type]
        while rest:  # past --max-batch-bytes: one batch all the same (all are acquired)
            more, rest = self.pipeline.decode(rest, owned, 0)  # type: ignore[arg-type]
            batch.tasks += more.tasks
            batch.letters += more.letters
            batch.records += more.records
        self.pipeline.build(batch)
        batch.drop_objects()
        return batch

    def _publish(self, batch: Batch, deadline: float) -> bool:
        """Publish ``batch`` on the in-flight thread (the heartbeat goes on meanwhile),
        retried with backoff until ``deadline``; True once accepted."""
        signals = sum(len(t.raws) for t in batch.tasks)
        self.pauses.take_rate(signals)
        self.watch.handed_over(len(batch.tasks))
        attempt = 0
        while True:
            self.publisher.hand_over(batch, signals)
            if not self.inflight.wait(SLOW):
                self.pauses.wait(lambda: self.inflight.wait(0), float("inf"), "publish",
                                 "waiting for the Celery broker to accept a batch")
            result = self.inflight.take()
            if result is None:  # a stop left no time for it
                return False
            exc = result[1]
            self.status.refused(exc)
            if exc is None:
                return True
            self.status.broker_log.warning("%s; retrying (attempt %d)", exc, attempt + 1)
            if not self._retry_wait(attempt, deadline, "broker retry"):
                log.warning(
                    "the Celery broker refused a batch for longer than its records' lock "
                    "allows: releasing them to the group, and polling no more until the "
                    "broker answers")
                self.watch.accepted(len(batch.tasks))  # they were not: nothing is unsent
                self.pauses.set(BROKER_PAUSE, True)
                return False
            attempt += 1

    def _retry_wait(self, attempt: int, deadline: float, why: str) -> bool:
        """Wait before retry ``attempt``; False when it would end past ``deadline`` (the
        records' lock) or a stop ended it."""
        delay = backoff(self.config.retry_max_backoff, attempt)
        if self.stopping or time.monotonic() + delay > deadline:
            return False
        return self.pauses.wait(lambda: False, delay, why, "")

    def _release(self, records: list[Message]) -> None:
        """Give ``records`` back to the group at once: another worker may take them."""
        for msg in records:
            self.consumer.acknowledge(msg, AcknowledgeType.RELEASE)

    def _commit(self) -> None:
        """Send the acknowledgements made so far, and wait for Kafka's answer (refusals
        reach :meth:`_acknowledged`)."""
        try:
            self.consumer.commit_sync(ADMIN_TIMEOUT)
        except KafkaException as exc:
            self.ack_log.warning("acknowledgements not sent (%s): their records are delivered "
                                 "again", exc.args[0].str())

    def _agree_terms(self) -> Terms:
        """The group's terms (:func:`agree_terms`), asked again with backoff while the
        cluster does not answer; Kafka's defaults if it refuses."""
        props: dict[str, Any] = {**kafka.client_config(self.config, "admin"),
                                 "logger": LIBRDKAFKA_LOG}
        admin = AdminClient(props)  # for start-up only: dropped with this call
        attempt = 0
        while not self.stopping:
            try:
                terms = agree_terms(self.config, admin)
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if not err.retriable() and err.code() not in (
                        KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
                        KafkaError._ALL_BROKERS_DOWN):
                    log.warning("share group %r: cannot set share.auto.offset.reset or read "
                                "its record lock and delivery limit (%s); assuming Kafka's "
                                "defaults", self.config.group_id, err.str())
                    return Terms()
                delay = backoff(self.config.retry_max_backoff, attempt)
                attempt += 1
                self.events.log.warning("share group %r: %s; asking again in %.1fs",
                                        self.config.group_id, err.str(), delay)
                self.pauses.wait(lambda: self.stopping, delay, "terms", JOIN_STATUS)
                continue
            log.info("share group %r: records locked for %d ms, delivered at most %d times",
                     self.config.group_id, terms.lock_ms, terms.delivery_limit)
            return terms
        return Terms()

    # --- callbacks, status, signals, the end ----------------------------------

    def _acknowledged(self, offsets: dict[TopicPartition, set[int]],
                      error: KafkaException | None) -> None:
        """Kafka's answer to acknowledgements: a refused ACCEPT (a lock that ran out, a
        leader that moved) means its record is delivered again, a second task with the
        same id."""
        if error is not None:
            self.metrics.commit_failures.inc()
            self.ack_log.warning("acknowledgements of %d records refused (%s): they are "
                                 "delivered again", sum(map(len, offsets.values())),
                                 error.args[0].str())

    def _update_status(self) -> None:
        self.status.update(self.pauses.waiting or ("" if self.joined else JOIN_STATUS), True)

    def _waited(self) -> None:
        self.events.check()
        self._update_status()

    def _broker_state(self, exc: DispatchError | None) -> None:
        """The queue watch reached the Celery broker (None), or did not: a worker polls only
        while it does, so records are not taken (and their deliveries counted) only to
        be released."""
        self.status.broker(exc)
        if (exc is not None) != (BROKER_PAUSE in self.pauses.reasons):
            self.pauses.set(BROKER_PAUSE, exc is not None)

    def _on_stop(self, _signum: int, _frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            budget = DRAIN_SHARE * self.config.drain_timeout
            if self.parent != os.getppid():
                budget = min(budget, ORPHAN_DRAIN)
            self.pauses.stop_at = time.monotonic() + budget

    def close(self) -> None:
        """Send the acknowledgements and leave the group (the records still acquired go
        back to it), on a thread of its own, as long as the drain allows."""
        self.inflight.close()
        closing = threading.Thread(target=self._leave_and_close, name="close", daemon=True)
        closing.start()
        closing.join(max(1.0, (1 - DRAIN_SHARE) * self.config.drain_timeout - 1.0))
        if closing.is_alive():
            log.warning("share consumer close did not finish in time; exiting without it")

    def _leave_and_close(self) -> None:
        try:
            if self.events.fatal is None:
                self.consumer.commit_sync(ADMIN_TIMEOUT)
            self.consumer.close()
        except KafkaException as exc:
            log.warning("share consumer close: %s", exc.args[0].str())
        self.publisher.close()
