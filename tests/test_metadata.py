"""``--with-metadata`` end to end, and the trace context a record's headers carry.

A real ``celery worker`` runs the reference tasks, which record the ``kafka``
keyword argument they got; the expected one is computed here from what was
produced (keys, headers) and where Kafka put it (partition, offset, timestamp).
"""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery

from ingestd.celery import reference_tasks
from ingestd.metadata import trace_context
from tests import stack

N = 200
KEYS: list[bytes | None] = [b"host-1", b"\xff\x00 not utf-8", None, "ключ 😀".encode()]
HEADERS: list[list[tuple[str, Any]] | None] = [
    None,
    [("source", b"edge-7"), ("blob", b"\xff\xfe\x00"), ("source", b"again")],
    [("empty", b""), ("null", None), ("ünï", "çødé".encode())],
]


def _text(value: bytes | None, where: str, encoded: list[str]) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        encoded.append(where)
        return base64.b64encode(value).decode()


def expected_kafka(i: int, topic: str, partition: int, offset: int,
                   timestamp: int) -> dict[str, Any]:
    encoded: list[str] = []
    key = _text(KEYS[i % len(KEYS)], "key", encoded)
    headers = [[name, _text(value, f"headers.{k}", encoded)]
               for k, (name, value) in enumerate(HEADERS[i % len(HEADERS)] or [])]
    return {"topic": topic, "partition": partition, "offset": offset, "timestamp": timestamp,
            "key": key, "headers": headers, "base64": encoded}


@pytest.mark.parametrize("mode", ["each", "batch"])
def test_tasks_get_the_kafka_keyword_argument(topic_factory: Callable[..., str],
                                              broker_url: str, mode: str) -> None:
    topic = topic_factory(partitions=2)
    delivered: list[tuple[int, int, int]] = []
    stack.produce(topic, (stack.signal_record(i) for i in range(N)), delivered=delivered,
                  keys=(KEYS[i % len(KEYS)] for i in range(N)),
                  headers=(HEADERS[i % len(HEADERS)] for i in range(N)))
    timestamps = {(m.partition(), m.offset()): m.timestamp()[1]
                  for m in stack.consume_all(topic, N)}
    g = stack.group()
    args = stack.ingestd_args(topic, g, broker_url, "--dispatch", mode, "--with-metadata")
    results = redis.Redis.from_url(broker_url)
    with stack.Ingestd(*args) as ingestd, stack.celery_worker(broker_url):
        assert stack.wait_until(lambda: results.hlen(reference_tasks.KAFKA_KEY) >= N, 120), \
            ingestd.output()
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()
    got = {k.decode(): json.loads(v)
           for k, v in results.hgetall(reference_tasks.KAFKA_KEY).items()}
    expected = {f"{topic}-{p}-{o}": expected_kafka(i, topic, p, o, timestamps[(p, o)])
                for i, p, o in delivered}
    assert got == expected
    assert int(results.get(reference_tasks.EXECUTED_KEY) or 0) == N


def test_without_metadata_tasks_get_no_kwargs(topic_factory: Callable[..., str],
                                              broker_url: str) -> None:
    topic = topic_factory(partitions=1)
    stack.produce(topic, [stack.signal_record(0)], keys=[b"k"], headers=[[("h", b"v")]])
    with stack.Ingestd(*stack.ingestd_args(topic, stack.group(), broker_url)) as ingestd:
        assert stack.wait_until(lambda: stack.queued_tasks(broker_url), 60), ingestd.output()
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    (task,) = stack.queued_tasks(broker_url)
    assert task["kwargs"] == {} and task["kwargsrepr"] == "{}"
    assert task["args"] == [json.loads(stack.signal_record(0))]


TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(("headers", "expected"), [
    ([("traceparent", TP.encode())], {"traceparent": TP}),
    ([("tracestate", b"a=1"), ("x", b"y"), ("traceparent", TP.encode())],
     {"traceparent": TP, "tracestate": "a=1"}),
    ([("TraceParent", TP.encode()), ("traceparent", b"00-second")], {"traceparent": TP}),
    ([("tracestate", b"a=1")], None),  # a tracestate alone continues nothing
    ([("traceparent", None)], None),
    ([("traceparent", "ünï".encode())], None),  # not ASCII
    ([("traceparent", b"00-\n")], None),  # not printable
    ([("traceparent", b"0" * 513)], None),  # longer than W3C allows
    ([("other", b"x")], None),
    ([(b"\xfftraceparent", b"x"), ("traceparent", TP.encode())], {"traceparent": TP}),
    ([(b"traceparent", TP.encode())], None),  # bytes: a name that was not UTF-8
])
def test_trace_context_from_record_headers(headers: list[tuple[str | bytes, bytes | None]],
                                           expected: dict[str, str] | None) -> None:
    assert trace_context(headers) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [
    TP, "", "00-second", TP.upper(), "ff" + TP[2:], TP[:3] + "0" * 32 + TP[35:],
    TP[:36] + "0" * 16 + TP[52:], TP + "-more", "01" + TP[2:] + "-more", "01" + TP[2:],
    TP[:-1], TP + "0", " " + TP, TP + "\t", "\t01" + TP[2:] + "-x ",
])
def test_a_traceparent_is_passed_on_where_opentelemetry_reads_it(value: str) -> None:
    """The W3C check is OpenTelemetry's own: what its propagator (the instrumented
    worker's) reads as a valid span context is passed on, and nothing else."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": value})
    valid = trace.get_current_span(context).get_span_context().is_valid
    got = trace_context([("traceparent", value.encode())])
    assert got == ({"traceparent": value} if valid else None)


def test_a_traced_celery_worker_continues_the_records_trace(topic_factory: Callable[..., str],
                                                            broker_url: str) -> None:
    """A real ``celery worker`` with opentelemetry-instrumentation-celery and an in-memory
    exporter (tests/traced_tasks.py) records each task's span in the trace of its
    record's ``traceparent``, as a child of the producer's span; a record without one
    starts a trace of its own."""
    from tests.traced_tasks import SPANS_KEY

    topic = topic_factory(partitions=1)
    traces = [f"{i + 1:032x}" for i in range(3)]
    parents = [f"{0xabc0 + i:016x}" for i in range(3)]
    headers = [[("traceparent", f"00-{t}-{p}-01".encode()), ("tracestate", b"vendor=x")]
               for t, p in zip(traces, parents, strict=True)] + [None]
    stack.produce(topic, (stack.signal_record(i) for i in range(4)), partition=0,
                  headers=headers)
    results = redis.Redis.from_url(broker_url)
    with stack.Ingestd(*stack.ingestd_args(topic, stack.group(), broker_url)) as ingestd, \
            stack.celery_worker(broker_url, app="tests.traced_tasks", pool="solo") as worker:
        assert stack.wait_until(lambda: results.hlen(reference_tasks.RUNS_KEY) >= 4, 90), \
            ingestd.output()
        Celery(broker=broker_url, set_as_current=False).send_task("traced.finished_spans")
        assert stack.wait_until(lambda: results.get(SPANS_KEY), 60), worker
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    spans = [s for s in json.loads(results.get(SPANS_KEY))
             if s["name"].startswith("run/ingest_and_score_signal")]
    by_task = {s["task_id"]: s for s in spans}
    assert set(by_task) == {f"{topic}-0-{o}" for o in range(4)}, spans
    for offset, (trace_id, parent) in enumerate(zip(traces, parents, strict=True)):
        span = by_task[f"{topic}-0-{offset}"]
        assert (span["trace_id"], span["parent_span_id"]) == (trace_id, parent)
    assert by_task[f"{topic}-0-3"]["trace_id"] not in traces
