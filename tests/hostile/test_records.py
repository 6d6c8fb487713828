"""Records anyone can produce, through librdkafka's C API, on the real stack: none stops
ingestion, none kills a worker, each valid one runs on a real ``celery worker`` and each
invalid one is dead-lettered with its headers byte for byte.

Every case below goes into one topic among ordinary signals, in each dispatch mode, with
and without ``--with-metadata``; the run checker (``ingestd/tools/checker.py``) then finds
nothing lost, duplicated or misrouted.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from confluent_kafka import Consumer, TopicPartition

from ingestd import dlq, rdkafka
from ingestd.celery import reference_tasks
from tests import stack
from tests.harness import Produced, Run

pytestmark = pytest.mark.stack

MB = 1_000_000
BIG = {"max.message.bytes": str(3 * MB)}  # the source topic takes records of 3 MB
BIG_PRODUCER = {"message.max.bytes": 3_100_000}
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ORDINARY = 400


def _signal(i: int, **extra: Any) -> bytes:
    return stack.signal_record(i, **extra)


class Case(NamedTuple):
    """A hostile record, and what must become of it: run by Celery (``reason`` None), or
    dead-lettered with ``reason``."""

    name: str
    record: Produced
    reason: str | None = None


CASES = [
    Case("a header name that is not UTF-8, on a valid record",
         Produced(_signal(1), b"k", [(b"\xff\xfe", b"v"), ("ok", b"1")])),
    Case("a header name that is not UTF-8, on an invalid record",
         Produced(b"not json {", b"k", [(b"bad\xff", b"\x00\x01"), ("ok", None)], False),
         "decode"),
    Case("a traceparent beside a header name that is not UTF-8",
         Produced(_signal(2), None, [(b"\xc3\x28", b"x"), ("traceparent", TRACEPARENT)])),
    Case("a header value and a key that are not UTF-8",
         Produced(_signal(3), b"\x80\x81", [("h", b"\xff" * 10)])),
    Case("10,000 headers", Produced(_signal(4), None, [("h", b"%d" % i) for i in range(10_000)])),
    Case("a key of 1.5 MB on a small valid record", Produced(_signal(5), b"k" * 1_500_000,
                                                               None, False), "too_large"),
    Case("a header of 1.5 MB on a small valid record",
         Produced(_signal(6), None, [("blob", b"b" * 1_500_000)], False), "too_large"),
    Case("the item counter's worst case (12 s for 90 KB before)",
         Produced(b"[" + b"," * 10_001 + b'"' + b'\\"' * 60_000, None, None, False),
         "too_large"),
    Case("a megabyte of commas", Produced(b"[" + b"0," * 500_000 + b"0]", None, None, False),
         "too_large"),
    Case("100,000 nested brackets", Produced(b"[" * 100_000 + b"]" * 100_000, None, None,
                                             False), "too_large"),
    Case("an integer of 5,000 digits, where the schema does not look",
         Produced(_signal(7, big=0).replace(b'"big":0', b'"big":' + b"7" * 5000), None, None,
                  False), "decode"),
    Case("a lone surrogate escape", Produced(b'{"name": "\\ud800"}', None, None, False),
         "decode"),
    Case("a tombstone", Produced(None, b"k", None, False), "decode"),
    Case("bytes that are not UTF-8", Produced(b"\xff\xfe{}", None, None, False), "decode"),
]


def _letters(run: Run) -> dict[tuple[int, int], Any]:
    """The dead letters by source partition and offset: (headers, key, value)."""
    consumer = Consumer({"bootstrap.servers": run.bootstrap, "group.id": uuid.uuid4().hex,
                         "enable.auto.commit": False})
    end = consumer.get_watermark_offsets(TopicPartition(run.dlq, 0), timeout=10)[1]
    consumer.assign([TopicPartition(run.dlq, 0, 0)])
    out: dict[tuple[int, int], Any] = {}
    read = 0
    while read < end:
        for msg in consumer.consume(500, 1):
            if msg.error() is None:
                read += 1
                headers = rdkafka.headers(msg)
                own, _ = dlq.split(headers)
                out[(int(own[dlq.PARTITION]), int(own[dlq.OFFSET]))] = (headers, msg.key(),
                                                                       msg.value())
    consumer.close()
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("mode", "metadata"), [("each", False), ("each", True),
                                                ("batch", False), ("batch", True)])
def test_no_record_stops_ingestion(make_run: Callable[..., Run], mode: str,
                                   metadata: bool) -> None:
    run = make_run(topic_config=BIG)
    records = [Produced(_signal(100 + i)) for i in range(ORDINARY)]
    at = {i * (ORDINARY + len(CASES)) // len(CASES): case for i, case in enumerate(CASES)}
    for i in sorted(at):  # spread among the ordinary records
        records.insert(i, at[i].record)
    coordinates = run.load.produce_any(records, props=BIG_PRODUCER)
    extra = ["--dispatch", mode, *(["--with-metadata"] if metadata else [])]
    ingestd = run.ingestd(*extra, workers=2)
    settled = run.settle(timeout=240)
    code = run.stop(ingestd)
    run.verify()
    assert settled and code == 0, run.logs()
    assert "died" not in ingestd.output() and not run.stuck(), run.logs()
    letters = _letters(run)
    for i, case in at.items():
        if case.reason is None:
            continue
        headers, key, value = letters[coordinates[i]]
        own, theirs = dlq.split(headers)
        assert own[dlq.ERROR] == case.reason, (case.name, own)
        if dlq.VALUE_OMITTED not in own:  # a letter Kafka took whole
            assert (key, value) == (case.record.key, case.record.value), case.name
            assert theirs == [(k, v) for k, v in case.record.headers or ()], case.name
    if metadata:
        _check_metadata(run, {coordinates[i]: case for i, case in at.items()})


def _check_metadata(run: Run, cases: dict[tuple[int, int], Case]) -> None:
    """A valid record's kafka argument holds its headers, in order; what is not UTF-8 is
    base64, and named so: a header name too."""
    recorded = run.results.hgetall(reference_tasks.KAFKA_KEY)
    for (partition, offset), case in cases.items():
        if case.reason is not None:
            continue
        kafka = json.loads(recorded[f"{run.topic}-{partition}-{offset}"])
        headers = case.record.headers or []
        assert len(kafka["headers"]) == len(headers), case.name
        for i, (name, value) in enumerate(headers):
            got_name, got_value = kafka["headers"][i]
            raw_name = name.encode() if isinstance(name, str) else name
            assert (base64.b64decode(got_name) if f"headers.{i}.name" in kafka["base64"]
                    else got_name.encode()) == raw_name, case.name
            if value is not None:
                assert (base64.b64decode(got_value) if f"headers.{i}" in kafka["base64"]
                        else got_value.encode()) == value, case.name
