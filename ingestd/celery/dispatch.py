"""Publish a batch of Celery task messages to the broker in one round trip.

Each topic's tasks go by its route (``--route``, else ``--task`` on ``--queue``):
a :class:`Target` per route holds the message template Celery built for it.

Redis: one multi-value LPUSH of kombu's JSON envelopes per queue, several in one
MULTI/EXEC transaction (each LPUSH all or nothing; Redis rolls none back), then,
with ``--broker-min-replicas``, a WAIT for that many replicas to have it. AMQP:
every message published ``mandatory`` on a confirm-mode channel, then one wait
for the broker's acks covering the whole batch; a message the broker returns as
unroutable (its queue deleted or expired) or nacks refuses the batch.

A refused batch is retried by the worker with what ``send`` was given: ``send``
narrows it to what the broker did not accept, so the retry repeats nothing the
broker already holds.

Every broker call has a bounded time (:data:`BROKER_TIMEOUT`): a broker that
stops answering refuses the batch, which the worker retries.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import msgspec
from celery import Celery
from celery.loaders.app import AppLoader
from kombu.connection import Connection

from ingestd.celery import codec
from ingestd.celery import tls as brokertls
from ingestd.config import Config, Route, broker_urls, redact
from ingestd.errors import DispatchError

CONNECT_TIMEOUT = 5.0
BROKER_TIMEOUT = 10.0  # a socket read or write, and the wait for AMQP confirms
REPLICA_WAIT_MS = 2000  # Redis's WAIT for --broker-min-replicas, below BROKER_TIMEOUT


class Task(NamedTuple):
    """One task to send: its id, the records' bytes and their decoded objects, and in
    batch dispatch each record's own id (:data:`codec.RECORD_IDS`); with
    ``--with-metadata`` each record's ``kafka`` dict (:func:`metadata.kafka_metadata`),
    and in each dispatch the record's trace context headers, where it has them.

    A NamedTuple: one is built per record, and a frozen dataclass costs three
    times as much to create.
    """

    task_id: str
    topic: str
    raws: list[bytes]
    objs: list[Any]
    ids: list[str] | None = None
    meta: list[dict[str, Any]] | None = None
    trace: dict[str, str] | None = None

    def partition(self) -> int:
        """The partition of its records (the id is ``<topic>-<partition>-...``)."""
        return int(self.task_id[len(self.topic) + 1:].split("-", 1)[0])

    def restored(self) -> Task:
        """The task with its decoded records again, where the worker freed them once the
        messages were built (a rebuild needs them: batch mode's argsrepr)."""
        if len(self.objs) == len(self.raws):
            return self
        return self._replace(objs=[msgspec.json.decode(raw) for raw in self.raws])


_TRACE = operator.itemgetter(6)  # Task.trace, read in C: a batch's check runs no Python loop


def slice_task(topic: str, raws: list[bytes], objs: list[Any], ids: list[str],
               meta: list[dict[str, Any]] | None = None) -> Task:
    """A batch task: the records of one partition, in order. Its id names the first and
    the last record's offset: ``<topic>-<partition>-<first>-<last>``."""
    return Task(f"{ids[0]}-{ids[-1].rsplit('-', 1)[1]}", topic, raws, objs, ids, meta)


def task_kwargs(task: Task, batch: bool) -> dict[str, Any] | None:
    """The task's keyword arguments: ``kafka``, with ``--with-metadata``."""
    if task.meta is None:
        return None
    return {"kafka": task.meta if batch else task.meta[0]}


class Dispatcher(Protocol):
    """``prepare`` (the worker's thread) may run while ``send`` (the in-flight thread)
    does; ``send``, the queue depths and ``close`` use the connection, one thread at a
    time (the worker probes queue depths with a dispatcher of its own)."""

    def prepare(self, tasks: Sequence[Task]) -> Any:
        """Build the messages: CPU work only, no network."""

    def send(self, prepared: Any) -> None:
        """Return once the broker accepted every message; raise DispatchError otherwise,
        with ``prepared`` narrowed to the messages it did not accept."""

    def without(self, prepared: Any, gone: set[tuple[str, int]]) -> Any:
        """``prepared`` less the messages of records of the ``gone`` partitions (revoked
        while a batch waited)."""

    def task_size(self, task: Task) -> int:
        """The bytes of the task's message as its broker limits them: a Redis envelope, an
        AMQP message body."""

    def publish(self, tasks: Sequence[Task]) -> None: ...

    def queue_depth(self) -> int: ...

    def queue_depths(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class _Loader(AppLoader):  # type: ignore[misc]
    """Celery's loader for an app of one's own, less the module ``CELERY_CONFIG_MODULE``
    names: ingestd's settings are the only ones."""

    def read_configuration(self, env: str = "CELERY_CONFIG_MODULE") -> None:
        return None


def celery_app(config: Config, timeout: float = BROKER_TIMEOUT) -> Celery:
    """A Celery app used only for its message machinery; it sends nothing itself. No
    broker call of its connections takes longer than ``timeout``.

    Celery's own environment must not change where ingestd publishes: its settings
    take ``CELERY_BROKER_URL`` and ``CELERY_BROKER_WRITE_URL`` over the app's, and
    every loader, ``CELERY_LOADER``'s too, imports ``CELERY_CONFIG_MODULE``. So the app
    has a loader that reads no configuration, and every connection is opened with
    ingestd's URL."""
    url, use_ssl = brokertls.use_ssl(config)
    app = Celery("ingestd", broker=url, loader=_Loader, set_as_current=False)
    connect = min(CONNECT_TIMEOUT, timeout)
    # kombu's Redis transport has no socket timeout by default, py-amqp none for reads
    # and writes: without these, a dropped network path would hang a publish forever.
    options: dict[str, Any] = (
        {"socket_timeout": timeout, "socket_connect_timeout": connect, "socket_keepalive": True}
        if config.broker_is_redis else {"read_timeout": timeout, "write_timeout": timeout})
    if config.broker_is_sentinel:  # the Sentinels name the master; kombu asks them
        options["master_name"] = config.broker_master_name
    # Queues are declared by Celery's own definitions (``app.amqp.queues``): with the
    # queue type a celery worker configured the same way declares, argument for argument.
    app.conf.update(task_serializer="json", broker_connection_retry_on_startup=False,
                    broker_connection_timeout=connect, broker_transport_options=options,
                    broker_use_ssl=use_ssl, task_default_queue_type=config.queue_type,
                    task_create_missing_queue_type=config.queue_type)
    return app


def create(config: Config, timeout: float = BROKER_TIMEOUT) -> Dispatcher:
    app = celery_app(config, timeout)
    if config.broker_is_redis:
        return RedisDispatcher(app, config)
    return AmqpDispatcher(app, config)


def _args(task: Task, batch: bool) -> list[Any]:
    return [task.objs] if batch else task.objs


def _error(action: str, exc: BaseException) -> DispatchError:
    return DispatchError(f"{action}: {redact(str(exc)) or type(exc).__name__}")


class Target:
    """Where one route's tasks go (:attr:`Config.routes`), and their message template,
    captured from Celery once."""

    def __init__(self, app: Celery, route: Route, batch: bool, url: str) -> None:
        self.task, self.queue = route
        self.captured = codec.capture(app, route.task, route.queue, batch, url)
        self.builder = codec.MessageBuilder(self.captured)


class _Base:
    def __init__(self, app: Celery, config: Config) -> None:
        self.app = app
        self.config = config
        self.url = brokertls.resolve(config)[0]  # ingestd's, whatever Celery's environment
        self.batch = config.dispatch == "batch"
        self.with_metadata = config.with_metadata
        self._by_route: dict[Route, Target] = {}
        self.targets: dict[str, Target] = {}  # by topic
        for topic in config.topic:
            self._target(topic)
        # Without routes every topic, known or not, goes to one target: the common case
        # needs no lookup per task.
        self._only = self.targets[config.topic[0]] if set(config.routes.values()) == {
            config.default_route} else None
        self.conn: Connection | None = None
        self._declared = False

    def _target(self, topic: str) -> Target:
        """A topic's target; one that is not a source topic (a test's) goes by ``--task``
        and ``--queue``, and its queue is declared before the next publish."""
        target = self.targets.get(topic)
        if target is None:
            route = self.config.route_of(topic)
            target = self._by_route.get(route)
            if target is None:
                target = self._by_route[route] = self._new_target(route)
                self._declared = False
            self.targets[topic] = target
        return target

    def _new_target(self, route: Route) -> Target:
        return Target(self.app, route, self.batch, self.url)

    def split(self, tasks: Sequence[Task]) -> list[tuple[Target, list[Task]]]:
        """The tasks by target, each in its order (a partition's records go to one)."""
        if self._only is not None:
            return [(self._only, list(tasks))]
        groups: dict[Target, list[Task]] = {}
        target_of = self._target
        for task in tasks:
            groups.setdefault(target_of(task.topic), []).append(task)
        return list(groups.items())

    @property
    def captured(self) -> codec.Captured:
        """The first source topic's message template (what tests and benchmarks compare)."""
        return self.targets[self.config.topic[0]].captured

    def by_queue(self) -> list[Any]:
        """A target of each queue (a copy first: prepare() may add a target meanwhile)."""
        targets = list(self._by_route.values())
        return list({t.queue: t for t in targets}.values())

    def _connection(self) -> Connection:
        """The connection, made on first use. Of a failover list (kombu's alternates),
        each URL is tried once, in order, every time a connection is made: a broker that
        comes back is used again once the one in use fails."""
        if self.conn is None:
            hosts = len(broker_urls(self.url))
            self.conn = self.app.connection_for_write(self.url)
            self.conn.ensure_connection(
                max_retries=max(1, hosts - 1),
                timeout=hosts * self.app.conf.broker_connection_timeout)
        return self.conn

    def _declare(self) -> Any:
        """Declare every target's queue as ``send_task`` does (Celery's own queue
        definition)."""
        channel = self._connection().default_channel
        if not self._declared:
            for target in self.by_queue():
                self.app.amqp.queues[target.queue](channel).declare()
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

    def queue_depths(self) -> dict[str, int]:
        """Each queue's depth; raises DispatchError."""
        raise NotImplementedError

    def queue_depth(self) -> int:
        """What every queue holds, in all."""
        return sum(self.queue_depths().values())


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


# A batch for several queues goes in one transaction: nothing of it is applied unless
# all of it arrived, and then each LPUSH is applied or refused on its own.
MULTI, EXEC = b"*1\r\n$5\r\nMULTI\r\n", b"*1\r\n$4\r\nEXEC\r\n"


class Packed:
    """A batch's LPUSH commands (one per queue), packed to be written at once, how many
    replies they get, and the tasks of each command."""

    def __init__(self, commands: list[bytes], groups: list[list[Task]]) -> None:
        self.groups = dict(zip(commands, groups, strict=True))
        self.keep(commands)

    def keep(self, commands: list[bytes]) -> None:
        self.commands = commands
        self.groups = {c: self.groups[c] for c in commands}
        if len(commands) > 1:
            self.data, self.replies = b"".join((MULTI, *commands, EXEC)), len(commands) + 2
        else:  # one command (or none) is sent as built: no copy of a megabyte
            self.data, self.replies = commands[0] if commands else b"", len(commands)


class RedisTarget(Target):
    def __init__(self, app: Celery, route: Route, batch: bool, url: str) -> None:
        super().__init__(app, route, batch, url)
        if self.captured.exchange:
            raise DispatchError(f"queue {route.queue!r} routes through exchange "
                                f"{self.captured.exchange!r}; ingestd publishes to direct "
                                "queues only")
        self.key = self.captured.routing_key.encode()
        self.envelopes = codec.RedisEnvelopes(self.builder)


class RedisDispatcher(_Base):
    targets: dict[str, RedisTarget]  # type: ignore[assignment]

    def __init__(self, app: Celery, config: Config) -> None:
        self._conn: Any = None
        # The batch the master took but too few replicas confirmed, and the master's replies.
        self._unreplicated: tuple[Packed, list[Any]] | None = None
        self.min_replicas = config.broker_min_replicas
        super().__init__(app, config)

    def _new_target(self, route: Route) -> RedisTarget:
        return RedisTarget(self.app, route, self.batch, self.url)

    @property
    def key(self) -> str:
        """The first source topic's queue key (what tests and benchmarks compare)."""
        return self.targets[self.config.topic[0]].key.decode()

    def encode(self, tasks: Sequence[Task], tags: Sequence[bytes] | None = None,
               target: RedisTarget | None = None) -> list[bytes]:
        """The envelopes, one per task, as kombu's Redis transport would LPUSH them; by
        default for the first source topic's target."""
        target = target or self.targets[self.config.topic[0]]
        tags = tags or codec.delivery_tags(len(tasks))
        if self._templated(tasks):
            return target.envelopes.encode_each(tasks, tags)
        return [self._encode(target, t, tag) for t, tag in zip(tasks, tags, strict=True)]

    def _templated(self, tasks: Sequence[Task]) -> bool:
        """Whether every task's envelope comes from the each-mode template: no kwargs, no
        trace context."""
        return not (self.batch or self.with_metadata or any(map(_TRACE, tasks)))

    def _encode(self, target: RedisTarget, t: Task, tag: bytes) -> bytes:
        batch, envelopes = self.batch, target.envelopes
        if t.meta is None and t.trace is None:
            if batch:
                return envelopes.encode_batch(t.task_id, t.raws, _args(t, True), tag, t.ids or [])
            return envelopes.encode_each([t], [tag])[0]
        b, kwargs = target.builder, task_kwargs(t, batch)
        return envelopes.encode_full(
            t.task_id, b.body(t.raws, batch, kwargs),
            b.headers(t.task_id, t.raws, _args(t, batch), batch, t.ids, kwargs, t.trace), tag)

    def prepare(self, tasks: Sequence[Task]) -> Packed:
        """The whole LPUSH command (one per queue key, in a transaction when there are
        several), packed here: the in-flight thread then only writes it and reads the
        replies, and barely needs the GIL."""
        if not tasks:
            return Packed([], [])
        groups = self.split(tasks)
        return Packed([self._lpush(target, group)  # type: ignore[arg-type]
                       for target, group in groups], [group for _, group in groups])

    def without(self, packed: Packed, gone: set[tuple[str, int]]) -> Packed:
        """The commands whose tasks are all kept stay as built; the others are built again
        from the tasks kept."""
        kept, rebuild = [], []
        for command, group in packed.groups.items():
            tasks = [t for t in group if (t.topic, t.partition()) not in gone]
            if len(tasks) == len(group):
                kept.append(command)
            else:
                rebuild += [t.restored() for t in tasks]
        again = self.prepare(rebuild)
        return Packed(kept + again.commands, [packed.groups[c] for c in kept]
                      + [again.groups[c] for c in again.commands])

    def task_size(self, task: Task) -> int:
        return len(self.encode([task.restored()], target=self._target(task.topic))[0])  # type: ignore[arg-type]

    def _lpush(self, target: RedisTarget, tasks: list[Task]) -> bytes:
        """In C where built, unless a task has kwargs or trace context (C looks for those
        itself: records without headers pay no check here)."""
        tags = codec.delivery_tags(len(tasks))
        packed = (None if self.batch or self.with_metadata else
                  target.envelopes.lpush_each(target.key, tasks, tags))
        return packed if packed is not None else pack_lpush(
            target.key, self.encode(tasks, tags, target))

    def send(self, packed: Packed) -> None:
        """With ``--broker-min-replicas`` a WAIT follows the LPUSHes. A batch the master
        holds but too few replicas confirmed is retried as that WAIT alone, on the same
        connection (WAIT covers all its earlier writes): it is pushed again only when the
        connection is lost (a failover, say), so at most that batch is duplicated."""
        if not packed.replies:
            return
        pending = self._unreplicated  # this batch's, pushed on this connection: WAIT only
        pending = pending if pending is not None and pending[0] is packed else None
        waiting = self.min_replicas > 0
        try:
            conn = self._lpush_conn()
            wait = conn.pack_command("WAIT", self.min_replicas, REPLICA_WAIT_MS) if waiting else []
            conn.send_packed_command(([] if pending else [packed.data]) + wait,
                                     check_health=False)
            replies = (pending[1] if pending else
                       [conn.read_response() for _ in range(packed.replies)])
            replicas = conn.read_response() if waiting else 0
        except Exception as exc:  # a refusal of a lone LPUSH too: it is read as raised
            self._reset()
            raise _error("redis LPUSH failed", exc) from exc
        self._unreplicated = None
        if replicas < self.min_replicas:
            self._unreplicated = (packed, replies)
            raise DispatchError(f"redis WAIT: {replicas} of {self.min_replicas} replicas "
                                f"confirmed the batch within {REPLICA_WAIT_MS} ms")
        last = replies[-1]
        if isinstance(last, list):  # the transaction's: an error for each refused LPUSH
            refused = [c for c, r in zip(packed.commands, last, strict=True)
                       if isinstance(r, Exception)]
            if refused:
                error = next(r for r in last if isinstance(r, Exception))
                packed.keep(refused)
                raise _error(f"redis refused {len(refused)} of {len(last)} LPUSHes", error)

    def _lpush_conn(self) -> Any:
        """A connection of the dispatcher's own, taken once from kombu's client pool."""
        if self._conn is None:
            client = self._declare().client
            self._conn = client.connection_pool.get_connection()
        elif not self._declared:  # a new target's queue
            self._declare()
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.disconnect()
            self._conn = None
        self._unreplicated = None  # what the lost connection wrote is pushed again
        super()._reset()

    def replicas(self) -> int:
        """How many replicas the master has connected (``INFO replication``)."""
        try:
            return int(self._declare().client.info("replication")["connected_slaves"])
        except Exception as exc:
            self._reset()
            raise _error("redis INFO failed", exc) from exc

    def queue_depths(self) -> dict[str, int]:
        try:
            client = self._declare().client
            return {t.queue: int(client.llen(t.key)) for t in self.by_queue()}
        except Exception as exc:
            self._reset()
            raise _error("redis LLEN failed", exc) from exc


class Message(NamedTuple):
    """One AMQP message to publish, built, and the task it carries."""

    captured: codec.Captured
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]
    task: Task


Prepared = list[Message]


class AmqpDispatcher(_Base):
    def __init__(self, app: Celery, config: Config) -> None:
        super().__init__(app, config)
        self._published = 0  # the channel's last delivery tag
        self._unconfirmed: set[int] = set()  # delivery tags of the batch being sent
        self._nacked: set[int] = set()
        self._returned: list[tuple[str, str]] = []  # (routing key, task id)
        self._confirming: Any = None  # the channel in confirm mode

    def _channel(self) -> Any:
        channel = self._declare()
        if channel is not self._confirming:  # a new connection's
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            self._confirming = channel
            self._published = 0
        return channel

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._confirm(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._nacked.update(self._confirm(tag, multiple))

    def _confirm(self, tag: int, multiple: bool) -> set[int]:
        """The tags a confirmation covers (``multiple``: every one up to ``tag``)."""
        done = ({t for t in self._unconfirmed if t <= tag} if multiple
                else {tag} & self._unconfirmed)
        self._unconfirmed -= done
        return done

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        """An unroutable message: the broker confirms it all the same, after this."""
        self._returned.append((routing_key, message.properties.get("correlation_id")))

    def prepare(self, tasks: Sequence[Task]) -> Prepared:
        """Template, body, headers and properties of each message; the channel wraps them
        in send()."""
        batch = self.batch
        out: Prepared = []
        for target, group in self.split(tasks):
            c, b = target.captured, target.builder
            for t in group:
                kwargs = task_kwargs(t, batch)
                out.append(Message(c, b.body(t.raws, batch, kwargs),
                                   b.headers(t.task_id, t.raws, _args(t, batch), batch, t.ids,
                                             kwargs, t.trace), b.properties(t.task_id), t))
        return out

    def without(self, prepared: Prepared, gone: set[tuple[str, int]]) -> Prepared:
        return [m for m in prepared if (m.task.topic, m.task.partition()) not in gone]

    def task_size(self, task: Task) -> int:
        (message,) = self.prepare([task.restored()])
        return len(message.body)

    def send(self, prepared: Prepared) -> None:
        if not prepared:
            return
        self._nacked, self._returned = set(), []
        try:
            channel = self._channel()
            first = self._published + 1
            self._unconfirmed = set(range(first, first + len(prepared)))
            for c, body, headers, properties, _ in prepared:
                message = channel.prepare_message(body, 0, c.content_type, c.content_encoding,
                                                  headers, properties)
                channel.basic_publish(message, exchange=c.exchange, routing_key=c.routing_key,
                                      mandatory=True)
            self._published += len(prepared)
            conn = self._connection()
            while self._unconfirmed:
                conn.drain_events(timeout=self.app.conf.broker_transport_options["read_timeout"])
        except Exception as exc:
            self._reset()
            raise _error("amqp publish failed", exc) from exc
        returned = {task_id for _, task_id in self._returned}
        if not (self._nacked or returned):
            return
        # The retry sends only these: what the broker confirmed it holds.
        prepared[:] = [p for tag, p in enumerate(prepared, first)
                       if tag in self._nacked or p.properties["correlation_id"] in returned]
        # And on a new channel, with the queues declared again, as send_task would: after
        # a quorum queue's leader died, RabbitMQ (3.10 here) kept nacking every publish on
        # the channel that had used it, for as long as it stayed open, while a new
        # channel's went to the new leader.
        self._reset()
        if self._returned:
            keys = ", ".join(repr(k) for k in dict.fromkeys(k for k, _ in self._returned))
            raise DispatchError(f"amqp broker returned {len(self._returned)} unroutable "
                                f"messages (no queue bound to {keys})")
        raise DispatchError(f"amqp broker refused (nack) {len(self._nacked)} messages of "
                            "the batch")

    def queue_depths(self) -> dict[str, int]:
        try:
            channel = self._channel()
            return {t.queue: int(channel.queue_declare(queue=t.queue, passive=True)[1])
                    for t in self.by_queue()}
        except Exception as exc:
            self._reset()
            raise _error("amqp queue depth failed", exc) from exc
