"""``ingestd replay``: send dead letters back once their cause is fixed.

It reads the dead-letter topic as the consumer group ``ingestd-replay-<dlq>``, from
that group's committed offsets up to the high watermarks it saw at start, so an
interrupted replay resumes where it stopped. Each letter it selects (``--reason``,
every reason but ``internal`` if none is named; ``--partition`` and ``--offset-range``
by the source coordinates in its headers) is checked against the current ``--schema``
and record limits (a ``--value-format registry-*`` letter decoded with its schema
first), unless ``--all``; one that passes is produced, with its original
key, value and headers, to its source topic (or ``--to``), by an idempotent producer,
with ``ingestd.replay.count`` one higher. A letter replayed ``--max-replays`` times
already is skipped, so nothing loops forever. The source topic a letter names must be
a ``--topic``: anyone who can write to the dead-letter topic could name any other.

A batch's offsets are committed only after Kafka acknowledged every record
produced from it: a stop (TERM, INT, HUP) finishes the batch, commits and exits, and
the next run produces nothing twice. A record Kafka refuses stops the run before its
letter. A kill -9 may repeat the last batch.
"""

from __future__ import annotations

import argparse
import collections
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from ingestd import config as cfg
from ingestd import dlq, kafka, logs, rdkafka
from ingestd.errors import ConfigError, ExitCode, RecordError
from ingestd.registry import Registry, RegistryUnavailable
from ingestd.schema import INTERNAL, REASONS, Validator

# The daemon's settings that replay uses: it shares the daemon's --config file.
SETTINGS = ("topic", "bootstrap_servers", "dlq_topic", "schema", "max_record_bytes",
            "max_record_items", "batch_size", "kafka_property", "log_format", "log_level",
            "value_format", "schema_registry_url", "schema_registry_tls_ca",
            "schema_registry_tls_cert", "schema_registry_tls_key")
KAFKA_TIMEOUT = 15.0
DELIVERY_TIMEOUT = 30.0  # the producer's message.timeout.ms
FLUSH_TIMEOUT = 60.0
# Consume errors after which the run cannot go on; others librdkafka retries.
PERMANENT = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED,
                       KafkaError.GROUP_AUTHORIZATION_FAILED, KafkaError.UNKNOWN_TOPIC_OR_PART,
                       KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION})
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PROGRESS_INTERVAL = 1.0
# Why a selected letter was not replayed, besides being still invalid.
LIMIT, OMITTED, NO_SOURCE = "at the replay limit", "without its value", "without a source topic"
FOREIGN = "naming a topic that is not a --topic (give --to to send it anyway)"
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")


def group_of(dlq_topic: str) -> str:
    """The consumer group whose committed offsets say how far replay has come."""
    return f"ingestd-replay-{dlq_topic}"


def _offset_range(text: str) -> tuple[int, int | None]:
    """``FROM-TO`` (inclusive), ``FROM-`` or ``-TO``, or one offset."""
    low, sep, high = text.partition("-")
    try:
        first = int(low) if low.strip() else 0
        last = (int(high) if high.strip() else None) if sep else first
    except ValueError:
        first, last = -1, None
    if first < 0 or (last is not None and last < first):
        raise argparse.ArgumentTypeError(f"bad value {text!r}, expected FROM-TO, FROM- or -TO "
                                         "(source offsets, inclusive)")
    return first, last


def _partitions(text: str) -> frozenset[int]:
    try:
        parts = cfg.parse_partitions(text)
    except ValueError:
        parts = None
    if parts is None:
        raise argparse.ArgumentTypeError(f"bad value {text!r}, expected a list of partitions "
                                         "and ranges, e.g. 0-5,8")
    return parts


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"bad value {text!r}, expected a whole number >= 1")
    return n


