"""One verdict for a run (every fault scenario, and the demo): what was lost, repeated, misrouted
or over-committed.

Modelled on Kafka's OffsetValidationTest (no gaps in what was consumed, and no
committed offset beyond it) and on Jepsen's queue checkers (lost, duplicated,
unexpected). Its inputs are plain data: what the producer's delivery reports
said it wrote, what the real ``celery worker`` ran, what the dead-letter topic
holds, and what the group committed; so it is tested with hand-made inputs.
:func:`read_dead_letters` reads the dead letters' part from Kafka.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

Record = tuple[str, int, int]  # topic, partition, offset
Partition = tuple[str, int]
SHOWN_RANGES = 8  # per partition; the rest is counted, so that a report stays short


def record_id(record: Record) -> str:
    """ingestd's task id in ``--dispatch each`` mode (and each batch record's id)."""
    return "-".join(map(str, record))


def parse_id(task_id: str) -> Record | None:
    """The coordinates in a record id; None for anything else (a batch task's id)."""
    parts = task_id.rsplit("-", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


def ranges(offsets: Iterable[int], limit: int = SHOWN_RANGES) -> str:
    """``[3, 1, 2, 7]`` as ``1-3, 7``; beyond ``limit`` ranges, how many more."""
    spans: list[list[int]] = []
    for o in sorted(set(offsets)):
        if spans and o == spans[-1][1] + 1:
            spans[-1][1] = o
        else:
            spans.append([o, o])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:limit])
    return text + (f", ... ({len(spans) - limit} more ranges)" if len(spans) > limit else "")


def by_partition(records: Iterable[Record]) -> str:
    """``t-0-5, t-0-6, t-1-9`` as ``p0: 5-6; p1: 9`` (one topic per scenario: the topic is
    left out unless there are several)."""
    grouped: dict[Partition, list[int]] = collections.defaultdict(list)
    for topic, partition, offset in records:
        grouped[(topic, partition)].append(offset)
    several = len({t for t, _ in grouped}) > 1
    return "; ".join(f"{t + ' ' if several else ''}p{p}: {ranges(offs)}"
                     for (t, p), offs in sorted(grouped.items()))


@dataclass
class Report:
    produced: int
    valid: int
    executed: int  # distinct valid records executed
    dead_lettered: int  # distinct poison records dead-lettered
    lost: list[Record] = field(default_factory=list)
    duplicates: dict[Record, int] = field(default_factory=dict)  # extra executions
    dead_letter_duplicates: dict[Record, int] = field(default_factory=dict)
    valid_dead_lettered: list[Record] = field(default_factory=list)
    poison_executed: list[Record] = field(default_factory=list)
    over_committed: dict[Partition, tuple[int, int]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)  # ran, but never produced

    @property
    def extra_executions(self) -> int:
        return sum(self.duplicates.values())

    @property
    def extra_dead_letters(self) -> int:
        return sum(self.dead_letter_duplicates.values())

    def failures(self, max_duplicates: int | None = 0) -> list[str]:
        """What breaks the guarantees; duplicates only beyond ``max_duplicates`` (None: any
        number is allowed, as at-least-once allows)."""
        out = []
        if self.lost:
            out.append(f"lost {len(self.lost)}: {by_partition(self.lost)}")
        if self.over_committed:
            out.append("over-committed: " + "; ".join(
                f"p{p} committed {c} past undelivered offset {u}"
                for (_, p), (c, u) in sorted(self.over_committed.items())))
        if self.valid_dead_lettered:
            out.append(f"valid but dead-lettered {len(self.valid_dead_lettered)}: "
                       f"{by_partition(self.valid_dead_lettered)}")
        if self.poison_executed:
            out.append(f"poison but executed {len(self.poison_executed)}: "
                       f"{by_partition(self.poison_executed)}")
        if self.unexpected:
            out.append(f"unexpected {len(self.unexpected)}: {', '.join(self.unexpected[:5])}")
        if max_duplicates is not None:
            for what, extra, repeated in (
                    ("duplicate executions", self.extra_executions, self.duplicates),
                    ("duplicate dead letters", self.extra_dead_letters,
                     self.dead_letter_duplicates)):
                if extra > max_duplicates:
                    out.append(f"{what} {extra} > {max_duplicates}: {by_partition(repeated)}")
        return out

    def summary(self) -> str:
        return (f"produced {self.produced} ({self.valid} valid, {self.produced - self.valid} "
                f"poison); executed {self.executed}, dead-lettered {self.dead_lettered}; "
                f"lost {len(self.lost)}; duplicates {self.extra_executions} "
                f"(dead letters {self.extra_dead_letters})")

    def explain(self, max_duplicates: int | None = 0) -> str:
        """The summary, then each failure on its own line, then any duplicates allowed."""
        lines = [self.summary(), *self.failures(max_duplicates)]
        if max_duplicates is None and self.duplicates:
            lines.append(f"duplicates (allowed): {by_partition(self.duplicates)}")
        return "\n".join(lines)


