"""Publish a batch of Celery task messages to the broker in one round trip.

Redis: one multi-value LPUSH of kombu's JSON envelopes (atomic: all or none).
AMQP: every message published ``mandatory`` on a confirm-mode channel, then one
wait for the broker's acks covering the whole batch; a message the broker
returns as unroutable (its queue deleted or expired) refuses the batch.

Every broker call has a bounded time (:data:`BROKER_TIMEOUT`): a broker that
stops answering refuses the batch, which the worker retries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from celery import Celery
from kombu.connection import Connection

from ingestd import codec
from ingestd.config import Config, redact
from ingestd.errors import DispatchError

CONNECT_TIMEOUT = 5.0
BROKER_TIMEOUT = 10.0  # a socket read or write, and the wait for AMQP confirms


class Task(NamedTuple):
    """One task to send: its id, the records' bytes and their decoded objects, and in
    batch dispatch each record's own id (:data:`codec.RECORD_IDS`).

    A NamedTuple: one is built per record, and a frozen dataclass costs three
    times as much to create.
    """

    task_id: str
    topic: str
    raws: list[bytes]
    objs: list[Any]
    ids: list[str] | None = None


def slice_task(topic: str, raws: list[bytes], objs: list[Any], ids: list[str]) -> Task:
    """A batch task: the records of one partition, in order. Its id names the first and
    the last record's offset: ``<topic>-<partition>-<first>-<last>``."""
    return Task(f"{ids[0]}-{ids[-1].rsplit('-', 1)[1]}", topic, raws, objs, ids)


class Dispatcher(Protocol):
    """Not thread-safe: one thread at a time (the worker keeps a second one for probes)."""

    def prepare(self, tasks: Sequence[Task]) -> Any:
        """Build the messages: CPU work only, no network."""

    def send(self, prepared: Any) -> None:
        """Return once the broker accepted every message; raise DispatchError otherwise."""

    def publish(self, tasks: Sequence[Task]) -> None: ...

    def queue_depth(self) -> int: ...

    def close(self) -> None: ...


def celery_app(config: Config, timeout: float = BROKER_TIMEOUT) -> Celery:
    """A Celery app used only for its message machinery; it sends nothing itself. No
    broker call of its connections takes longer than ``timeout``."""
    app = Celery("ingestd", broker=config.broker_url, set_as_current=False)
    connect = min(CONNECT_TIMEOUT, timeout)
    # kombu's Redis transport has no socket timeout by default, py-amqp none for reads
    # and writes: without these, a dropped network path would hang a publish forever.
    timeouts = ({"socket_timeout": timeout, "socket_connect_timeout": connect,
                 "socket_keepalive": True} if config.broker_is_redis else
                {"read_timeout": timeout, "write_timeout": timeout})
    app.conf.update(task_serializer="json", broker_connection_retry_on_startup=False,
                    broker_connection_timeout=connect, broker_transport_options=timeouts)
    return app


def create(config: Config, timeout: float = BROKER_TIMEOUT) -> Dispatcher:
    app = celery_app(config, timeout)
    task = config.batch_task if config.dispatch == "batch" else config.task
    batch = config.dispatch == "batch"
    captured = codec.capture(app, task, config.queue, batch)
    if config.broker_is_redis:
        return RedisDispatcher(app, config.queue, captured, batch)
    return AmqpDispatcher(app, config.queue, captured, batch)


def _args(task: Task, batch: bool) -> list[Any]:
    return [task.objs] if batch else task.objs


def _error(action: str, exc: BaseException) -> DispatchError:
    return DispatchError(f"{action}: {redact(str(exc)) or type(exc).__name__}")


class _Base:
    def __init__(self, app: Celery, queue: str, captured: codec.Captured, batch: bool) -> None:
        self.app = app
        self.queue_name = queue
        self.captured = captured
        self.builder = codec.MessageBuilder(captured)
        self.batch = batch
        self.conn: Connection | None = None
        self._declared = False

    def _connection(self) -> Connection:
        if self.conn is None:
            self.conn = self.app.connection_for_write()
            self.conn.ensure_connection(max_retries=1,
                                        timeout=self.app.conf.broker_connection_timeout)
        return self.conn

    def _declare(self) -> Any:
        """Declare the queue as ``send_task`` does (Celery's own queue definition)."""
        channel = self._connection().default_channel
        if not self._declared:
            self.app.amqp.queues[self.queue_name](channel).declare()
            self._declared = True
        return channel

    def _reset(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):  # already broken; nothing to add
                self.conn.release()
        self.conn = None
        self._declared = False

    def close(self) -> None:
        self._reset()

    def publish(self, tasks: Sequence[Task]) -> None:
        self.send(self.prepare(tasks))  # type: ignore[attr-defined]


def pack_lpush(key: bytes, values: list[bytes]) -> bytes:
    """``LPUSH key *values`` in RESP, as redis-py's ``pack_command`` writes it.

    redis-py packs with a Python loop over the arguments, about 2 µs per
    message; this is one join. ``tests/test_dispatch.py`` proves the bytes equal.
    """
    parts = [b"*%d\r\n$5\r\nLPUSH\r\n$%d\r\n%b\r\n" % (len(values) + 2, len(key), key)]
    add = parts.append
    for value in values:
        add(b"$%d\r\n" % len(value))
        add(value)
        add(b"\r\n")
    return b"".join(parts)


