"""The fast path builds exactly the message Celery's own ``send_task`` builds.

Every comparison publishes the same task twice into a real broker: once with
``app.send_task`` (kombu's own encoding) and once with ingestd's dispatcher,
then reads both back and compares them field by field. The only field allowed
to differ is kombu's random per-message ``delivery_tag``.

``send_task`` runs on the dispatcher's own Celery app: ``reply_to`` is derived
from the app instance (``app.thread_oid``), so two apps never agree on it.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import orjson
import pytest
import redis
from celery import Celery
from celery.utils.saferepr import saferepr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection, Queue
from kombu.transport.base import to_rabbitmq_queue_arguments

from ingestd.celery import codec, dispatch
from ingestd.config import Config
from ingestd.errors import DispatchError, RecordError
from ingestd.schema import Validator
from tests import stack

EACH_TASK = "ingest_and_score_signal"
BATCH_TASK = "ingest_and_score_signals"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

# --- JSON values as a Kafka record may carry them ------------------------------------------

_specials = "'\"\\/\n\r\t\b\f\x00\x01\x1f\x7f é€\u2028😀ключ"
_keys = st.text(max_size=12) | st.sampled_from(["name", "value", "it's", 'say "hi"', "a\\b", ""])
_strings = (
    st.text(max_size=40)
    | st.text(alphabet=st.sampled_from(_specials + "abc"), max_size=40)
    | st.builds(lambda c, n: c * n, st.sampled_from(["x", "'", '"', "\\", "é", "ab "]),
                st.integers(1000, 3000))  # longer than argsrepr's 1024
)
_numbers = (
    st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson encodes as integers
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1.7976931348623157e308, -1e308, 5e-324, 1e16, 1e-7, 0.1, -0.0, 2**53 + 1])
)
_scalars = st.none() | st.booleans() | _numbers | _strings
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=25,
)
json_objects = st.dictionaries(_keys, json_values, max_size=6)
signals = st.builds(
    lambda base, extra: {**extra, **base},
    st.fixed_dictionaries(
        {"name": st.text(min_size=1, max_size=20), "value": _numbers, "source": _strings,
         "timestamp": st.floats(0, 4e9) | st.just("2024-05-01T12:00:00.5+02:00")},
        optional={"id": st.text(max_size=36),
                  "tags": st.dictionaries(_keys, st.text(max_size=20), max_size=4)},
    ),
    json_objects,
)

CURATED: list[dict[str, Any]] = [
    {"name": "cpu", "value": 0.93, "source": "host-1", "timestamp": 1714557600},
    {"name": "cpu", "value": -1, "source": "h", "timestamp": "2024-05-01T12:00:00Z",
     "id": "abc", "tags": {"env": "prod", "region": "eu-west-1"}},
    {"name": "ünïcødé ключ 😀", "value": 1e308, "source": "it's \"quoted\" \\ back\\slash",
     "timestamp": 1.5, "ctl": "\x00\x01\x1f\x7f\n\t", "sep": "\u2028\u2029"},
    {"name": "long", "value": 2**63 - 1, "source": "x" * 5000, "timestamp": 0},
    {"name": "deep", "value": 1, "source": "s", "timestamp": 1,
     "nested": {"a": [1, {"b": [2, {"c": None}]}], "e": {}, "l": []}, "flag": True, "nil": None},
    {"name": "n", "value": 1.0, "source": "", "timestamp": 1, "big": 18446744073709551615,
     "small": -9223372036854775808, "tiny": 5e-324, "neg0": -0.0},
]


def _assert_uuid4(tag: Any) -> None:
    assert isinstance(tag, str)
    parsed = uuid.UUID(tag)
    assert parsed.version == 4
    assert parsed.variant == uuid.RFC_4122
    assert str(parsed) == tag  # canonical: lower case, hyphenated


def _decode_body(envelope: dict[str, Any]) -> Any:
    assert envelope["properties"]["body_encoding"] == "base64"
    raw = base64.b64decode(envelope["body"], validate=True)
    return json.loads(raw.decode(envelope["content-encoding"]))


def assert_same_envelope(ours: bytes, theirs: bytes) -> None:
    """Two kombu Redis envelopes are the same message; only the delivery tag may differ."""
    a, b = json.loads(ours), json.loads(theirs)
    assert set(a) == set(b) == {"body", "content-encoding", "content-type", "headers",
                                "properties"}
    assert _decode_body(a) == _decode_body(b)
    assert a["content-type"] == b["content-type"] == "application/json"
    assert a["content-encoding"] == b["content-encoding"] == "utf-8"
    assert a["headers"] == b["headers"]
    assert list(a["headers"]) == list(b["headers"])
    props_a, props_b = dict(a["properties"]), dict(b["properties"])
    _assert_uuid4(props_a.pop("delivery_tag"))
    _assert_uuid4(props_b.pop("delivery_tag"))
    assert props_a == props_b


# --- Redis ------------------------------------------------------------------------------------

Factory = Callable[..., dispatch.RedisDispatcher]


@pytest.fixture
def redis_client(broker_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker_url)
    yield client
    client.close()


@pytest.fixture(params=["native", "python"])
def dispatchers(broker_url: str, request: pytest.FixtureRequest,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Factory]:
    """Builds ingestd's Redis dispatcher for this test's own Redis database, once with the
    hot path in C (``ingestd._native``) and once as it runs where that is not built."""
    if request.param == "python":
        monkeypatch.setattr(codec, "native", None)
    made: list[dispatch.Dispatcher] = []

    def make(queue: str = "celery", mode: str = "each", **config: Any) -> dispatch.RedisDispatcher:
        d = dispatch.create(Config(broker_url=broker_url, queue=queue, dispatch=mode, **config))
        made.append(d)
        assert isinstance(d, dispatch.RedisDispatcher)
        return d

    yield make
    for d in made:
        d.close()


def _drain(client: redis.Redis, key: str) -> list[bytes]:
    """Every message in the queue list, oldest (next to be consumed by BRPOP) first."""
    items: list[bytes] = client.lrange(key, 0, -1)
    client.delete(key)
    return items[::-1]


def _compare_each(d: dispatch.RedisDispatcher, client: redis.Redis, queue: str,
                  objs: list[dict[str, Any]], raws: list[bytes] | None = None,
                  default_route: bool = False) -> None:
    """send_task one task per object, publish the same with ingestd, compare in order."""
    raws = raws if raws is not None else [orjson.dumps(o) for o in objs]
    ids = [f"pulse_signals-{i % 3}-{1000 + i}" for i in range(len(objs))]
    for task_id, obj in zip(ids, objs, strict=True):
        if default_route:
            d.app.send_task(EACH_TASK, args=[obj], kwargs={}, task_id=task_id)
        else:
            d.app.send_task(EACH_TASK, args=[obj], kwargs={}, task_id=task_id, queue=queue)
    theirs = _drain(client, queue)
    d.publish([dispatch.Task(task_id, "pulse_signals", [raw], [obj])
               for task_id, raw, obj in zip(ids, raws, objs, strict=True)])
    ours = _drain(client, queue)
    assert len(ours) == len(theirs) == len(objs)
    for mine, celery_s in zip(ours, theirs, strict=True):
        assert_same_envelope(mine, celery_s)
    for mine, task_id, obj in zip(ours, ids, objs, strict=True):
        envelope = json.loads(mine)
        assert envelope["headers"]["id"] == envelope["headers"]["root_id"] == task_id
        assert envelope["headers"]["task"] == EACH_TASK
        assert envelope["properties"]["correlation_id"] == task_id
        assert envelope["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}
        assert _decode_body(envelope) == [[obj], {}, EMBED]


def _compare_batch(d: dispatch.RedisDispatcher, client: redis.Redis, queue: str,
                   batches: list[list[dict[str, Any]]]) -> None:
    ids = [f"pulse_signals-0-{10 * i}-{10 * i + len(b) - 1}" for i, b in enumerate(batches)]
    record_ids = [[f"pulse_signals-0-{10 * i + k}" for k in range(len(b))]
                  for i, b in enumerate(batches)]
    for task_id, objs, rids in zip(ids, batches, record_ids, strict=True):
        d.app.send_task(BATCH_TASK, args=[objs], kwargs={}, task_id=task_id, queue=queue,
                        headers={codec.RECORD_IDS: rids})
    theirs = _drain(client, queue)
    d.publish([dispatch.Task(task_id, "pulse_signals", [orjson.dumps(o) for o in objs], objs,
                             rids)
               for task_id, objs, rids in zip(ids, batches, record_ids, strict=True)])
    ours = _drain(client, queue)
    assert len(ours) == len(theirs) == len(batches)
    for mine, celery_s, objs, rids in zip(ours, theirs, batches, record_ids, strict=True):
        assert_same_envelope(mine, celery_s)
        envelope = json.loads(mine)
        assert envelope["headers"]["task"] == BATCH_TASK
        assert envelope["headers"][codec.RECORD_IDS] == rids
        assert _decode_body(envelope) == [[objs], {}, EMBED]


@pytest.mark.stack
@pytest.mark.parametrize("queue", ["celery", "ingestd-custom.q"])
def test_redis_each_matches_send_task(dispatchers: Factory, redis_client: redis.Redis,
                                      queue: str) -> None:
    d = dispatchers(queue)
    _compare_each(d, redis_client, queue, CURATED)


@pytest.mark.stack
def test_redis_default_queue_matches_unrouted_send_task(dispatchers: Factory,
                                                        redis_client: redis.Redis) -> None:
    """Default config vs send_task without any queue argument: both land in 'celery'."""
    d = dispatchers()
    assert d.key == "celery"
    _compare_each(d, redis_client, "celery", CURATED, default_route=True)


@pytest.mark.stack
@pytest.mark.parametrize("queue", ["celery", "ingestd-custom.q"])
def test_redis_batch_matches_send_task(dispatchers: Factory, redis_client: redis.Redis,
                                       queue: str) -> None:
    d = dispatchers(queue, "batch")
    _compare_batch(d, redis_client, queue, [CURATED[:1], CURATED, CURATED[2:4]])


@pytest.mark.stack
def test_redis_forwards_record_bytes_verbatim(dispatchers: Factory,
                                              redis_client: redis.Redis) -> None:
    """Records need not be compact JSON: indented, non-ASCII bytes decode the same."""
    d = dispatchers()
    raws = [json.dumps(o, indent=2, ensure_ascii=False).encode() + b"\n" for o in CURATED]
    _compare_each(d, redis_client, "celery", CURATED, raws=raws)
    # and the body carries those exact bytes
    d.publish([dispatch.Task("t-0-0", "t", [raws[2]], [CURATED[2]])])
    (envelope,) = _drain(redis_client, "celery")
    assert raws[2] in base64.b64decode(json.loads(envelope)["body"])


_hyp = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


# Fixtures run once per test, not per example: one dispatcher serves every example.


# --- routes: topics to tasks on queues of their own ------------------------------------------

def _routed(mode: str, queues: tuple[str, str]) -> tuple[dict[str, Any], list[dispatch.Task]]:
    """Two topics routed to two tasks on two queues, and a batch that interleaves them:
    each topic's tasks in offset order, as a consume hands them over."""
    each = mode == "each"
    routes = {"pulse_signals": (EACH_TASK if each else BATCH_TASK, queues[0]),
              "pulse_events": ("archive_signal" if each else "archive_signals", queues[1])}
    config = {"topic": tuple(routes),
              "route": tuple(f"{t}={task}@{q}" for t, (task, q) in routes.items())}
    tasks = []
    for i, obj in enumerate(CURATED):
        topic = list(routes)[i % 2]
        if each:
            tasks.append(dispatch.Task(f"{topic}-0-{i}", topic, [orjson.dumps(obj)], [obj]))
        else:
            objs = CURATED[: i + 1]
            ids = [f"{topic}-0-{10 * i + k}" for k in range(len(objs))]
            tasks.append(dispatch.slice_task(topic, [orjson.dumps(o) for o in objs], objs, ids))
    return {"routes": routes, "config": config}, tasks


