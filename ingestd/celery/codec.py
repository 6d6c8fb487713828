"""Celery task messages (protocol 2), encoded once by Celery and then templated.

At start, :func:`capture` runs Celery's own ``send_task`` against a recording
producer with marker values, so every constant part of the message (headers,
properties, exchange, routing key, serializer, embed) is what this Celery
version produces. Per record only the task id, the args and their repr, and
kombu's per-message ``delivery_tag`` change; ``tests/test_codec.py`` proves the
result equals kombu's own encoding field by field.
"""

from __future__ import annotations

import binascii
import operator
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
from celery import Celery
from celery.utils.saferepr import saferepr
from kombu import serialization

from ingestd.errors import RecordError
from ingestd.schema import DECODE, DETAIL_MAX

try:  # the hot path in C; built where pip found a C compiler, else Python does it all
    from ingestd import _native
except ImportError:  # pragma: no cover - the dev install builds it
    _native = None  # type: ignore[assignment]
native = _native  # None: the Python path (tests switch between the two here)

_EMPTY_KWARGS = b", {}"  # how the body's tail starts: the kwargs send_task was given
_MARK = "\x01ingestd-args\x01"
_MARK_ID = "\x01ingestd-id\x01"
# Batch tasks: the id of each record in the list, aligned with the signals
# (``<topic>-<partition>-<offset>``), as a message header. Celery hands every
# header to the task as ``self.request.ingestd_record_ids``. A batch task's own
# id names the slice of offsets it holds, which depends on how a consume cut
# the stream; the record ids are what a repeat after a crash keeps.
RECORD_IDS = "ingestd_record_ids"
# A record's JSON this many times argsrepr's maxsize has a repr that saferepr would cut.
LONG_RECORD = 4


@dataclass(frozen=True)
class Captured:
    """What ``send_task`` handed to ``Producer.publish`` for marker inputs."""

    body_head: bytes  # serialized body before the args
    body_tail: bytes  # ... and after them
    content_type: str
    content_encoding: str
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    properties: dict[str, Any]  # correlation_id, reply_to, delivery_mode, priority, ...
    argsrepr_maxsize: int
    kwargsrepr_maxsize: int

    @property
    def kwargs_tail(self) -> bytes:
        """The body after the kwargs: :attr:`body_tail` without its empty ``{}``."""
        return self.body_tail[len(_EMPTY_KWARGS):]


class _RecordingProducer:
    """Stands in for a kombu Producer: records the publish call instead of sending."""

    def __init__(self, app: Celery, url: str | None) -> None:
        self.connection = app.connection_for_write(url)
        self.call: tuple[Any, dict[str, Any]] | None = None

    def publish(self, body: Any, **kwargs: Any) -> None:
        self.call = (body, kwargs)


def capture(app: Celery, task: str, queue: str, batch: bool = False,
            url: str | None = None) -> Captured:
    """Let Celery build a message for marker inputs and keep its constant parts, for the
    broker at ``url`` (by default the app's)."""
    recorder = _RecordingProducer(app, url)
    extra = {"headers": {RECORD_IDS: [_MARK_ID]}} if batch else {}
    try:
        app.send_task(task, args=[_MARK], kwargs={}, task_id=_MARK_ID, queue=queue,
                      producer=recorder, **extra)
    finally:
        recorder.connection.release()
    assert recorder.call is not None, "send_task did not publish"
    body, kw = recorder.call
    content_type, content_encoding, data = serialization.dumps(
        body, serializer=kw.pop("serializer"))
    data = data.encode() if isinstance(data, str) else data
    args_json = serialization.dumps([_MARK], serializer="json")[2]
    args_json = args_json.encode() if isinstance(args_json, str) else args_json
    head, found, tail = data.partition(args_json)
    if not found or not data.startswith(b"[") or not tail.startswith(_EMPTY_KWARGS):
        raise RuntimeError(f"unexpected Celery body layout: {data!r}")
    headers = dict(kw.pop("headers"))
    for key in ("retry", "retry_policy", "declare", "timeout", "confirm_timeout", "compression"):
        kw.pop(key, None)
    exchange, routing_key = kw.pop("exchange"), kw.pop("routing_key")
    return Captured(head, tail, content_type, content_encoding, exchange or "", routing_key,
                    headers, kw, app.amqp.argsrepr_maxsize, app.amqp.kwargsrepr_maxsize)