class RedisDispatcher(_Base):
    def __init__(self, app: Celery, queue: str, captured: codec.Captured, batch: bool) -> None:
        super().__init__(app, queue, captured, batch)
        if captured.exchange:
            raise DispatchError(f"queue {queue!r} routes through exchange {captured.exchange!r}; "
                                "ingestd publishes to direct queues only")
        self.key = captured.routing_key
        self.envelopes = codec.RedisEnvelopes(self.builder)
        self._conn: Any = None

    def encode(self, tasks: Sequence[Task], tags: Sequence[bytes] | None = None) -> list[bytes]:
        """The envelopes, one per task, as kombu's Redis transport would LPUSH them."""
        tags = tags or codec.delivery_tags(len(tasks))
        if not self.batch:
            return self.envelopes.encode_each(tasks, tags)
        enc = self.envelopes.encode_batch
        return [enc(t.task_id, t.raws, _args(t, True), tag, t.ids or [])
                for t, tag in zip(tasks, tags, strict=True)]

    def prepare(self, tasks: Sequence[Task]) -> bytes:
        """The whole LPUSH command, packed here: the in-flight thread then only writes
        it and reads the reply, and barely needs the GIL."""
        if not tasks:
            return b""
        key, tags = self.key.encode(), codec.delivery_tags(len(tasks))
        packed = None if self.batch else self.envelopes.lpush_each(key, tasks, tags)
        return packed if packed is not None else pack_lpush(key, self.encode(tasks, tags))

    def send(self, packed: bytes) -> None:
        if not packed:
            return
        try:
            conn = self._lpush_conn()
            conn.send_packed_command([packed], check_health=False)
            reply = conn.read_response()
        except Exception as exc:
            self._reset()
            raise _error("redis LPUSH failed", exc) from exc
        if isinstance(reply, Exception):
            raise _error("redis refused LPUSH", reply)

    def _lpush_conn(self) -> Any:
        """A connection of the dispatcher's own, taken once from kombu's client pool."""
        if self._conn is None:
            client = self._declare().client
            self._conn = client.connection_pool.get_connection()
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.disconnect()
            self._conn = None
        super()._reset()

    def queue_depth(self) -> int:
        try:
            return int(self._declare().client.llen(self.key))
        except Exception as exc:
            self._reset()
            raise _error("redis LLEN failed", exc) from exc


class AmqpDispatcher(_Base):
    def __init__(self, app: Celery, queue: str, captured: codec.Captured, batch: bool) -> None:
        super().__init__(app, queue, captured, batch)
        self._acked = 0
        self._nacked = 0
        self._returned = 0
        self._published = 0

    def _channel(self) -> Any:
        fresh = not self._declared
        channel = self._declare()
        if fresh:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            self._acked = self._nacked = self._returned = self._published = 0
        return channel

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._acked = tag if multiple else max(self._acked, tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._nacked += 1
        self._acked = max(self._acked, tag)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        """An unroutable message: the broker confirms it all the same, after this."""
        self._returned += 1

    def prepare(self, tasks: Sequence[Task]) -> list[tuple[bytes, dict[str, Any],
                                                        dict[str, Any]]]:
        """Body, headers and properties of each message; the channel wraps them in send()."""
        b, batch = self.builder, self.batch
        return [(b.body(t.raws, batch), b.headers(t.task_id, t.raws, _args(t, batch), batch, t.ids),
                 b.properties(t.task_id)) for t in tasks]

    def send(self, prepared: list[tuple[bytes, dict[str, Any], dict[str, Any]]]) -> None:
        if not prepared:
            return
        c = self.captured
        try:
            channel = self._channel()
            nacked_before, returned_before = self._nacked, self._returned
            for body, headers, properties in prepared:
                message = channel.prepare_message(body, 0, c.content_type, c.content_encoding,
                                                  headers, properties)
                channel.basic_publish(message, exchange=c.exchange, routing_key=c.routing_key,
                                      mandatory=True)
            self._published += len(prepared)
            conn = self._connection()
            while self._acked < self._published:
                conn.drain_events(timeout=self.app.conf.broker_transport_options["read_timeout"])
        except Exception as exc:
            self._reset()
            raise _error("amqp publish failed", exc) from exc
        if self._nacked != nacked_before:
            raise DispatchError("amqp broker refused (nack) part of the batch")
        if self._returned != returned_before:
            returned = self._returned - returned_before
            self._reset()  # the retry declares the queue again, as send_task would
            raise DispatchError(f"amqp broker returned {returned} unroutable messages "
                                f"(no queue bound to {c.routing_key!r})")

    def queue_depth(self) -> int:
        try:
            channel = self._channel()
            _, count, _ = channel.queue_declare(queue=self.queue_name, passive=True)
            return int(count)
        except Exception as exc:
            self._reset()
            raise _error("amqp queue depth failed", exc) from exc