def _refused_by_the_second_queue(d: dispatch.RedisDispatcher, redis_client: redis.Redis,
                                 queues: tuple[str, str],
                                 tasks: list[dispatch.Task]) -> dispatch.Packed:
    """The tasks sent while the second queue's key is not a list: Redis takes the first
    queue's LPUSH and refuses the second's; the batch is narrowed to that one."""
    d.publish(tasks[:2])  # connected, both queues declared
    for queue in queues:
        _drain(redis_client, queue)
    redis_client.set(queues[1], b"not a list")
    packed = d.prepare(tasks)
    with pytest.raises(DispatchError, match="refused 1 of 2"):
        d.send(packed)
    return packed


@pytest.mark.stack
def test_redis_a_retry_after_a_partial_refusal_repeats_nothing_accepted(
        dispatchers: Factory, redis_client: redis.Redis) -> None:
    """Redis applies each LPUSH of a transaction on its own and rolls none back: with one
    queue's key not a list, the other queue takes its tasks. The refused batch is
    narrowed to the refused LPUSH, so the retry repeats nothing the other queue holds."""
    queues = ("ingestd-scores", "ingestd-archive")
    routed, tasks = _routed("each", queues)
    d = dispatchers(**routed["config"])
    packed = _refused_by_the_second_queue(d, redis_client, queues, tasks)
    assert packed.replies == 1 and not packed.data.startswith(dispatch.MULTI)
    redis_client.delete(queues[1])
    d.send(packed)
    for queue, topic in zip(queues, routed["routes"], strict=True):
        assert [json.loads(m)["headers"]["id"] for m in _drain(redis_client, queue)] == \
            [t.task_id for t in tasks if t.topic == topic]


