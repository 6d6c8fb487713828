"""Records that killed a worker twice are skipped into the dead-letter topic.

Every exception on one record is contained to that record (an ``internal`` dead
letter). What cannot be contained kills the process: the OOM killer, a crash in
C code, a loop that never beats again. The worker then restarts on the same
records and would die again, in a loop. So a worker writes the ranges of the
records it decodes and builds into messages to a file the supervisor made for
it, before it starts, and empties the file once the messages are built: a
death while it waits (for the Celery broker, for Kafka) says nothing about the
records, say an operator's ``kill -9`` during an outage. When a worker dies (a
signal, an exception ingestd did not expect, or a kill because it stopped
beating), the supervisor reads that file. What a death held is suspected: the
next workers take those records one at a time, each alone in its batch and
published only once everything before it is committed, so a second death names the
one record it died on and repeats at most the one before it. Records that two deaths held
both are quarantined: every worker started after that dead-letters them as
``internal`` without decoding them.

Nothing here imports confluent_kafka: the supervisor uses it too.
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from ingestd import logs

log = logs.get("supervisor")
DEATHS_KEPT = 16  # the last deaths whose ranges a new death is compared with
DETAIL = "skipped: a worker died twice while it held this record (see the supervisor's log)"


class Range(NamedTuple):
    """The records ``first`` to ``last`` (inclusive) of one partition."""

    topic: str
    partition: int
    first: int
    last: int

    def overlap(self, other: Range) -> Range | None:
        if (self.topic, self.partition) != (other.topic, other.partition):
            return None
        first, last = max(self.first, other.first), min(self.last, other.last)
        return Range(self.topic, self.partition, first, last) if first <= last else None

    def __str__(self) -> str:
        return f"{self.topic} partition {self.partition} offsets {self.first}-{self.last}"


def ranges_of(messages: Sequence[Any]) -> list[Range]:
    """The ranges a list of consumed records spans. librdkafka hands records out in runs
    of one partition, so the loop looks at the partition only where a run may end."""
    spans: dict[tuple[str, int], list[int]] = {}
    span: list[int] = []
    last: tuple[str, int] | None = None
    for msg in messages:
        if msg.error() is not None:
            continue
        key = (msg.topic(), msg.partition())
        if key != last:
            last = key
            span = spans.setdefault(key, [msg.offset(), 0])
        span[1] = msg.offset()
    return [Range(t, p, min(first, end), max(first, end)) for (t, p), (first, end) in
            spans.items()]


class Holding:
    """The ranges a worker holds, in an unlinked temp file the supervisor creates before
    fork; the worker writes, the supervisor reads once the worker died."""

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="ingestd-holding-")
        os.unlink(path)
        self.fd = fd

    def hold(self, ranges: Iterable[Range]) -> None:
        """Its first line says how long the rest is: a worker killed between the write and
        the truncation leaves the old file's tail behind, which the length leaves out."""
        body = "".join(f"{r.topic} {r.partition} {r.first} {r.last}\n" for r in ranges).encode()
        data = b"%d\n%s" % (len(body), body)
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def held(self) -> list[Range]:
        """What the worker held; nothing where the file cannot be read as written (a death
        in the middle of a write is no evidence against the records)."""
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        head, _, rest = data.partition(b"\n")
        out = []
        try:
            length = int(head) if head else 0
            if length > len(rest):
                raise ValueError(f"{len(rest)} bytes of {length}")
            for line in rest[:length].decode().splitlines():
                topic, partition, first, last = line.split()
                out.append(Range(topic, int(partition), int(first), int(last)))
        except ValueError as exc:  # UnicodeDecodeError too
            log.warning("a worker's holding file is torn (%s): taken as holding nothing", exc)
            return []
        return out

    def close(self) -> None:
        os.close(self.fd)


class Suspects:
    """The supervisor's record of what dead workers held, and what is quarantined."""

    def quarantine(self) -> Quarantine:
        """For a worker started now: what it dead-letters, and what it takes one record
        at a time."""
        return Quarantine(self.quarantined, [r for held in self.deaths for r in held])

    def __init__(self) -> None:
        self.deaths: collections.deque[list[Range]] = collections.deque(maxlen=DEATHS_KEPT)
        self.quarantined: list[Range] = []

    def died_holding(self, held: list[Range]) -> list[Range]:
        """Note a death; return the ranges it newly quarantines: where what it held
        overlaps what an earlier death held."""
        new: list[Range] = []
        if not held:  # it died between batches: nothing to suspect
            return new
        for earlier in self.deaths:
            for a in earlier:
                for b in held:
                    both = a.overlap(b)
                    if both is not None and not any(both.overlap(q) == both
                                                    for q in self.quarantined + new):
                        new.append(both)
        self.deaths.append(held)
        self.quarantined += new
        return new


class Quarantine:
    """A worker's lookups: is this record quarantined (dead-lettered undecoded), or suspected
    (taken alone)?"""

    def __init__(self, ranges: Iterable[Range], suspected: Iterable[Range] = ()) -> None:
        self.by_partition = _by_partition(ranges)
        self.suspected = _by_partition(suspected)

    def __bool__(self) -> bool:
        return bool(self.by_partition)

    def holds(self, topic: str, partition: int, offset: int) -> bool:
        return _within(self.by_partition, topic, partition, offset)

    def suspects(self, topic: str, partition: int, offset: int) -> bool:
        return _within(self.suspected, topic, partition, offset)


def _by_partition(ranges: Iterable[Range]) -> dict[tuple[str, int], list[Range]]:
    out: dict[tuple[str, int], list[Range]] = {}
    for r in ranges:
        out.setdefault((r.topic, r.partition), []).append(r)
    return out


def _within(ranges: dict[tuple[str, int], list[Range]], topic: str, partition: int,
            offset: int) -> bool:
    return any(r.first <= offset <= r.last for r in ranges.get((topic, partition), ()))