def check(produced: Mapping[Record, bool], executed: Mapping[str, int],
          dead_letters: Iterable[Record], committed: Mapping[Partition, int]) -> Report:
    """Judge one run.

    ``produced``: each record's coordinates, from its delivery report, and whether it is
    valid. ``executed``: task id -> times the celery worker ran it. ``dead_letters``: the
    source coordinates of each dead letter, repeats included. ``committed``: the group's
    committed offset per partition (negative: none).
    """
    letters = collections.Counter(dead_letters)
    runs: dict[Record, int] = {}
    unexpected = []
    for task_id, count in executed.items():
        record = parse_id(task_id)
        if record is None or record not in produced:
            unexpected.append(task_id)
        else:
            runs[record] = runs.get(record, 0) + count
    unexpected += [record_id(r) for r in letters if r not in produced]
    delivered = set(runs) | set(letters)
    report = Report(
        produced=len(produced), valid=sum(produced.values()),
        executed=sum(1 for r in runs if produced[r]),
        dead_lettered=sum(1 for r in letters if r in produced and not produced[r]),
        lost=sorted(r for r in produced if r not in delivered),
        duplicates={r: n - 1 for r, n in sorted(runs.items()) if n > 1},
        dead_letter_duplicates={r: n - 1 for r, n in sorted(letters.items()) if n > 1},
        valid_dead_lettered=sorted(r for r in letters if produced.get(r) is True),
        poison_executed=sorted(r for r in runs if produced[r] is False),
        unexpected=sorted(unexpected),
    )
    report.over_committed = over_committed(produced, delivered, committed)
    return report


def over_committed(produced: Mapping[Record, bool], delivered: set[Record],
                   committed: Mapping[Partition, int]) -> dict[Partition, tuple[int, int]]:
    """Partitions whose committed offset passes a record that was not delivered (or the end
    of what was produced): partition -> (committed, first offset it must not pass)."""
    ends: dict[Partition, int] = {}
    undelivered: dict[Partition, int] = {}
    for topic, partition, offset in produced:
        key = (topic, partition)
        ends[key] = max(ends.get(key, 0), offset + 1)
        if (topic, partition, offset) not in delivered:
            undelivered[key] = min(undelivered.get(key, offset), offset)
    out = {}
    for key, offset in committed.items():
        limit = undelivered.get(key, ends.get(key, 0))
        if offset > limit:
            out[key] = (offset, limit)
    return out


def percentiles(values: list[float], *qs: float) -> list[float]:
    """Nearest-rank percentiles of ``values`` (not empty): latencies of a run."""
    ordered = sorted(values)
    return [ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]
            for q in qs]


def read_dead_letters(bootstrap: str, topic: str, timeout: float = 60) -> list[Record]:
    """The source coordinates of every dead letter in ``topic``, up to its end now; raises
    RuntimeError if they cannot all be read in ``timeout`` (a short list would read as
    lost records)."""
    from confluent_kafka import Consumer, TopicPartition

    from ingestd.dlq import source
    from ingestd.rdkafka import headers

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "ingestd-checker",
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
        tps = [TopicPartition(topic, p, 0) for p in meta.partitions]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=timeout)[1]
                for tp in tps}
        consumer.assign(tps)
        out: list[Record] = []
        read = 0
        deadline = time.monotonic() + timeout
        while read < sum(ends.values()) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None and \
                        cast(int, msg.offset()) < ends[cast(int, msg.partition())]:
                    read += 1
                    record = source(headers(msg))
                    if record is not None:
                        out.append(record)
        if read < sum(ends.values()):
            raise RuntimeError(f"read {read} of {sum(ends.values())} dead letters in {topic}")
        return out
    finally:
        consumer.close()