@pytest.mark.stack
@pytest.mark.parametrize("mode", ["each", "batch"])
def test_redis_a_retry_drops_the_partitions_revoked_while_it_waited(
        dispatchers: Factory, redis_client: redis.Redis, mode: str) -> None:
    """A refused batch narrowed to one queue's LPUSH, then partition 1 revoked: the retry
    sends that queue's tasks of partition 0 only, built again after their decoded records
    were freed, as send_task writes them; the other queue's command is untouched."""
    queues = ("ingestd-scores", "ingestd-archive")
    routed, tasks = _routed(mode, queues)
    tasks = [t._replace(task_id=t.task_id.replace("-0-", f"-{i % 4 // 2}-", 1),
                        ids=t.ids and [x.replace("-0-", f"-{i % 4 // 2}-", 1) for x in t.ids])
             for i, t in enumerate(tasks)]
    d = dispatchers(mode=mode, **routed["config"])
    packed = _refused_by_the_second_queue(d, redis_client, queues, tasks)
    assert len(_drain(redis_client, queues[0])) == len(tasks) // 2  # accepted, whole
    redis_client.delete(queues[1])
    for t in tasks:
        t.objs.clear()  # as the worker frees them once the batch is built
    kept = [t for t in tasks if t.topic == "pulse_events" and t.partition() == 0]
    d.send(d.without(packed, {("pulse_events", 1), ("pulse_signals", 1)}))
    assert _drain(redis_client, queues[0]) == []
    ours = _drain(redis_client, queues[1])
    assert [json.loads(m)["headers"]["id"] for m in ours] == [t.task_id for t in kept]
    _send_task_as_routed(d, routed["routes"], [t.restored() for t in kept])
    for mine, celery_s in zip(ours, _drain(redis_client, queues[1]), strict=True):
        assert_same_envelope(mine, celery_s)


def _signals(topic: str, n: int) -> list[dispatch.Task]:
    return [dispatch.Task(f"{topic}-0-{i}", topic, [orjson.dumps(obj)], [obj])
            for i, obj in enumerate(CURATED[:n])]