def argsrepr(args: list[Any], maxsize: int, shallow: bool = False, long: bool = False) -> str:
    """``saferepr(args, maxsize)``, using ``repr`` where it provably gives the same text.

    saferepr costs tens of microseconds per signal; repr a few. They agree when
    the text is short enough not to be cut, every string is printable ASCII
    without quotes or backslashes (saferepr quotes differently), and no
    container sits deeper than saferepr's three levels (``shallow`` says the
    caller knows that already). ``long``: the record's JSON is many times
    ``maxsize``, so repr's text would be cut; saferepr stops at ``maxsize``, where
    repr would write it all (47 ms for a megabyte of 4,000-digit integers).
    """
    if not long and (shallow or _shallow(args)):  # repr() of a ~1000-deep record would recurse
        text = repr(args)
        if _same_as_saferepr(text, maxsize):
            return text
    return str(saferepr(args, maxsize))


def _same_as_saferepr(text: str, maxsize: int) -> bool:
    """Whether ``repr`` wrote what saferepr would: not cut at ``maxsize``, and every string
    printable ASCII without quotes or backslashes (saferepr quotes those differently)."""
    return len(text) < maxsize and text.isascii() and "\\" not in text and '"' not in text


class _Elided:
    """A container below saferepr's third level, as saferepr writes it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


_ELIDED_LIST, _ELIDED_DICT = _Elided("[...]"), _Elided("{...}")


def _elided(obj: Any, level: int = 1) -> Any:
    """``obj`` with every container below the third level replaced by what saferepr
    writes for it (``[...]``, ``{...}``, however short)."""
    t = type(obj)
    if t is dict:
        return _ELIDED_DICT if level > 3 else {k: _elided(v, level + 1) for k, v in obj.items()}
    if t is list:
        return _ELIDED_LIST if level > 3 else [_elided(v, level + 1) for v in obj]
    return obj


def kwargsrepr(kwargs: dict[str, Any], maxsize: int) -> str:
    """``saferepr(kwargs, maxsize)``, using ``repr`` where it provably gives the same text
    (as :func:`argsrepr`). A task's ``kafka`` keyword argument holds its headers four
    levels down, where saferepr writes ``[...]``; saferepr itself costs some 200 µs on
    it."""
    text = repr(_elided(kwargs))
    if _same_as_saferepr(text, maxsize):
        return text
    return str(saferepr(kwargs, maxsize))


def record_argsrepr(raw: bytes, obj: Any, maxsize: int) -> bytes:
    """The JSON string of the argsrepr of ``[record]``, as ``orjson.dumps(saferepr(...))``.

    From the record's bytes in C where ``ingestd._native`` knows the answer (the common
    flat record: a fraction of ``repr``'s cost, and no dict needed); else from ``obj``,
    the decoded record, or decoded here where a typed validator built none."""
    if native is not None:
        text = native.argsrepr(raw, maxsize)
        if text is not None:
            return text
    return _python_argsrepr(raw, obj, maxsize)


def _python_argsrepr(raw: bytes, obj: Any, maxsize: int) -> bytes:
    """:func:`record_argsrepr` where ``ingestd._native`` does not answer."""
    try:
        record = obj if type(obj) is dict else msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:  # what the typed validator skipped: a number too long
        raise RecordError(DECODE, str(exc)[:DETAIL_MAX]) from None
    return orjson.dumps(argsrepr([record], maxsize, few_brackets(raw),
                                 len(raw) > LONG_RECORD * maxsize))


def few_brackets(raw: bytes) -> bool:
    """At most two containers in the JSON text: nothing can sit three levels deep."""
    return raw.count(b"{") + raw.count(b"[") <= 2


def _shallow(args: list[Any]) -> bool:
    """No container below the third level: [ {signal} {tags} ]."""
    for obj in args:
        t = type(obj)
        if t is not dict and t is not list:
            continue
        for v in obj.values() if t is dict else obj:
            tv = type(v)
            if tv is not dict and tv is not list:
                continue
            for x in v.values() if tv is dict else v:
                if type(x) is dict or type(x) is list:
                    return False
    return True


def delivery_tags(n: int) -> list[bytes]:
    """``n`` distinct version-4 UUIDs in their canonical text, as ASCII bytes (what the
    envelope holds), one per message, as kombu's ``delivery_tag``.

    kombu calls ``str(uuid.uuid4())`` per message (about 3 microseconds). Here
    one random UUID per batch gives the first 80 bits; the last 48 count up
    from a random start. The tags are unique within the batch and as unlikely
    to meet another batch's as random UUIDs are; the worker uses them only as
    keys while a message is unacknowledged.
    """
    head = str(uuid.uuid4())[:24].encode()
    start = int.from_bytes(os.urandom(6)) % (2**48 - n)
    return [b"%b%012x" % (head, i) for i in range(start, start + n)]


def kwargs_json(kwargs: dict[str, Any]) -> bytes:
    """The task's kwargs as the body holds them."""
    return orjson.dumps(kwargs)