def _topic(text: str) -> str:
    expected = cfg.topic_problem(text)
    if expected:
        raise argparse.ArgumentTypeError(f"bad value {text!r}, expected {expected}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = cfg.build_parser(
        prog="ingestd replay", only=SETTINGS,
        description="Send dead letters back to their source topic: those that pass the "
                    "current --schema and limits, or every one selected (--all).")
    p.add_argument("--reason", action="append", choices=REASONS, default=[],
                   help="select letters of this ingestd.error (repeatable; if none, all but "
                        "internal)")
    p.add_argument("--partition", type=_partitions, metavar="LIST", default=None,
                   help="select letters from these source partitions, e.g. 0-5,8 (all if none)")
    p.add_argument("--offset-range", type=_offset_range, metavar="FROM-TO", default=None,
                   help="select letters from these source offsets (inclusive; FROM- or -TO "
                        "leave one end open)")
    p.add_argument("--all", action="store_true", default=False,
                   help="replay every selected letter, without checking it first")
    p.add_argument("--to", type=_topic, metavar="TOPIC", default=None,
                   help="produce to this topic instead of each letter's source topic")
    p.add_argument("--max-replays", type=_at_least_one, metavar="N", default=3,
                   help="skip a letter already replayed this often (its ingestd.replay.count)")
    p.add_argument("--dry-run", action="store_true", default=False,
                   help="produce nothing, commit nothing: count what would be replayed")
    p.add_argument("--from-beginning", action="store_true", default=False,
                   help="start at the topic's first letter, not where the last replay stopped")
    return p


@dataclass
class Counts:
    selected: int = 0
    replayed: int = 0  # delivered (in a dry run: would be produced)
    invalid: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    read: int = 0

    def summary(self) -> str:
        invalid = sum(self.invalid.values())
        by_reason = ", ".join(f"{r} {n}" for r, n in sorted(self.invalid.items()))
        return (f"replay: selected {self.selected}, replayed {self.replayed}, still invalid "
                f"{invalid}{f' ({by_reason})' if by_reason else ''}, skipped "
                f"{sum(self.skipped.values())}")


@dataclass(frozen=True)
class Options:
    reasons: frozenset[str]
    partitions: frozenset[int] | None
    offsets: tuple[int, int | None] | None
    replay_all: bool
    to: str | None
    max_replays: int
    dry_run: bool
    from_beginning: bool

    @classmethod
    def of(cls, options: dict[str, Any]) -> Options:
        return cls(frozenset(options["reason"]), options["partition"], options["offset_range"],
                   options["all"], options["to"], options["max_replays"], options["dry_run"],
                   options["from_beginning"])

    def selects(self, own: dict[str, str]) -> bool:
        """Whether the letter whose ingestd headers are ``own`` is selected."""
        reason = own.get(dlq.ERROR)
        if self.reasons:
            if reason not in self.reasons:
                return False
        elif reason == INTERNAL:  # records that killed workers among them: only when named
            return False
        if self.partitions is not None and _int(own.get(dlq.PARTITION)) not in self.partitions:
            return False
        if self.offsets is not None:
            offset = _int(own.get(dlq.OFFSET))
            first, last = self.offsets
            if offset is None or offset < first or (last is not None and offset > last):
                return False
        return True


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


