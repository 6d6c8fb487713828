"""Micro benchmarks of ingestd's hot path against the alternatives, on a 1000-record corpus.

Every benchmark processes the whole corpus (or one batch of 1000 messages), so the
per-record cost is the reported time / 1000 (``extra_info["records"]``).

Groups:

- ``decode+validate``: one record's bytes to a validated dict (or, typed, validated only).
- ``decode: value formats``: the same signals as plain JSON and in the Schema Registry's
  wire format (JSON Schema, Avro, Protobuf), each to a validated dict.
- ``build message``: 1000 ``each``-mode tasks to the bytes kombu's Redis transport LPUSHes
  (ingestd: the whole LPUSH command, in C and in Python);
  ``build message: argsrepr`` and ``build message: delivery_tag`` time two of its pieces.
- ``publish``: 1000 messages into a real Redis list, as one batch.
- ``decode+build: record headers``: a worker's decode and build of 1000 consumed records
  without headers (the hot path), with headers but no trace context, each with a
  ``traceparent``, and with ``--with-metadata``: what a record's headers cost.
- ``consume``: 1000 records librdkafka has fetched already, handed to Python as
  ``Message`` objects by ``Consumer.consume``: in one call, one call a record, and with
  the worker's decode and build after it (the loop thread's whole per-record path).
- ``hostile shapes``: one record of about 1 MB, shaped to be costly (commas, escaped
  quotes, deep brackets, long strings, big numbers), through a worker's decode and build:
  every per-record check is linear in the record's size.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import orjson
import pytest
import redis
from celery import Celery
from celery.utils.saferepr import saferepr
from confluent_kafka import Message
from kombu import serialization
from kombu.utils.json import dumps as kombu_dumps

from benchmarks import pipes
from benchmarks.conftest import N_RECORDS, TOPIC
from ingestd import schema
from ingestd.celery import codec, dispatch
from ingestd.config import Config
from tests import seams, stack

Benchmark = Any  # pytest_benchmark.fixture.BenchmarkFixture
Signal = schema.Signal


def _records(benchmark: Benchmark, n: int = N_RECORDS) -> None:
    benchmark.extra_info["records"] = n


def _per_record(benchmark: Benchmark) -> None:
    """After the run: the mean per record in microseconds, next to the per-batch stats."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        n = benchmark.extra_info["records"]
        benchmark.extra_info["mean_per_record_us"] = round(stats.stats.mean / n * 1e6, 3)


# --------------------------------------------------------------------------- decode+validate


def _each_record(one: Callable[[bytes], Any]) -> Callable[[list[bytes]], list[Any]]:
    """Every variant pays one Python call per record, as ingestd's ``check`` does."""

    def run(corpus: list[bytes]) -> list[Any]:
        return [one(raw) for raw in corpus]

    return run


def _then_convert(decode: Callable[[bytes], Any]) -> Callable[[list[bytes]], list[Any]]:
    """Decode to a dict with ``decode``, validate it with ``msgspec.convert``."""
    convert = msgspec.convert

    def one(raw: bytes) -> Any:
        obj = decode(raw)
        convert(obj, Signal)
        return obj

    return _each_record(one)


def _typed_plus_orjson() -> Callable[[list[bytes]], list[Any]]:
    loads, typed = orjson.loads, msgspec.json.Decoder(Signal).decode

    def one(raw: bytes) -> Any:
        typed(raw)
        return loads(raw)

    return _each_record(one)


DECODERS: dict[str, Callable[[], Callable[[list[bytes]], list[Any]]]] = {
    "a-ingestd-Validator.check":
        lambda: _each_record(schema.Validator("signal", 1 << 20).check),
    "a2-ingestd-Validator.check typed (each mode, no dict)":
        lambda: _each_record(schema.Validator("signal", 1 << 20, typed=True).check),
    "b-orjson.loads+msgspec.convert": lambda: _then_convert(orjson.loads),
    "c-msgspec.Decoder(Signal)+orjson.loads": _typed_plus_orjson,
    "d-msgspec.json.decode+convert": lambda: _then_convert(msgspec.json.decode),
    "d2-msgspec.json.Decoder().decode+convert":
        lambda: _then_convert(msgspec.json.Decoder().decode),
    "e-json.loads(old script, no validation)": lambda: _each_record(json.loads),
    "f-msgspec.Decoder(Signal) only (floor, no dict)":
        lambda: _each_record(msgspec.json.Decoder(Signal).decode),
}