class MessageBuilder:
    """Builds the task message for one signal (``each``) or a list of them (``batch``).

    A task may carry ``kwargs`` (``--with-metadata``) and extra headers (a record's
    trace context): ``send_task`` appends extra headers after its own, in order."""

    def __init__(self, captured: Captured) -> None:
        self.c = captured
        self._headers = captured.headers
        self._props = captured.properties

    def body(self, raws: Sequence[bytes], batch: bool,
             kwargs: dict[str, Any] | None = None) -> bytes:
        """The serialized ``[args, kwargs, embed]`` with each record's bytes spliced in."""
        inner = b"[[" + b", ".join(raws) + b"]]" if batch else b"[" + raws[0] + b"]"
        if kwargs:
            return self.c.body_head + inner + b", " + kwargs_json(kwargs) + self.c.kwargs_tail
        return self.c.body_head + inner + self.c.body_tail

    def argsrepr(self, raws: Sequence[bytes], args: list[Any], batch: bool) -> str:
        if batch:  # long lists are cut at maxsize; saferepr stops early
            return str(saferepr(args, self.c.argsrepr_maxsize))
        text: str = orjson.loads(record_argsrepr(raws[0], args[0], self.c.argsrepr_maxsize))
        return text

    def headers(self, task_id: str, raws: Sequence[bytes], args: list[Any],
                batch: bool, ids: Sequence[str] | None = None,
                kwargs: dict[str, Any] | None = None,
                extra: dict[str, str] | None = None) -> dict[str, Any]:
        h = self._headers.copy()
        h["id"] = h["root_id"] = task_id
        h["argsrepr"] = self.argsrepr(raws, args, batch)
        if kwargs:  # a batch's is long: saferepr stops at maxsize
            h["kwargsrepr"] = (str(saferepr(kwargs, self.c.kwargsrepr_maxsize)) if batch else
                               kwargsrepr(kwargs, self.c.kwargsrepr_maxsize))
        if RECORD_IDS in h:
            h[RECORD_IDS] = list(ids or ())
        if extra:
            h.update(extra)
        return h

    def properties(self, task_id: str) -> dict[str, Any]:
        p = self._props.copy()
        p["correlation_id"] = task_id
        return p