@pytest.mark.stack
def test_redis_a_batch_too_few_replicas_confirmed_is_retried_as_a_wait(
        dispatchers: Factory, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--broker-min-replicas 1`` on the stack's Redis, which has no replica: the master
    takes the batch, WAIT finds no replica, the batch is refused. Its retries are a WAIT
    alone on the same connection (which covers what that connection wrote), so the
    master holds the batch once; only a lost connection pushes it again."""
    monkeypatch.setattr(dispatch, "REPLICA_WAIT_MS", 50)
    d = dispatchers(broker_min_replicas=1)
    packed = d.prepare(_signals("t", 5))
    for _ in range(3):
        with pytest.raises(DispatchError, match="0 of 1 replicas confirmed"):
            d.send(packed)
        assert redis_client.llen("celery") == 5
    d.close()  # as when the connection is lost
    with pytest.raises(DispatchError, match="0 of 1 replicas confirmed"):
        d.send(packed)
    assert redis_client.llen("celery") == 10


@pytest.mark.sentinel
def test_redis_sentinel_a_sent_batch_is_on_the_replica() -> None:
    """Through the stack's Sentinels (``scripts/stack up --with-sentinel``) to the master
    they name; with ``--broker-min-replicas 1`` the replica holds the batch once send()
    returns."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    d = dispatch.create(Config(broker_url=stack.sentinel_url(), queue=queue,
                               broker_master_name=stack.SENTINEL_MASTER, broker_min_replicas=1))
    tasks = _signals("t", 5)
    master, replicas = stack.sentinel_nodes()
    try:
        assert isinstance(d, dispatch.RedisDispatcher) and d.replicas() == len(replicas) >= 1
        d.send(d.prepare(tasks))
        assert d.queue_depths() == {queue: 5}
        assert [r.llen(queue) for r in replicas] == [5] * len(replicas)
        held = master.lrange(queue, 0, -1)
        assert [json.loads(m)["headers"]["id"] for m in held[::-1]] == [t.task_id for t in tasks]
    finally:
        master.delete(queue)
        d.close()


def _send_task_as_routed(d: dispatch.Dispatcher, routes: dict[str, Any],
                         tasks: list[dispatch.Task]) -> None:
    app = d.app  # type: ignore[attr-defined]
    for t in tasks:
        task, queue = routes[t.topic]
        extra = {"headers": {codec.RECORD_IDS: t.ids}} if t.ids is not None else {}
        args = [t.objs] if t.ids is not None else t.objs
        app.send_task(task, args=args, kwargs={}, task_id=t.task_id, queue=queue, **extra)


@pytest.mark.stack
@pytest.mark.parametrize("mode", ["each", "batch"])
def test_redis_routed_batch_matches_send_task_on_each_queue(
        dispatchers: Factory, redis_client: redis.Redis, mode: str) -> None:
    """One batch for two routes goes out as one MULTI/EXEC of two LPUSHes: each queue
    holds what send_task writes for its task and queue, in order."""
    queues = ("ingestd-scores", "ingestd-archive")
    routed, tasks = _routed(mode, queues)
    d = dispatchers(mode=mode, **routed["config"])
    _send_task_as_routed(d, routed["routes"], tasks)
    theirs = {q: _drain(redis_client, q) for q in queues}
    packed = d.prepare(tasks)
    assert packed.data.startswith(dispatch.MULTI) and packed.replies == 4
    d.send(packed)
    ours = {q: _drain(redis_client, q) for q in queues}
    for queue, (task, _) in zip(queues, routed["routes"].values(), strict=True):
        assert len(ours[queue]) == len(theirs[queue]) == len(tasks) // 2
        for mine, celery_s in zip(ours[queue], theirs[queue], strict=True):
            assert_same_envelope(mine, celery_s)
            assert json.loads(mine)["headers"]["task"] == task
    assert d.queue_depths() == dict.fromkeys(queues, 0)


@pytest.mark.stack
def test_redis_topic_without_a_route_goes_by_task_and_queue(dispatchers: Factory,
                                                            redis_client: redis.Redis) -> None:
    d = dispatchers("ingestd-default", topic=("pulse_signals", "pulse_events"),
                    route=("pulse_events=archive_signal@ingestd-archive",))
    d.publish([dispatch.Task("pulse_signals-0-0", "pulse_signals", [b'{"a":1}'], [{"a": 1}]),
               dispatch.Task("pulse_events-0-0", "pulse_events", [b'{"b":2}'], [{"b": 2}])])
    (default,) = _drain(redis_client, "ingestd-default")
    (archived,) = _drain(redis_client, "ingestd-archive")
    assert json.loads(default)["headers"]["task"] == EACH_TASK
    assert json.loads(archived)["headers"]["task"] == "archive_signal"


# --- kwargs (--with-metadata) and extra headers (trace context) ------------------------------

TRACE = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
         "tracestate": "vendor=opaque,other=x"}


def kafka_meta(i: int) -> dict[str, Any]:
    """A ``kafka`` keyword argument as :func:`ingestd.metadata.kafka_metadata` builds it:
    UTF-8 and base64 keys and header values, a missing key, long headers (kwargsrepr is
    cut at 1024 characters)."""
    key, b64 = [("host-1", []), ("AAEC/w==", ["key"]), (None, []), ("ключ😀", [])][i % 4]
    headers = [["traceparent", TRACE["traceparent"]], ["bin", "/w=="], ["none", None],
               ["long", "x" * (2000 if i % 3 == 0 else 10)]]
    return {"topic": "pulse_signals", "partition": i % 3, "offset": 1000 + i,
            "timestamp": 1732800000000 + i if i % 5 else None, "key": key,
            "headers": headers, "base64": [*b64, "headers.1"]}


def _extras_tasks(mode: str, meta: bool, trace: bool) -> tuple[list[dispatch.Task],
                                                                list[dict[str, Any]]]:
    """Tasks with kwargs and/or trace headers (every other one traced), and the
    ``send_task`` options that build the same messages."""
    tasks, options = [], []
    for i, obj in enumerate(CURATED):
        traced = trace and i % 2 == 0
        if mode == "each":
            m = kafka_meta(i)
            tasks.append(dispatch.Task(f"pulse_signals-0-{i}", "pulse_signals",
                                       [orjson.dumps(obj)], [obj], None, [m] if meta else None,
                                       dict(TRACE) if traced else None))
            options.append({"args": [obj], "kwargs": {"kafka": m} if meta else {},
                            "headers": dict(TRACE) if traced else None})
        else:
            objs = CURATED[: i + 1]
            ms = [kafka_meta(10 * i + k) for k in range(len(objs))]
            ids = [f"pulse_signals-0-{10 * i + k}" for k in range(len(objs))]
            tasks.append(dispatch.slice_task("pulse_signals", [orjson.dumps(o) for o in objs],
                                             objs, ids, ms if meta else None))
            options.append({"args": [objs], "kwargs": {"kafka": ms} if meta else {},
                            "headers": {codec.RECORD_IDS: ids}})
    return tasks, options