@pytest.mark.benchmark(group="decode+validate")
@pytest.mark.parametrize("variant", list(DECODERS))
def test_decode_validate(benchmark: Benchmark, corpus: list[bytes],
                         signals: list[dict[str, Any]], variant: str) -> None:
    _records(benchmark)
    out = benchmark(DECODERS[variant](), corpus)
    _per_record(benchmark)
    assert len(out) == N_RECORDS
    if not variant.startswith(("f-", "a2-")):
        assert out == signals


# --------------------------------------------------------------- decode: value formats


def _plain_signal(signal: dict[str, Any], i: int) -> dict[str, Any]:
    """The corpus signal with the five fields every format's schema declares."""
    ts = signal["timestamp"]
    return {"name": signal["name"], "value": float(signal["value"]),
            "source": signal["source"],
            "timestamp": ts if isinstance(ts, float) else 1732800000.0 + i,
            "tags": signal.get("tags", {})}


FORMATS = ["json", "registry-json", "registry-avro", "registry-protobuf"]


@pytest.mark.benchmark(group="decode: value formats")
@pytest.mark.parametrize("value_format", FORMATS)
def test_decode_value_format(benchmark: Benchmark, signals: list[dict[str, Any]],
                             value_format: str) -> None:
    """A record's value to a validated signal, as a worker does it: plain JSON
    (``Validator.check``), or the registry's wire format decoded to JSON first
    (``Registry.decode``, the schema cached), then checked. The same signals in each."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from ingestd.registry import Registry
    from tests import registry_formats

    _records(benchmark)
    plain = [_plain_signal(s, i) for i, s in enumerate(signals)]
    check = schema.Validator("signal", 1 << 20).check
    if value_format == "json":
        values = [orjson.dumps(s) for s in plain]
        decode: Callable[[bytes], bytes] = bytes
    else:
        client = SchemaRegistryClient.new_client({"url": f"mock://bench-{value_format}"})
        kind = value_format.removeprefix("registry-")
        serialize = registry_formats.signal_serializer(kind, client)
        values = [serialize(s, TOPIC) for s in plain]
        reg = Registry(Config(value_format=value_format, schema_registry_url="mock://b"),
                       client)
        reg.resolve([Message(topic=TOPIC, partition=0, offset=0, value=values[0])])
        decode = reg.decode

    def run() -> list[Any]:
        return [check(decode(v)) for v in values]

    out = benchmark(run)
    _per_record(benchmark)
    assert out == plain


# ----------------------------------------------------------------------------- build message


def _envelope_view(envelope: bytes | str) -> dict[str, Any]:
    """An envelope with the body decoded and the per-message random delivery_tag removed."""
    env: dict[str, Any] = json.loads(envelope)
    env["body"] = json.loads(base64.b64decode(env["body"]))
    del env["properties"]["delivery_tag"]
    return env


@pytest.mark.parametrize("path", ["C", "Python"])
def test_build_ingestd(benchmark: Benchmark, dispatcher: dispatch.RedisDispatcher,
                       tasks: list[dispatch.Task], path: str,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole LPUSH command of a batch, as the worker builds it: by ``ingestd._native``,
    or by the Python path that runs where it is not built."""
    benchmark.group = "build message"
    if path == "Python":
        monkeypatch.setattr(codec, "native", None)
    _records(benchmark)
    out = benchmark(dispatcher.prepare, tasks)
    _per_record(benchmark)
    assert out.data.count(b'"delivery_tag"') == N_RECORDS


