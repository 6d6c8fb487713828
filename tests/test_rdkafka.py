"""ingestd.rdkafka: records with header names of any bytes, written through librdkafka's C
API and read back from real Kafka through confluent-kafka's own consumer."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from ingestd import rdkafka
from tests import stack

pytestmark = pytest.mark.stack

# Names Kafka takes and confluent-kafka's Message.headers() cannot decode.
HOSTILE = [(b"ok", b"1"), (b"\xff\xfe", b"\x00\x01"), ("none", None), (b"e\xc3\xa9", b"x"),
           (b"\xed\xa0\x80", b""), (b"ok", b"again")]


def produce(topic: str, records: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    producer = rdkafka.Producer({"bootstrap.servers": stack.BOOTSTRAP, "acks": "all",
                                 "enable.idempotence": True})
    reports: list[tuple[Any, Any]] = []
    for record in records:
        producer.produce(topic, partition=0, on_delivery=lambda e, d: reports.append((e, d)),
                         **record)
    assert producer.flush(30) == 0
    producer.close()
    return reports


def consume(topic: str, n: int) -> list[Message]:
    consumer = Consumer({"bootstrap.servers": stack.BOOTSTRAP, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    got: list[Message] = []
    while len(got) < n:
        got += [m for m in consumer.consume(n, 1) if m.error() is None]
    consumer.close()
    return got


def test_the_installed_confluent_kafka_is_read_in_c() -> None:
    """The Message layout was checked and the C reader runs: were confluent-kafka's struct
    to change, ingestd would fall back to its headers() and say so in --check."""
    assert rdkafka.HEADERS_READ_BY == "from librdkafka, in C (ingestd._native)"


def test_header_names_of_any_bytes_round_trip(topic_factory: Callable[..., str]) -> None:
    topic = topic_factory()
    reports = produce(topic, [{"value": b'{"a": 1}', "key": b"k\xff", "headers": HOSTILE},
                              {"value": None}, {"value": b"", "key": b""},
                              {"value": b"v", "headers": [("traceparent", "text value")]}])
    assert [(err, d.partition(), d.offset()) for err, d in reports] == \
        [(None, 0, o) for o in range(4)]
    assert {d.topic() for _, d in reports} == {topic}
    first, tombstone, empty, text = consume(topic, 4)
    expected = [("ok", b"1"), (b"\xff\xfe", b"\x00\x01"), ("none", None), ("e\u00e9", b"x"),
                (b"\xed\xa0\x80", b""), ("ok", b"again")]  # an encoded surrogate is no UTF-8
    assert rdkafka.headers(first) == expected
    assert rdkafka.headers(first) == expected  # again: nothing was consumed by the first
    assert rdkafka.headers(tombstone) is None and tombstone.value() is None
    assert rdkafka.headers(empty) is None and (empty.value(), empty.key()) == (b"", b"")
    assert rdkafka.headers(text) == [("traceparent", b"text value")]
    assert first.key() == b"k\xff"
    # What ingestd never does on a consumed record: confluent-kafka's own decoding fails
    # (and a second call would crash the process).
    with pytest.raises(SystemError):
        first.headers()


def test_the_ctypes_reader_reads_what_the_c_reader_reads(
        topic_factory: Callable[..., str]) -> None:
    layout = rdkafka._layout()
    assert layout is not None
    read = rdkafka._ctypes_headers(layout)
    topic = topic_factory()
    produce(topic, [{"value": b"v", "headers": HOSTILE}, {"value": b"w"}])
    with_headers, without = consume(topic, 2)
    assert read(with_headers) == rdkafka.headers(with_headers)
    assert read(without) is None
    made = Message(topic="t", headers=[("a", b"1")])
    assert read(made) == rdkafka.headers(made) == [("a", b"1")]


def test_confluent_kafkas_reader_loses_the_headers_but_not_the_process(
        topic_factory: Callable[..., str]) -> None:
    """The fallback where the Message layout is unknown."""
    topic = topic_factory()
    produce(topic, [{"value": b"v", "headers": HOSTILE}])
    (msg,) = consume(topic, 1)
    assert rdkafka._guarded(msg) is None
    assert rdkafka._guarded(msg) is None and msg.headers() is None


def test_refusals_raise_as_confluent_kafkas_producer_does() -> None:
    producer = rdkafka.Producer({"bootstrap.servers": stack.BOOTSTRAP, "message.max.bytes": 1000,
                                 "queue.buffering.max.messages": 1})
    with pytest.raises(KafkaException) as info:
        producer.produce("t", value=b"x" * 2000)
    assert info.value.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    producer.produce("t-" + uuid.uuid4().hex, value=b"x")
    with pytest.raises(BufferError):
        producer.produce("t-" + uuid.uuid4().hex, value=b"x")
    producer.close()
    with pytest.raises(KafkaException, match="No such configuration property"):
        rdkafka.Producer({"no.such.property": 1})