EXTRAS = [("each", True, False), ("each", False, True), ("each", True, True),
          ("batch", True, False)]


@pytest.mark.stack
@pytest.mark.parametrize(("mode", "meta", "trace"), EXTRAS,
                         ids=["each-metadata", "each-trace", "each-both", "batch-metadata"])
def test_redis_kwargs_and_trace_headers_match_send_task(
        dispatchers: Factory, redis_client: redis.Redis, mode: str, meta: bool,
        trace: bool) -> None:
    """``kafka=`` and a record's trace context make the message send_task makes with the
    same kwargs and headers; in a batch where only some records carry a trace."""
    d = dispatchers(mode=mode, with_metadata=meta)
    tasks, options = _extras_tasks(mode, meta, trace)
    task_name = EACH_TASK if mode == "each" else BATCH_TASK
    for t, opts in zip(tasks, options, strict=True):
        d.app.send_task(task_name, task_id=t.task_id, queue="celery", **opts)
    theirs = _drain(redis_client, "celery")
    d.publish(tasks)
    ours = _drain(redis_client, "celery")
    assert len(ours) == len(theirs) == len(tasks)
    for mine, celery_s, opts in zip(ours, theirs, options, strict=True):
        assert_same_envelope(mine, celery_s)
        envelope = json.loads(mine)
        assert _decode_body(envelope)[1] == opts["kwargs"]
        for name in TRACE:
            assert envelope["headers"].get(name) == (opts["headers"] or {}).get(name)


@pytest.mark.amqp
@pytest.mark.parametrize(("mode", "meta", "trace"), EXTRAS,
                         ids=["each-metadata", "each-trace", "each-both", "batch-metadata"])
def test_amqp_kwargs_and_trace_headers_match_send_task(
        amqp_dispatchers: Callable[..., dispatch.AmqpDispatcher], amqp_queue: str, mode: str,
        meta: bool, trace: bool) -> None:
    d = dispatch.create(Config(broker_url=stack.RABBITMQ_URL, queue=amqp_queue, dispatch=mode,
                               with_metadata=meta))
    try:
        tasks, options = _extras_tasks(mode, meta, trace)
        task_name = EACH_TASK if mode == "each" else BATCH_TASK
        for t, opts in zip(tasks, options, strict=True):
            d.app.send_task(task_name, task_id=t.task_id, queue=amqp_queue, **opts)
        theirs = _amqp_fetch(amqp_queue, len(tasks))
        d.publish(tasks)
        ours = _amqp_fetch(amqp_queue, len(tasks))
        for mine, celery_s in zip(ours, theirs, strict=True):
            _assert_same_amqp(mine, celery_s)
    finally:
        d.close()


@pytest.fixture
def each_fuzz(dispatchers: Factory) -> dispatch.RedisDispatcher:
    return dispatchers("fuzz-each")


@pytest.fixture
def batch_fuzz(dispatchers: Factory) -> dispatch.RedisDispatcher:
    return dispatchers("fuzz-batch", "batch")


@pytest.mark.stack
@_hyp
@given(objs=st.lists(json_objects | signals, min_size=1, max_size=3))
def test_redis_each_matches_send_task_fuzzed(each_fuzz: dispatch.RedisDispatcher,
                                             redis_client: redis.Redis,
                                             objs: list[dict[str, Any]]) -> None:
    _compare_each(each_fuzz, redis_client, "fuzz-each", objs)


@pytest.mark.stack
@_hyp
@given(batches=st.lists(st.lists(json_objects | signals, min_size=1, max_size=4),
                        min_size=1, max_size=2))
def test_redis_batch_matches_send_task_fuzzed(batch_fuzz: dispatch.RedisDispatcher,
                                              redis_client: redis.Redis,
                                              batches: list[list[dict[str, Any]]]) -> None:
    _compare_batch(batch_fuzz, redis_client, "fuzz-batch", batches)


@pytest.mark.stack
def test_redis_argsrepr_of_huge_integer_matches_worker_view(dispatchers: Factory,
                                                            redis_client: redis.Redis) -> None:
    """Integers beyond 64 bits stay exact in argsrepr, as in the worker's json.loads view."""
    raw = b'{"name":"n","value":1,"source":"s","timestamp":1,"count":18446744073709551616}'
    obj = Validator("signal", 1 << 20).check(raw)
    d = dispatchers()
    d.app.send_task(EACH_TASK, args=[json.loads(raw)], kwargs={}, task_id="t-0-1", queue="celery")
    (theirs,) = _drain(redis_client, "celery")
    d.publish([dispatch.Task("t-0-1", "t", [raw], [obj])])
    (ours,) = _drain(redis_client, "celery")
    assert_same_envelope(ours, theirs)


@pytest.mark.stack
def test_redis_deeply_nested_record_matches_send_task(dispatchers: Factory,
                                                      redis_client: redis.Redis) -> None:
    nested: Any = "leaf"
    for i in range(150):
        nested = [nested] if i % 2 else {"k": nested}
    obj = {**CURATED[0], "nested": nested}
    raw = json.dumps(obj).encode()
    _compare_each(dispatchers(), redis_client, "celery", [Validator("signal", 1 << 20).check(raw)],
                  raws=[raw])