@pytest.mark.stack
def test_build_celery_send_task(benchmark: Benchmark, dispatcher: dispatch.RedisDispatcher,
                                config: Config, tasks: list[dispatch.Task]) -> None:
    """Celery's own ``send_task`` down to the envelope bytes; the channel's ``_put`` only keeps
    ``kombu.utils.json.dumps(message)`` (what the Redis transport would LPUSH)."""
    benchmark.group = "build message"
    _records(benchmark)
    app = dispatcher.app
    out: list[str] = []

    def capture(queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        out.append(kombu_dumps(message))

    conn = app.connection_for_write()
    try:
        producer = conn.Producer()
        producer.channel._put = capture
        send_task, name, queue = app.send_task, config.task, config.queue

        def run() -> list[str]:
            out.clear()
            for t in tasks:
                send_task(name, args=t.objs, kwargs={}, task_id=t.task_id, queue=queue,
                          producer=producer)
            return out

        built = benchmark(run)
        _per_record(benchmark)
    finally:
        conn.release()
    assert len(built) == N_RECORDS
    ours = dispatcher.encode(tasks[:50])
    assert [_envelope_view(e) for e in built[:50]] == [_envelope_view(e) for e in ours]


@pytest.mark.stack
def test_build_celery_pieces(benchmark: Benchmark, dispatcher: dispatch.RedisDispatcher,
                             config: Config, tasks: list[dispatch.Task]) -> None:
    """The same message from Celery's pieces, without send_task's routing/ensure/signals:
    ``as_task_v2`` + ``kombu.serialization.dumps`` + ``prepare_message`` + the virtual
    channel's body encoding and delivery tag + ``kombu.utils.json.dumps``."""
    benchmark.group = "build message"
    _records(benchmark)
    app: Celery = dispatcher.app
    c = dispatcher.captured
    reply_to, origin = c.properties["reply_to"], c.headers["origin"]
    conn = app.connection_for_write()
    try:
        channel = conn.default_channel
        as_task_v2, name, key = app.amqp.as_task_v2, config.task, c.routing_key
        dumps: Callable[..., tuple[str, str, Any]] = serialization.dumps

        def run() -> list[str]:
            out = []
            for t in tasks:
                m = as_task_v2(t.task_id, name, args=t.objs, kwargs={}, reply_to=reply_to,
                               origin=origin, ignore_result=None)
                ctype, cenc, body = dumps(m.body, serializer="json")
                message = channel.prepare_message(body, 0, ctype, cenc, m.headers,
                                                  {**m.properties, "delivery_mode": 2})
                channel._inplace_augment_message(message, "", key)
                out.append(kombu_dumps(message))
            return out

        built = benchmark(run)
        _per_record(benchmark)
    finally:
        conn.release()
    assert len(built) == N_RECORDS
    ours = dispatcher.encode(tasks[:50])
    assert [_envelope_view(e) for e in built[:50]] == [_envelope_view(e) for e in ours]


def _saferepr(args: list[Any], maxsize: int) -> str:
    text: str = saferepr(args, maxsize)
    return text


def _native_argsrepr(raws: list[bytes], _args: list[list[Any]], size: int) -> list[str]:
    assert codec.native is not None
    fn = codec.native.argsrepr
    return [orjson.loads(fn(raw, size) or b"null") for raw in raws]


def _objects(fn: Callable[[list[Any], int], str]) -> Callable[..., list[str]]:
    def run(_raws: list[bytes], args: list[list[Any]], size: int) -> list[str]:
        return [fn(a, size) for a in args]

    return run


ARGSREPR: dict[str, Callable[[list[bytes], list[list[Any]], int], list[str]]] = {
    "ingestd._native.argsrepr (from the bytes)": _native_argsrepr,
    "codec.argsrepr (from the dict)": _objects(codec.argsrepr),
    "celery saferepr": _objects(_saferepr),
}


@pytest.mark.parametrize("variant", list(ARGSREPR))
def test_build_argsrepr(benchmark: Benchmark, corpus: list[bytes],
                        signals: list[dict[str, Any]],
                        dispatcher: dispatch.RedisDispatcher, variant: str) -> None:
    benchmark.group = "build message: argsrepr"
    _records(benchmark)
    size = dispatcher.captured.argsrepr_maxsize
    args = [[s] for s in signals]
    out = benchmark(ARGSREPR[variant], corpus, args, size)
    _per_record(benchmark)
    assert out == [saferepr(a, size) for a in args]


def _uuid4_strs(n: int) -> list[bytes]:
    """What kombu does per message, encoded as the envelope holds it."""
    return [str(uuid.uuid4()).encode() for _ in range(n)]


DELIVERY_TAGS = {
    "codec.delivery_tags(1000)": codec.delivery_tags,
    "[str(uuid.uuid4()).encode() x1000]": _uuid4_strs,
}


@pytest.mark.parametrize("variant", list(DELIVERY_TAGS))
def test_build_delivery_tags(benchmark: Benchmark, variant: str) -> None:
    benchmark.group = "build message: delivery_tag"
    _records(benchmark)
    out = benchmark(DELIVERY_TAGS[variant], N_RECORDS)
    _per_record(benchmark)
    assert len(set(out)) == N_RECORDS
    tags = [t.decode() for t in out]
    assert all(uuid.UUID(tag).version == 4 and str(uuid.UUID(tag)) == tag for tag in tags)


# ----------------------------------------------------------------------------------- publish

PUBLISH_ROUNDS = 20


def _publish(benchmark: Benchmark, client: redis.Redis, key: str, run: Callable[[], Any],
             rounds: int = PUBLISH_ROUNDS, expect: list[bytes] | None = None) -> None:
    """Time ``run`` (one batch of 1000), with the list emptied before each round.

    ``expect``: the envelopes the list must then hold (delivery tags aside), oldest first.
    """
    benchmark.group = "publish"
    _records(benchmark)

    def empty() -> None:
        client.delete(key)

    benchmark.pedantic(run, setup=empty, rounds=rounds, warmup_rounds=1)
    _per_record(benchmark)
    assert client.llen(key) == N_RECORDS
    if expect is not None:
        stored = client.lrange(key, 0, -1)[::-1]  # LPUSH: newest at the head
        assert [_envelope_view(e) for e in stored] == [_envelope_view(e) for e in expect]
    client.delete(key)


@pytest.mark.stack
def test_publish_lpush_multi(benchmark: Benchmark, redis_client: redis.Redis,
                             dispatcher: dispatch.RedisDispatcher, envelopes: list[bytes]) -> None:
    """(a) ingestd: one multi-value LPUSH of the prepared envelopes."""
    key, lpush = dispatcher.key, redis_client.lpush
    _publish(benchmark, redis_client, key, lambda: lpush(key, *envelopes), expect=envelopes)


def _publish_args(envelope: bytes) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """Body, headers and ``publish`` properties of an ingestd envelope (pre-serialized)."""
    env = orjson.loads(envelope)
    props = env["properties"]
    for transport_added in ("delivery_info", "body_encoding", "delivery_tag", "priority"):
        del props[transport_added]
    return base64.b64decode(env["body"]), env["headers"], props


@pytest.mark.stack
def test_publish_kombu_batch(benchmark: Benchmark, redis_client: redis.Redis,
                             dispatcher: dispatch.RedisDispatcher, envelopes: list[bytes]) -> None:
    """(b) kombu 5.7 ``Producer.batch()``: 1000 ``publish`` calls of pre-serialized bodies,
    buffered in one non-transactional pipeline (one LPUSH per message)."""
    c = dispatcher.captured
    prepared = [_publish_args(e) for e in envelopes]
    conn = dispatcher.app.connection_for_write()
    try:
        producer = conn.Producer()
        assert producer.channel.supports_batch_publish, "kombu would publish immediately"
        publish, key = producer.publish, c.routing_key

        def run() -> None:
            with producer.batch(max_size=N_RECORDS):
                for body, headers, props in prepared:
                    publish(body, routing_key=key, exchange=c.exchange,
                            content_type=c.content_type, content_encoding=c.content_encoding,
                            headers=headers, **props)

        _publish(benchmark, redis_client, key, run, expect=envelopes)
    finally:
        conn.release()


@pytest.mark.stack
def test_publish_celery_send_task(benchmark: Benchmark, redis_client: redis.Redis,
                                  dispatcher: dispatch.RedisDispatcher, config: Config,
                                  tasks: list[dispatch.Task]) -> None:
    """(c) the old script's way: ``send_task`` per message (builds and LPUSHes each one)."""
    app, name, queue = dispatcher.app, config.task, config.queue

    def run() -> None:
        with app.producer_or_acquire() as producer:
            for t in tasks:
                app.send_task(name, args=t.objs, kwargs={}, task_id=t.task_id, queue=queue,
                              producer=producer)

    _publish(benchmark, redis_client, dispatcher.key, run, rounds=5,
             expect=dispatcher.encode(tasks))


@pytest.mark.stack
def test_publish_pipeline(benchmark: Benchmark, redis_client: redis.Redis,
                          dispatcher: dispatch.RedisDispatcher, envelopes: list[bytes]) -> None:
    """(d) a non-transactional pipeline, one LPUSH per message."""
    key = dispatcher.key

    def run() -> None:
        pipe = redis_client.pipeline(transaction=False)
        for m in envelopes:
            pipe.lpush(key, m)
        pipe.execute()

    _publish(benchmark, redis_client, key, run)


@pytest.mark.stack
def test_publish_ingestd_end_to_end(benchmark: Benchmark, redis_client: redis.Redis,
                                    dispatcher: dispatch.RedisDispatcher,
                                    tasks: list[dispatch.Task]) -> None:
    """(e) ingestd's whole ``RedisDispatcher.publish``: encode + one LPUSH (compare with c)."""
    _publish(benchmark, redis_client, dispatcher.key, lambda: dispatcher.publish(tasks))


# --------------------------------------------------------------- decode+build: record headers

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
HEADERS: dict[str, list[tuple[str, str | bytes | None]] | None] = {
    "no headers": None,
    "other headers": [("source", b"edge-7"), ("schema", b"v2")],
    "traceparent": [("traceparent", TRACEPARENT), ("tracestate", b"vendor=x")],
    "no headers, --with-metadata": None,
}


@pytest.fixture(params=list(HEADERS))
def headed(request: pytest.FixtureRequest, config: Config, corpus: list[bytes]) -> Iterator[
        tuple[str, seams.Seam, dispatch.RedisDispatcher, list[Message]]]:
    variant = request.param
    cfg = Config(broker_url=config.broker_url, queue=config.queue,
                 with_metadata=variant.endswith("--with-metadata"))
    d = dispatch.create(cfg)
    assert isinstance(d, dispatch.RedisDispatcher)
    messages = [Message(topic=TOPIC, partition=0, offset=i, value=raw, key=b"host-1",
                        headers=HEADERS[variant], timestamp=(1, 1732800000000 + i))
                for i, raw in enumerate(corpus)]
    yield variant, seams.decoder(cfg, {(TOPIC, 0)}), d, messages
    d.close()


@pytest.mark.stack
def test_decode_build_record_headers(
        benchmark: Benchmark,
        headed: tuple[str, seams.Seam, dispatch.RedisDispatcher, list[Message]]) -> None:
    """What the trace context and ``--with-metadata`` add per record, against records
    without headers: those pay one look at their headers."""
    variant, worker, d, messages = headed
    benchmark.group = "decode+build: record headers"
    benchmark.extra_info["variant"] = variant
    _records(benchmark)

    def run() -> dispatch.Packed:
        return d.prepare(worker.decode(messages).tasks)

    out = benchmark(run)
    _per_record(benchmark)
    assert out.data.count(b'"delivery_tag"') == N_RECORDS
    assert (b"traceparent" in out.data) is (variant == "traceparent")


# --------------------------------------------------------------------------- consume

CONSUME_ROUNDS = 30
PREFETCH = 3.0  # seconds for librdkafka to fetch the topic (6 MB) after the first record
CONSUME = ["consume(1000)", "consume(1), 1000 times", "consume(1000), decode, build"]


@pytest.fixture(scope="module")
def fetched_topic(corpus: list[bytes]) -> Iterator[str]:
    """A partition holding enough records for every round of every variant."""
    topic = stack.create_topic(1, prefix="micro")
    stack.produce(topic, (corpus[i % N_RECORDS]
                          for i in range((CONSUME_ROUNDS + 2) * N_RECORDS)), partition=0)
    yield topic
    stack.delete_topic(topic)


@pytest.mark.stack
@pytest.mark.benchmark(group="consume")
@pytest.mark.parametrize("way", CONSUME)
def test_consume(benchmark: Benchmark, config: Config, fetched_topic: str, way: str) -> None:
    """What a record costs the loop's thread from librdkafka's queue on: a consumer with
    ingestd's settings, its prefetch filled, hands over 1000 records a round."""
    benchmark.extra_info["variant"] = way
    _records(benchmark)
    consumer = pipes.consumer(fetched_topic, stack.BOOTSTRAP)
    d = dispatch.create(config)
    worker = seams.decoder(config, {(fetched_topic, 0)}, d)
    try:
        first: list[Message] = []
        while not first:
            first = consumer.consume(1, 1.0)
        time.sleep(PREFETCH)

        def run() -> int:
            if way == "consume(1), 1000 times":
                return sum(len(consumer.consume(1, 1.0)) for _ in range(N_RECORDS))
            messages = consumer.consume(N_RECORDS, 1.0)
            if way == "consume(1000), decode, build":
                d.prepare(worker.decode(messages).tasks)
            return len(messages)

        got = benchmark.pedantic(run, rounds=CONSUME_ROUNDS, warmup_rounds=1)
    finally:
        consumer.close()
        d.close()
    _per_record(benchmark)
    assert got == N_RECORDS


# --------------------------------------------------------------------- hostile shapes

MB = 1_000_000


def _signal(extra: bytes = b"", name: bytes = b'"n"') -> bytes:
    return b'{"name":' + name + b',"value":1,"source":"s","timestamp":1' + extra + b"}"


# One record each, about 1 MB. Those over --max-record-items are refused as too_large
# by the item counter, on their bytes; the others are decoded and built.
HOSTILE: dict[str, bytes] = {
    "commas": b"[" + b"0," * (MB // 2) + b"0]",
    "escaped quotes, unterminated": b"[" + b"," * 10_001 + b'"' + b'\\"' * (MB // 2),
    "deep brackets": b"[" * (MB // 2) + b"]" * (MB // 2),
    "quotes": b'"' * MB,
    "long string": _signal(name=b'"' + b"x" * MB + b'"'),
    "escaped quotes in a string": _signal(name=b'"' + b'\\"' * (MB // 2) + b'"'),
    "unicode escapes": _signal(name=b'"' + b"\\u00e9" * (MB // 6) + b'"'),
    "9,000 strings": _signal(b',"l":[' + b",".join([b'"' + b"a" * 100 + b'"'] * 9000) + b"]"),
    "4,000-digit integers": _signal(b',"n":[' + b",".join([b"7" * 4000] * 240) + b"]"),
    "white space": _signal(b" " * MB),
}


@pytest.mark.benchmark(group="hostile shapes")
@pytest.mark.parametrize("shape", list(HOSTILE))
@pytest.mark.parametrize("mode", ["each", "batch"])
def test_hostile_shapes(benchmark: Benchmark, config: Config, shape: str, mode: str) -> None:
    """A worker's decode and build of one costly record of about 1 MB."""
    _records(benchmark, 1)
    benchmark.extra_info["bytes"] = len(HOSTILE[shape])
    cfg = Config(broker_url=config.broker_url, queue=config.queue, dispatch=mode,
                 max_record_bytes=2 * MB)
    d = dispatch.create(cfg)
    worker = seams.decoder(cfg, {(TOPIC, 0)}, d)
    records = [Message(topic=TOPIC, partition=0, offset=0, value=HOSTILE[shape],
                       timestamp=(1, 1732800000000))]

    def run() -> Any:
        batch = worker.decode(records)
        worker.build(batch)
        return batch

    try:
        batch = benchmark(run)
    finally:
        d.close()
    _per_record(benchmark)
    assert len(batch.tasks) + len(batch.letters) == 1