class RedisEnvelopes:
    """The JSON envelope kombu's Redis transport LPUSHes, one per message.

    kombu builds it with ``prepare_message``, base64-encodes the body and
    ``json.dumps`` the whole dict per message. Here the dict is serialized once
    with placeholders and split into constant fragments; each message joins the
    fragments with its own body, id, argsrepr and delivery tag. Task ids are
    ``<topic>-<partition>-<offset>`` and Kafka topic names are ``[a-zA-Z0-9._-]``,
    so ids, like base64 and uuids, need no JSON escaping; argsrepr is escaped.
    """

    _SLOTS = ("body", "id", "argsrepr", "tag", "ids")
    _JSON = ("argsrepr", "ids")

    def __init__(self, builder: MessageBuilder) -> None:
        self.b = builder
        c = builder.c
        marks = {slot: f"\x02{slot}\x02" for slot in self._SLOTS}
        headers = {**c.headers, "id": marks["id"], "root_id": marks["id"],
                   "argsrepr": marks["argsrepr"]}
        if RECORD_IDS in headers:
            headers[RECORD_IDS] = marks["ids"]
        template = orjson.dumps(self._envelope(marks["body"], headers, marks["id"], marks["tag"]))
        # Strings' contents (body, id, tag) go between the template's own quotes;
        # argsrepr and ids are whole JSON values.
        needles = {slot: orjson.dumps(m) if slot in self._JSON else orjson.dumps(m)[1:-1]
                   for slot, m in marks.items()}
        pattern = re.compile(b"|".join(re.escape(n) for n in needles.values()))
        by_needle = {n: slot for slot, n in needles.items()}
        fragments = pattern.split(template)
        slots = [by_needle[m] for m in pattern.findall(template)]
        # One bytes %-format: a single C call joins the fragments and the values.
        self._format = b"%b".join(f.replace(b"%", b"%%") for f in fragments)
        self._pick = operator.itemgetter(*[self._SLOTS.index(s) for s in slots])
        # ... or, for ingestd._native.encode_each, the fragments and the slots' numbers
        self._fragments = tuple(fragments)
        self._slots = bytes(self._SLOTS.index(s) for s in slots)
        # An each-mode body around the record's bytes: [[record], {}, embed]
        self._head, self._tail = c.body_head + b"[", b"]" + c.body_tail

    def _envelope(self, body: str, headers: dict[str, Any], task_id: str,
                  delivery_tag: str) -> dict[str, Any]:
        """The envelope as kombu's Redis transport builds it (``prepare_message``, then
        the virtual channel's body encoding, delivery info and tag)."""
        c = self.b.c
        props = {"priority": 0, **c.properties, "correlation_id": task_id,
                 "delivery_info": {"exchange": c.exchange, "routing_key": c.routing_key},
                 "body_encoding": "base64", "delivery_tag": delivery_tag}
        return {"body": body, "content-encoding": c.content_encoding,
                "content-type": c.content_type, "headers": headers, "properties": props}

    def encode_full(self, task_id: str, body: bytes, headers: dict[str, Any],
                    delivery_tag: bytes) -> bytes:
        """The envelope of a message whose headers are not the template's: with a
        record's trace context, or ``kwargs`` (``--with-metadata``). A dict serialized
        per message: some microseconds more than the template."""
        envelope: bytes = orjson.dumps(self._envelope(
            binascii.b2a_base64(body, newline=False).decode(), headers, task_id,
            delivery_tag.decode()))
        return envelope

    def encode_batch(self, task_id: str, raws: Sequence[bytes], args: list[Any],
                     delivery_tag: bytes, ids: Sequence[str]) -> bytes:
        """The envelope of a ``batch``-mode task: ``args`` is ``[[signal, ...]]``, ``ids``
        the records' own ids."""
        b = self.b
        envelope: bytes = self._format % self._pick((
            binascii.b2a_base64(b.body(raws, True), newline=False),
            task_id.encode(),
            orjson.dumps(b.argsrepr(raws, args, True)),
            delivery_tag,
            orjson.dumps(ids),
        ))
        return envelope

    def encode_each(self, tasks: Sequence[tuple[Any, ...]],
                    tags: Sequence[bytes]) -> list[bytes]:
        """The envelopes of ``each``-mode tasks (``task_id, topic, [raw], [obj], ...``)
        without kwargs or extra headers:
        in C when ``ingestd._native`` is built, else in one Python loop. It runs once per
        signal, so its names are bound to locals and the body and argsrepr are built
        inline (:meth:`MessageBuilder.body` and :func:`record_argsrepr`)."""
        if native is not None:
            envelopes: list[bytes] = native.encode_each(*self._native_args(tasks, tags), None)
            return envelopes
        head, tail, maxsize = self._head, self._tail, self.b.c.argsrepr_maxsize
        fmt, pick, b64, slow = self._format, self._pick, binascii.b2a_base64, record_argsrepr
        out: list[bytes] = []
        add = out.append
        for task, tag in zip(tasks, tags, strict=True):
            raw = task[2][0]
            add(fmt % pick((b64(head + raw + tail, newline=False), task[0].encode(),
                            slow(raw, task[3][0], maxsize), tag, b"[]")))
        return out

    def lpush_each(self, key: bytes, tasks: Sequence[tuple[Any, ...]],
                   tags: Sequence[bytes]) -> bytes | None:
        """``LPUSH key`` of the envelopes of :meth:`encode_each`, in RESP: written by C straight
        into one buffer (no bytes object per envelope, no second copy), as
        ``dispatch.pack_lpush`` packs them; None where ``ingestd._native`` is not built, or
        where a task carries trace context (``Task.trace``)."""
        if native is None:
            return None
        packed: bytes = native.encode_each(*self._native_args(tasks, tags), key)
        return packed

    def _native_args(self, tasks: Sequence[Any], tags: Sequence[bytes]) -> tuple[
            tuple[bytes, ...], bytes, bytes, bytes, int, list[Any], list[bytes],
            Callable[[Any], bytes]]:
        """``native.encode_each``'s arguments but the key."""
        maxsize = self.b.c.argsrepr_maxsize
        return (self._fragments, self._slots, self._head, self._tail, maxsize,
                list(tasks), list(tags),
                lambda task: _python_argsrepr(task[2][0], task[3][0], maxsize))