class Replay:
    """One run over the dead-letter topic, up to the watermarks seen at start."""

    def __init__(self, config: cfg.Config, options: Options) -> None:
        self.topic = config.dead_letter_topic
        if not self.topic:
            raise ConfigError('dlq-topic: "" disables dead-lettering: there is nothing to '
                              "replay")
        if options.to == self.topic:
            raise ConfigError(f"to: {options.to!r} is the dead-letter topic replay reads")
        self.options = options
        self.sources = frozenset(config.topic)  # where a letter may send its record back
        self.group = group_of(self.topic)
        self.validator = None if options.replay_all else Validator(
            config.schema, config.max_record_bytes, config.max_record_items)
        # A registry format's letters are decoded as the workers decode them, then checked.
        self.registry = Registry(config) if self.validator is not None and \
            config.value_format != "json" else None
        self.batch_size = config.batch_size
        self.counts = Counts()
        self.errors: list[str] = []
        self.refused: dict[int, int] = {}  # dead-letter partition -> first letter not produced
        self.committed: dict[int, int] = {}  # dead-letter partition -> the group's, at start
        self.stopped_by: str | None = None
        self.consumer = Consumer({
            **kafka.client_config(config, "consumer"), "group.id": self.group,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "enable.partition.eof": True, "logger": LIBRDKAFKA_LOG})
        # A record's fate is known once flush() returns: librdkafka gives up on it first.
        self.producer = None if options.dry_run else rdkafka.Producer({
            **kafka.producer_config(config), "message.timeout.ms": int(DELIVERY_TIMEOUT * 1000),
            "logger": LIBRDKAFKA_LOG})
        self.progress = sys.stderr.isatty()

    def stop(self, signum: int, _frame: object) -> None:
        self.stopped_by = signal.Signals(signum).name

    def run(self) -> int:
        ends = self._ends()
        if ends is None:
            return self.finish()
        pending = {p for p, (start, end) in ends.items() if start < end}
        if pending:
            self.consumer.assign([TopicPartition(self.topic, p, ends[p][0]) for p in pending])
        total = sum(end - start for start, end in ends.values() if start < end)
        next_progress = time.monotonic() + PROGRESS_INTERVAL
        while pending and self.stopped_by is None and not self.errors:
            positions: dict[int, int] = {}
            for msg in self.consumer.consume(self.batch_size, 0.5):
                if self.errors:  # nothing after a refusal is produced or committed
                    break
                p, offset, err = msg.partition(), msg.offset(), msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and p is not None:
                        self._done(p, pending)
                    elif p is None or err.fatal() or err.code() in PERMANENT:
                        self.errors.append(f"{self.topic}: {err.str()}")
                    else:
                        logs.get("replay").warning("%s (librdkafka retries)", err.str())
                    continue
                assert p is not None and offset is not None
                end = ends[p][1]
                if offset >= end:  # written after the start: for a later run
                    self._done(p, pending)
                    continue
                self.counts.read += 1
                self.handle(msg)
                positions[p] = offset + 1
                if offset + 1 >= end:
                    self._done(p, pending)
            if self.producer is not None and positions and self._flush():
                self._commit({p: max(self.committed.get(p, 0), min(o, self.refused.get(p, o)))
                              for p, o in positions.items()})
            if self.progress and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + PROGRESS_INTERVAL
                print(f"{self.counts.summary()} (read {self.counts.read} of {total})",
                      file=sys.stderr)
        return self.finish()

    def _done(self, partition: int, pending: set[int]) -> None:
        """The partition reached the end seen at start: fetch no more of it."""
        if partition in pending:
            pending.discard(partition)
            self.consumer.pause([TopicPartition(self.topic, partition)])

    def handle(self, msg: Message) -> None:
        """Count one letter, and produce its record if it is selected and passes."""
        own, theirs = dlq.split(rdkafka.headers(msg))
        options = self.options
        if not options.selects(own):
            return
        self.counts.selected += 1
        count = next((_int(v.decode(errors="replace") if isinstance(v, bytes) else v) or 0
                      for k, v in reversed(theirs) if k == dlq.REPLAY_COUNT), 0)
        target = options.to or own.get(dlq.TOPIC)
        if count >= options.max_replays:
            self.counts.skipped[LIMIT] += 1
            return
        if dlq.VALUE_OMITTED in own:  # Kafka refused the whole record as a dead letter
            self.counts.skipped[OMITTED] += 1
            return
        if not target:
            self.counts.skipped[NO_SOURCE] += 1
            return
        if not options.to and target not in self.sources:  # anyone may write a letter
            self.counts.skipped[FOREIGN] += 1
            return
        value = msg.value()
        if self.validator is not None:
            try:
                key = msg.key()
                decoded = value
                if self.registry is not None:
                    self.registry.resolve([msg])
                    decoded = self.registry.decode(value)
                self.validator.check(decoded, (len(key) if key else 0)
                                     + rdkafka.headers_size(theirs))
            except RegistryUnavailable as exc:  # the run stops before this letter
                self._refuse(cast(int, msg.partition()), cast(int, msg.offset()), str(exc))
                return
            except RecordError as exc:
                self.counts.invalid[exc.reason] += 1
                return
            except Exception:  # as the worker counts it
                self.counts.invalid[INTERNAL] += 1
                return
        if self.producer is None:
            self.counts.replayed += 1
            return
        headers = [(k, v) for k, v in theirs if k != dlq.REPLAY_COUNT]
        headers.append((dlq.REPLAY_COUNT, str(count + 1).encode()))
        p, offset = cast(int, msg.partition()), cast(int, msg.offset())
        while True:
            try:
                self.producer.produce(target, value=value, key=msg.key(), headers=headers,
                                      on_delivery=self._reporter(p, offset))
                return
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:
                self._refuse(p, offset, f"{target}: {exc.args[0].str()}")
                return

    def _reporter(self, partition: int, offset: int) -> Callable[[KafkaError | None, Any], None]:
        def report(err: KafkaError | None, msg: Any) -> None:
            if err is None:
                self.counts.replayed += 1
            else:
                self._refuse(partition, offset, f"{msg.topic()}: {err.str()}")
        return report

    def _refuse(self, partition: int, offset: int, why: str) -> None:
        """Kafka refused the record of this letter: the run stops, and the group's offset
        stays before the letter."""
        self.errors.append(why)
        self.refused[partition] = min(offset, self.refused.get(partition, offset))

    def _flush(self) -> bool:
        """Wait for every delivery report of the batch; False while the fate of a record is
        unknown (its letter is then not committed, and the next run sees it again)."""
        assert self.producer is not None
        remaining = self.producer.flush(FLUSH_TIMEOUT)
        if remaining:  # not expected: librdkafka gives up on a record first
            self.errors.append(f"{remaining} records not acknowledged in {FLUSH_TIMEOUT:.0f}s")
        return not remaining

    def _commit(self, positions: dict[int, int]) -> None:
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o)
                                          for p, o in positions.items()], asynchronous=False)
        except KafkaException as exc:
            self.errors.append(f"commit to group {self.group}: {exc.args[0].str()}")

    def _ends(self) -> dict[int, tuple[int, int]] | None:
        """Each partition's first offset to read and its high watermark at start; None
        (after one line on stderr) when Kafka cannot say."""
        try:
            meta = self.consumer.list_topics(self.topic, timeout=KAFKA_TIMEOUT).topics.get(
                self.topic)
            if meta is None or meta.error is not None:
                why = meta.error.str() if meta is not None and meta.error else "unknown topic"
                self.errors.append(f"dead-letter topic {self.topic}: {why}")
                return None
            tps = [TopicPartition(self.topic, p) for p in sorted(meta.partitions)]
            out = {}
            for tp in self.consumer.committed(tps, timeout=KAFKA_TIMEOUT):
                if tp.error is not None:
                    self.errors.append(f"offsets of group {self.group}: {tp.error.str()}")
                    return None
                low, high = self.consumer.get_watermark_offsets(tp, timeout=KAFKA_TIMEOUT)
                start = low if self.options.from_beginning or tp.offset < low else tp.offset
                out[tp.partition] = (start, high)
                # --from-beginning reads from the start, yet commits no offset below the
                # group's: an interrupted run must not rewind the next one.
                self.committed[tp.partition] = max(tp.offset, 0)
            return out
        except KafkaException as exc:
            self.errors.append(f"{self.topic}: {exc.args[0].str()}")
            return None

    def finish(self) -> int:
        if self.producer is not None:
            self.producer.flush(FLUSH_TIMEOUT)
        self.consumer.close()
        counts = self.counts
        if self.options.dry_run:
            print(f"replay: dry run: nothing produced, no offsets committed; {counts.replayed} "
                  f"would be replayed")
        if counts.skipped:
            print(f"replay: skipped {sum(counts.skipped.values())}: " + ", ".join(
                f"{n} {why}" + (f" (--max-replays {self.options.max_replays})"
                                if why == LIMIT else "")
                for why, n in sorted(counts.skipped.items())))
        for error in self.errors[:5]:
            print(f"replay: {error}", file=sys.stderr)
        if self.stopped_by:
            print(f"replay: stopped by {self.stopped_by}; the next run resumes where this one "
                  "stopped")
        print(counts.summary(), flush=True)
        return ExitCode.RUNTIME if self.errors else ExitCode.OK


def main(argv: Sequence[str]) -> int:
    try:
        loaded = cfg.load(argv, parser=build_parser())
        logs.configure(loaded.config.log_format, loaded.config.log_level, role="replay")
        replay = Replay(loaded.config, Options.of(dict(loaded.options)))
    except ConfigError as exc:
        print(f"ingestd replay: error: {cfg.redact(str(exc))}", file=sys.stderr)
        return ExitCode.CONFIG
    except KafkaException as exc:  # librdkafka refused a -X property
        print(f"ingestd replay: error: kafka-property: {exc.args[0].str()}", file=sys.stderr)
        return ExitCode.CONFIG
    for sig in STOPS:
        signal.signal(sig, replay.stop)
    return replay.run()