@pytest.mark.stack
@pytest.mark.parametrize("depth", [300, 600, 900, 985, 1000, 10_000])
def test_every_accepted_record_can_be_published(dispatchers: Factory, depth: int) -> None:
    """Whatever the Validator accepts, publish() encodes: no RecursionError (a poison pill)."""
    raw = orjson.dumps({**CURATED[0], "nested": 0})
    raw = raw.replace(b'"nested":0}', b'"nested":' + b"[" * depth + b"]" * depth + b"}")
    try:
        obj = Validator("signal", 1 << 20).check(raw)
    except RecordError:
        return  # refused and dead-lettered: fine
    d = dispatchers()
    d.publish([dispatch.Task("t-0-0", "t", [raw], [obj])])
    assert d.queue_depth() == 1


# --- the fast repr and the delivery tags ------------------------------------------------------


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(args=st.lists(json_values, max_size=3) | st.builds(lambda o: [o], json_objects | signals))
def test_argsrepr_equals_saferepr(args: list[Any]) -> None:
    assert codec.argsrepr(args, 1024) == saferepr(args, 1024)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.builds(lambda o: [o], json_objects | signals), maxsize=st.integers(1, 300))
def test_argsrepr_equals_saferepr_any_maxsize(args: list[Any], maxsize: int) -> None:
    assert codec.argsrepr(args, maxsize) == saferepr(args, maxsize)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(obj=json_objects | signals)
def test_argsrepr_shortcut_for_few_brackets(obj: dict[str, Any]) -> None:
    """The caller may vouch for shallowness when the record text has at most two brackets."""
    raw = orjson.dumps(obj)
    assert codec.argsrepr([obj], 1024, codec.few_brackets(raw)) == saferepr([obj], 1024)


@given(kwargs=st.dictionaries(_keys, json_values, max_size=4))
def test_kwargsrepr_equals_saferepr(kwargs: dict[str, Any]) -> None:
    assert codec.kwargsrepr(kwargs, 1024) == saferepr(kwargs, 1024)


@pytest.mark.parametrize("i", range(12))
def test_kwargsrepr_of_kafka_metadata_equals_saferepr(i: int) -> None:
    kwargs = {"kafka": kafka_meta(i)}
    assert codec.kwargsrepr(kwargs, 1024) == saferepr(kwargs, 1024)
    plain = {"kafka": {**kafka_meta(i), "key": "k", "headers": [["a", "b"], ["c", None]]}}
    assert "[...]" in codec.kwargsrepr(plain, 1024)  # header pairs are four levels down


@pytest.mark.parametrize("pad", range(1000, 1030))
def test_argsrepr_at_the_truncation_boundary(pad: int) -> None:
    """Around len(repr) == maxsize the fast path must hand over to saferepr exactly."""
    args = [{"name": "n", "value": 1.5, "source": "s" * (pad - 60), "timestamp": 1}]
    assert codec.argsrepr(args, 1024) == saferepr(args, 1024)


@pytest.mark.parametrize("args", [
    [{"a": {"b": {"c": 1}}}],
    [{"a": {"b": {}}}],
    [{"a": {"b": []}}],
    [{"a": [[]]}],
    [{"a": [[1, [2]]]}],
    [{"tags": {"k": "v"}, "l": [1, 2]}],
    [[{"a": 1}, {"b": {"c": {}}}]],
    [[[[]]]],
    [{"q": "it's"}, {"q": 'say "x"'}, {"q": "a\\b"}, {"q": "\x00"}, {"q": "é"}],
    [{}],
    [],
    [None, True, False, 0, -0.0, 1e16, 1e-7, 2**64 - 1],
])
def test_argsrepr_edge_shapes(args: list[Any]) -> None:
    assert codec.argsrepr(args, 1024) == saferepr(args, 1024)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_delivery_tags_are_distinct_uuid4(n: int) -> None:
    tags = [tag.decode("ascii") for tag in codec.delivery_tags(n)]
    assert len(tags) == n
    assert len(set(tags)) == n
    for tag in tags:
        _assert_uuid4(tag)


def test_delivery_tags_differ_between_calls() -> None:
    assert not set(codec.delivery_tags(100)) & set(codec.delivery_tags(100))


# --- AMQP (RabbitMQ) --------------------------------------------------------------------------

AMQP_PROPERTIES = ("content_type", "content_encoding", "correlation_id", "reply_to",
                   "delivery_mode", "priority")


