"""Decode and build: a consumed batch to task messages and dead letters.

:class:`Pipeline` needs no consumer and no broker connection: it takes the records
a consume returned and the partitions the worker owns, and gives a :class:`Batch`:
the tasks with their messages built, the dead letters, the offsets to store. Every
exception is one record's own (an ``internal`` letter); a record the Celery broker
would refuse as too large is a ``too_large`` one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from confluent_kafka import KafkaError, Message

from ingestd import logs, rdkafka
from ingestd.celery import codec, dispatch
from ingestd.config import Config
from ingestd.dlq import DeadLetter
from ingestd.errors import RecordError
from ingestd.metadata import kafka_metadata, trace_context
from ingestd.quarantine import DETAIL as QUARANTINED
from ingestd.quarantine import Quarantine
from ingestd.registry import Registry
from ingestd.schema import INTERNAL, TOO_LARGE, Validator

Partition = tuple[str, int]
# A task message's bytes besides its records' (base64 and kwargs aside): the envelope,
# the headers with argsrepr and kwargsrepr; and a batch task's per record (its id).
MESSAGE_OVERHEAD, RECORD_OVERHEAD = 16384, 64


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


class Pipeline:
    """A worker's decode and build, with what they need: the validator, the dispatcher
    that builds messages, the quarantine. ``on_error`` hears of the errors librdkafka
    hands over as records."""

    def __init__(self, config: Config, dispatcher: dispatch.Dispatcher, quarantine: Quarantine,
                 on_error: Callable[[KafkaError], None]) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.quarantine = quarantine
        self.on_error = on_error
        self.validator = validator(config)
        # --value-format registry-*: each record to its JSON text first
        self.registry = Registry(config) if config.value_format != "json" else None
        self.task_bound = task_bound(config)

    def decode(self, messages: list[Message], owned: set[Partition],
               revision: int) -> tuple[Batch, list[Message]]:
        """Validate each record; a task for each valid one, a dead letter for the rest.
        Records of partitions taken away since they were consumed are left out: their new
        owner consumes them again from the committed offset, and a clean rebalance
        repeats nothing.

        A batch holds runs of records of one partition, in offset order: what is the
        same for a whole run (ownership; the timestamp, for the latency metric) is
        looked at once per run, not once per record. Past ``--max-batch-bytes`` the rest
        is returned, for the next batch: ``(batch, rest)``."""
        batch = Batch(revision=revision)
        # Bound to locals: this loop runs once per record.
        check = self.validator.check
        registry = self.registry
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
        rest: list[Message] = []
        for i, msg in enumerate(messages):
            if size >= max_size:  # the rest is the next batch's
                rest, messages = messages[i:], messages[:i]
                break
            headers = read_headers(msg)  # None, and cheap, for a record without headers
            key = msg.key()
            extra = (len(key) if key else 0) + (headers_size(headers) if headers else 0)
            size += len(msg) + extra
            err = msg.error()
            if err is not None:
                self.on_error(err)
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
                if registry is not None:
                    raw = registry.decode(raw)
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
        return batch, rest

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

    def without(self, batch: Batch, owned: set[Partition], revision: int) -> Batch:
        """The batch less the records of partitions taken away while it waited (see
        :meth:`decode`), before it is published or a refused batch is retried: their new
        owner consumes them again. Messages of the partitions kept are not built again,
        and a retry still sends only what the broker did not accept."""
        gone = {p for p in batch.offsets if p not in owned}
        if not gone:
            return dataclasses.replace(batch, revision=revision)

        def kept(letters: list[DeadLetter]) -> list[DeadLetter]:
            return [x for x in letters if (x.topic, x.partition) not in gone]

        return dataclasses.replace(
            batch, tasks=[t for t in batch.tasks if (t.topic, t.partition()) not in gone],
            letters=kept(batch.letters), unsent=None if batch.unsent is None
            else kept(batch.unsent), revision=revision,
            offsets={k: v for k, v in batch.offsets.items() if k not in gone},
            messages=self.dispatcher.without(batch.messages, gone))


def count(batch: Batch, config: Config, slot: int, invalid_log: logs.RateLimited) -> None:
    """Metrics of a published batch, once per batch (not per record), and the
    rate-limited log of its invalid records."""
    from ingestd import metrics as m  # after fork: PROMETHEUS_MULTIPROC_DIR is set by now

    for topic, n in batch.consumed.items():
        m.consumed.labels(topic).inc(n)
    m.batch_size.observe(sum(batch.consumed.values()))
    dispatched: dict[str, int] = {}
    for task in batch.tasks:
        dispatched[task.topic] = dispatched.get(task.topic, 0) + len(task.raws)
    for topic, n in dispatched.items():
        m.dispatched.labels(topic, config.route_of(topic).task).inc(n)
    if dispatched:
        m.worker_dispatched.labels(str(slot)).inc(sum(dispatched.values()))
    invalid: dict[tuple[str, str], int] = {}
    for letter in batch.letters:
        key = (letter.topic, letter.reason)
        invalid[key] = invalid.get(key, 0) + 1
        invalid_log.warning("invalid record %s-%d-%d (%s): %s", letter.topic,
                                 letter.partition, letter.offset, letter.reason,
                                 letter.detail[:200])
    for (topic, reason), n in invalid.items():
        m.invalid.labels(topic, reason).inc(n)
        if config.dead_letter_topic:
            m.dlq_produced.labels(topic).inc(n)
    if batch.oldest_ms and batch.tasks:
        m.end_to_end_latency.observe(max(0.0, time.time() - batch.oldest_ms / 1000))


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
    return letter(by_offset[(topic, partition, offset)], reason, detail)


def letter(msg: Message, reason: str, detail: str) -> DeadLetter:
    """The dead letter of a consumed record (``msg`` has no error)."""
    return _letter(msg, reason, detail, rdkafka.headers(msg))


def _fails(prepare: Callable[[list[dispatch.Task]], Any], task: dispatch.Task) -> Exception | None:
    try:
        prepare([task])
    except Exception as exc:
        return exc
    return None


def size(messages: list[Message]) -> int:
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