@pytest.fixture
def amqp_queue() -> Iterator[str]:
    """A unique queue name on RabbitMQ; the queue and its exchange are deleted afterwards."""
    name = f"ingestd-test-{uuid.uuid4().hex[:12]}"
    try:
        with Connection(stack.RABBITMQ_URL, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.fail(f"RabbitMQ is not reachable at {stack.RABBITMQ_URL} ({exc}); "
                    "run scripts/stack up --with-rabbitmq")
    yield name
    stack.amqp_delete(name)


@pytest.fixture
def amqp_dispatchers() -> Iterator[Callable[..., dispatch.AmqpDispatcher]]:
    made: list[dispatch.Dispatcher] = []

    def make(queue: str, mode: str = "each") -> dispatch.AmqpDispatcher:
        d = dispatch.create(Config(broker_url=stack.RABBITMQ_URL, queue=queue, dispatch=mode))
        made.append(d)
        assert isinstance(d, dispatch.AmqpDispatcher)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def amqp_each(amqp_dispatchers: Callable[..., dispatch.AmqpDispatcher],
              amqp_queue: str) -> dispatch.AmqpDispatcher:
    return amqp_dispatchers(amqp_queue)


@pytest.fixture
def amqp_queues(amqp_queue: str) -> Iterator[tuple[str, str]]:
    """Two routes' queues: ``amqp_queue`` and a second one, deleted afterwards too."""
    second = f"{amqp_queue}-archive"
    yield amqp_queue, second
    stack.amqp_delete(second)


def _amqp_fetch(queue: str, n: int) -> list[Any]:
    out = []
    with Connection(stack.RABBITMQ_URL, connect_timeout=5) as conn:
        q = Queue(queue, channel=conn.default_channel)
        for _ in range(n):
            message = q.get(no_ack=True)
            assert message is not None, f"queue {queue} holds fewer than {n} messages"
            out.append(message)
        assert q.get(no_ack=True) is None, f"queue {queue} holds more than {n} messages"
    return out


def _assert_same_amqp(ours: Any, theirs: Any) -> None:
    assert json.loads(ours.body) == json.loads(theirs.body)
    assert ours.headers == theirs.headers
    for key in AMQP_PROPERTIES:
        assert ours.properties.get(key) == theirs.properties.get(key), key
    assert ours.properties == theirs.properties  # nothing else set on either side
    for key in ("exchange", "routing_key"):
        assert ours.delivery_info[key] == theirs.delivery_info[key], key


def _amqp_compare(d: dispatch.AmqpDispatcher, queue: str, task: str,
                  args_list: list[list[Any]], tasks: list[dispatch.Task]) -> None:
    for args, t in zip(args_list, tasks, strict=True):
        extra = {"headers": {codec.RECORD_IDS: t.ids}} if t.ids is not None else {}
        d.app.send_task(task, args=args, kwargs={}, task_id=t.task_id, queue=queue, **extra)
    theirs = _amqp_fetch(queue, len(tasks))
    d.publish(tasks)
    ours = _amqp_fetch(queue, len(tasks))
    for mine, celery_s, t in zip(ours, theirs, tasks, strict=True):
        _assert_same_amqp(mine, celery_s)
        assert mine.properties["correlation_id"] == mine.headers["id"] == t.task_id
        assert mine.delivery_info["routing_key"] == queue


@pytest.mark.amqp
def test_amqp_each_matches_send_task(amqp_dispatchers: Callable[..., dispatch.AmqpDispatcher],
                                     amqp_queue: str) -> None:
    d = amqp_dispatchers(amqp_queue)
    tasks = [dispatch.Task(f"t-0-{i}", "t", [orjson.dumps(o)], [o]) for i, o in enumerate(CURATED)]
    _amqp_compare(d, amqp_queue, EACH_TASK, [[o] for o in CURATED], tasks)
    # a second batch on the same confirm-mode channel is acked and delivered as well
    d.publish(tasks[:2])
    assert [json.loads(m.body)[0] for m in _amqp_fetch(amqp_queue, 2)] == [[o] for o in CURATED[:2]]


@pytest.mark.amqp
def test_amqp_batch_matches_send_task(amqp_dispatchers: Callable[..., dispatch.AmqpDispatcher],
                                      amqp_queue: str) -> None:
    d = amqp_dispatchers(amqp_queue, "batch")
    batches = [CURATED[:1], CURATED, CURATED[2:4]]
    tasks = [dispatch.Task(f"t-0-{i}-{i + len(b)}", "t", [orjson.dumps(o) for o in b], b,
                           [f"t-0-{i + k}" for k in range(len(b))])
             for i, b in enumerate(batches)]
    _amqp_compare(d, amqp_queue, BATCH_TASK, [[b] for b in batches], tasks)


@pytest.mark.amqp
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(objs=st.lists(json_objects | signals, min_size=1, max_size=3))
def test_amqp_each_matches_send_task_fuzzed(amqp_each: dispatch.AmqpDispatcher,
                                            amqp_queue: str,
                                            objs: list[dict[str, Any]]) -> None:
    d = amqp_each
    tasks = [dispatch.Task(f"t-1-{i}", "t", [orjson.dumps(o)], [o]) for i, o in enumerate(objs)]
    _amqp_compare(d, amqp_queue, EACH_TASK, [[o] for o in objs], tasks)


@pytest.mark.amqp
@pytest.mark.parametrize("mode", ["each", "batch"])
def test_amqp_routed_batch_matches_send_task_on_each_queue(amqp_queues: tuple[str, str],
                                                           mode: str) -> None:
    """One batch for two routes, published on one confirm-mode channel: each queue holds
    what send_task writes for its task and queue, in order."""
    queues = amqp_queues
    routed, tasks = _routed(mode, queues)
    d = dispatch.create(Config(broker_url=stack.RABBITMQ_URL, dispatch=mode, **routed["config"]))
    try:
        _send_task_as_routed(d, routed["routes"], tasks)
        theirs = {q: _amqp_fetch(q, len(tasks) // 2) for q in queues}
        d.publish(tasks)
        ours = {q: _amqp_fetch(q, len(tasks) // 2) for q in queues}
        for queue, (task, _) in zip(queues, routed["routes"].values(), strict=True):
            for mine, celery_s in zip(ours[queue], theirs[queue], strict=True):
                _assert_same_amqp(mine, celery_s)
                assert mine.headers["task"] == task
                assert mine.delivery_info["routing_key"] == queue
        assert d.queue_depths() == dict.fromkeys(queues, 0)
    finally:
        d.close()


@pytest.mark.amqp
def test_amqp_a_retry_after_a_partial_refusal_repeats_nothing_accepted(
        amqp_queues: tuple[str, str]) -> None:
    """One of two routes' queues deleted: RabbitMQ returns its messages and holds the
    other's. The refused batch is narrowed to what was returned, so the retry (which
    declares the queue again) sends those only: each queue then holds its tasks once."""
    queues = amqp_queues
    routed, tasks = _routed("each", queues)
    d = dispatch.create(Config(broker_url=stack.RABBITMQ_URL, **routed["config"]))
    try:
        d.publish(tasks[:2])  # connected, both queues declared
        for q in queues:
            _amqp_fetch(q, 1)
        with Connection(stack.RABBITMQ_URL, connect_timeout=5) as conn:
            conn.default_channel.queue_delete(queues[1])
        prepared = d.prepare(tasks)
        with pytest.raises(DispatchError, match="unroutable"):
            d.send(prepared)
        assert [p.properties["correlation_id"] for p in prepared] == \
            [t.task_id for t in tasks if t.topic == "pulse_events"]
        d.send(prepared)
        for queue, topic in zip(queues, routed["routes"], strict=True):
            assert [m.headers["id"] for m in _amqp_fetch(queue, len(tasks) // 2)] == \
                [t.task_id for t in tasks if t.topic == topic]
    finally:
        d.close()


@pytest.mark.amqp
def test_amqp_unroutable_messages_refuse_the_batch(amqp_each: dispatch.AmqpDispatcher,
                                                   amqp_queue: str) -> None:
    """A queue deleted while ingestd is connected: RabbitMQ confirms unroutable messages,
    so they are published ``mandatory`` and a returned one refuses the batch; the retry
    declares the queue again, as send_task would."""
    tasks = [dispatch.Task(f"t-0-{i}", "t", [orjson.dumps(o)], [o]) for i, o in enumerate(CURATED)]
    amqp_each.publish(tasks[:1])
    _amqp_fetch(amqp_queue, 1)
    with Connection(stack.RABBITMQ_URL, connect_timeout=5) as conn:
        conn.default_channel.queue_delete(amqp_queue)
    with pytest.raises(DispatchError, match="unroutable"):
        amqp_each.publish(tasks)
    amqp_each.publish(tasks)
    assert [m.headers["id"] for m in _amqp_fetch(amqp_queue, len(tasks))] == \
        [t.task_id for t in tasks]


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
@pytest.mark.parametrize("queue", ["celery", "ingestd-custom.q"])
def test_amqp_queue_declare_equals_a_celery_worker(queue_type: str, queue: str) -> None:
    """``--queue-type`` declares each queue as a Celery app set up for that type
    (``task_default_queue_type``, ``task_create_missing_queue_type``) declares it, call for
    call: a redeclare by either side is accepted by the broker."""
    ours = dispatch.create(Config(broker_url=stack.RABBITMQ_URL, queue=queue,
                                  queue_type=queue_type))
    theirs = Celery("worker", broker=stack.RABBITMQ_URL, set_as_current=False)
    theirs.conf.update(task_default_queue_type=queue_type,
                       task_create_missing_queue_type=queue_type)

    def declared(app: Celery) -> list[Any]:
        channel = mock.MagicMock()  # records the calls; arguments as py-amqp's channel prepares
        channel.prepare_queue_arguments.side_effect = to_rabbitmq_queue_arguments
        app.amqp.queues[queue](channel).declare()
        return channel.method_calls

    calls = declared(ours.app)
    assert calls == declared(theirs)
    declare = next(c for c in calls if c[0] == "queue_declare")
    assert declare.kwargs["durable"] is True
    assert declare.kwargs["arguments"] == (
        {"x-queue-type": "quorum"} if queue_type == "quorum" else {})
    ours.close()


@pytest.mark.amqp
def test_amqp_queue_of_another_type_is_refused_by_name(amqp_queue: str) -> None:
    """A queue a celery worker declared quorum, published to by an ingestd left at classic:
    RabbitMQ refuses the redeclare, and the refusal names the argument (a batch refused,
    retried like any other, never a queue of the wrong type)."""
    quorum = dispatch.create(Config(broker_url=stack.RABBITMQ_URL, queue=amqp_queue,
                                    queue_type="quorum"))
    classic = dispatch.create(Config(broker_url=stack.RABBITMQ_URL, queue=amqp_queue))
    task = dispatch.Task(f"t-0-{0}", "t", [orjson.dumps(CURATED[0])], [CURATED[0]])
    try:
        quorum.publish([task])
        with pytest.raises(DispatchError, match="x-queue-type"):
            classic.publish([task])
        assert len(_amqp_fetch(amqp_queue, 1)) == 1
    finally:
        quorum.close()
        classic.close()


@pytest.mark.amqp
def test_amqp_failover_list_goes_on_to_the_next_url(amqp_queue: str) -> None:
    """The first URL of the list refuses connections: the batch goes to the second, and
    its confirms are waited for there."""
    dead = f"amqp://guest:guest@127.0.0.1:{stack.free_port()}//"
    d = dispatch.create(Config(broker_url=f"{dead};{stack.RABBITMQ_URL}", queue=amqp_queue))
    tasks = [dispatch.Task(f"t-0-{i}", "t", [orjson.dumps(o)], [o]) for i, o in enumerate(CURATED)]
    try:
        d.publish(tasks)
        assert d.queue_depth() == len(tasks)
    finally:
        d.close()
    assert len(_amqp_fetch(amqp_queue, len(tasks))) == len(tasks)
