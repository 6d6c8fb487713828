"""librdkafka's C API, for what confluent-kafka's Python client cannot do safely: read a
consumed record's headers whatever their bytes, and produce records whose header names
are any bytes.

Kafka takes any bytes as a header name, and producers on librdkafka's C API or
Go's franz-go write such names. confluent-kafka (2.16 at least) decodes every
name as UTF-8 on a message's first ``headers()`` call: a name that is not UTF-8
raises ``SystemError`` and leaves a damaged list behind, on which the next call
crashes the process. So ingestd never calls ``Message.headers()`` on a consumed
record. :func:`headers` reads the list librdkafka made, which the message keeps
until that first call, and gives each name as ``str`` where it is UTF-8 and as
``bytes`` where it is not. confluent-kafka's producer writes a header name only
from a ``str``; :class:`Producer` writes through ``rd_kafka_produceva``.

The library is the one confluent-kafka loaded (its own lists and structs must
match). No ctypes callback is used: the systemd unit denies the writable and
executable memory that libffi's closures need. Delivery reports, logs and
errors come as events on librdkafka's main queue, served by
:meth:`Producer.poll`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from ctypes import POINTER, c_char, c_char_p, c_int, c_int32, c_int64, c_size_t, c_ssize_t
from ctypes import c_void_p as _ptr
from typing import Any, NamedTuple, cast

from confluent_kafka import KafkaError, KafkaException, Message

Header = tuple[str | bytes, bytes | None]
HeaderIn = tuple[str | bytes, bytes | str | None]

_PRODUCER = 0  # rd_kafka_type_t
_CONF_OK = 0
_EVENT_DR, _EVENT_LOG, _EVENT_ERROR = 0x1, 0x4, 0x8
_VTYPE_END, _VTYPE_TOPIC, _VTYPE_PARTITION, _VTYPE_VALUE, _VTYPE_KEY, _VTYPE_OPAQUE, \
    _VTYPE_MSGFLAGS, _VTYPE_HEADERS = 0, 1, 3, 4, 5, 6, 7, 10
_MSG_F_COPY = 0x2
_PURGE_QUEUE, _PURGE_INFLIGHT = 0x1, 0x2
_QUEUE_FULL = KafkaError._QUEUE_FULL
# librdkafka's syslog levels, as logging's
_LEVELS = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL, 3: logging.ERROR,
           4: logging.WARNING, 5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG}


class _Message(ctypes.Structure):
    """rd_kafka_message_t, a public struct."""

    _fields_ = [("err", c_int), ("rkt", _ptr), ("partition", c_int32), ("payload", _ptr),
                ("len", c_size_t), ("key", _ptr), ("key_len", c_size_t), ("offset", c_int64),
                ("opaque", _ptr)]


class _Mem(ctypes.Structure):
    _fields_ = [("ptr", _ptr), ("size", c_size_t)]


class _Value(ctypes.Union):
    _fields_ = [("cstr", c_char_p), ("ptr", _ptr), ("i32", c_int32), ("i", c_int),
                ("mem", _Mem), ("pad", c_char * 64)]


class _VU(ctypes.Structure):
    """rd_kafka_vu_t: one field of a record for rd_kafka_produceva."""

    _fields_ = [("vtype", c_int), ("u", _Value)]


_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "rd_kafka_version_str": (c_char_p, []),
    "rd_kafka_err2str": (c_char_p, [c_int]),
    "rd_kafka_conf_new": (_ptr, []),
    "rd_kafka_conf_set": (c_int, [_ptr, c_char_p, c_char_p, c_char_p, c_size_t]),
    "rd_kafka_conf_set_events": (None, [_ptr, c_int]),
    "rd_kafka_conf_destroy": (None, [_ptr]),
    "rd_kafka_new": (_ptr, [c_int, _ptr, c_char_p, c_size_t]),
    "rd_kafka_destroy": (None, [_ptr]),
    "rd_kafka_purge": (c_int, [_ptr, c_int]),
    "rd_kafka_outq_len": (c_int, [_ptr]),
    "rd_kafka_queue_get_main": (_ptr, [_ptr]),
    "rd_kafka_queue_destroy": (None, [_ptr]),
    "rd_kafka_set_log_queue": (c_int, [_ptr, _ptr]),
    "rd_kafka_queue_poll": (_ptr, [_ptr, c_int]),
    "rd_kafka_event_type": (c_int, [_ptr]),
    "rd_kafka_event_message_next": (POINTER(_Message), [_ptr]),
    "rd_kafka_event_log": (c_int, [_ptr, POINTER(c_char_p), POINTER(c_char_p), POINTER(c_int)]),
    "rd_kafka_event_error": (c_int, [_ptr]),
    "rd_kafka_event_error_string": (c_char_p, [_ptr]),
    "rd_kafka_event_error_is_fatal": (c_int, [_ptr]),
    "rd_kafka_event_destroy": (None, [_ptr]),
    "rd_kafka_topic_name": (c_char_p, [_ptr]),
    "rd_kafka_headers_new": (_ptr, [c_size_t]),
    "rd_kafka_headers_destroy": (None, [_ptr]),
    "rd_kafka_header_add": (c_int, [_ptr, c_char_p, c_ssize_t, c_char_p, c_ssize_t]),
    "rd_kafka_header_get_all": (c_int, [_ptr, c_size_t, POINTER(c_char_p), POINTER(_ptr),
                                        POINTER(c_size_t)]),
    "rd_kafka_produceva": (_ptr, [_ptr, POINTER(_VU), c_size_t]),
    "rd_kafka_error_code": (c_int, [_ptr]),
    "rd_kafka_error_string": (c_char_p, [_ptr]),
    "rd_kafka_error_destroy": (None, [_ptr]),
}


@functools.cache
def library() -> ctypes.CDLL:
    """The librdkafka that confluent-kafka runs on, its functions declared."""
    lib = ctypes.CDLL(_mapped_library())
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _mapped_library() -> str:
    """The path of the librdkafka mapped into this process by confluent-kafka (its wheel
    bundles one; a source build links the system's)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip()
            if path.rpartition("/")[2].startswith("librdkafka"):
                return path
    found = ctypes.util.find_library("rdkafka")  # pragma: no cover - not on Linux wheels
    if found is None:
        raise ImportError("librdkafka is not loaded and cannot be found")
    return found


# --- the configuration properties -------------------------------------------------------


class Property(NamedTuple):
    """One of librdkafka's configuration properties, as it documents it."""

    scope: str  # "C" consumers only, "P" producers only, "*" every client
    doc: str  # the description cell, ending in ``*Type: ...*``


@functools.cache
def properties() -> dict[str, Property]:
    """Every property librdkafka knows, from ``rd_kafka_conf_properties_show`` (its
    CONFIGURATION.md table, for the version that runs)."""
    lib, libc = library(), ctypes.CDLL(None)
    libc.fopen.restype = _ptr
    libc.fopen.argtypes = [c_char_p, c_char_p]
    libc.fclose.argtypes = [_ptr]
    lib.rd_kafka_conf_properties_show.argtypes = [_ptr]
    with tempfile.NamedTemporaryFile("r") as out:
        handle = libc.fopen(out.name.encode(), b"w")
        lib.rd_kafka_conf_properties_show(handle)
        libc.fclose(handle)
        rows = [line.split("|") for line in out.read().splitlines() if "|" in line]
    return {cells[0].strip(): Property(cells[1].strip(), cells[-1]) for cells in rows
            if len(cells) > 2 and cells[1].strip() in ("C", "P", "*")}


# --- a consumed record's headers --------------------------------------------------------


class _Layout(NamedTuple):
    headers_at: int  # the offset of confluent-kafka's converted list in a Message
    c_headers_at: int  # the offset of librdkafka's headers


def _layout() -> _Layout | None:
    """Where a ``Message`` keeps its headers: after the object's head, the pointers to its
    topic, value, key, converted headers, then librdkafka's headers (confluent-kafka's
    ``Message`` struct). Checked on a message made here, whose topic, value, key and
    headers must sit there and whose librdkafka headers must be NULL; None where they do
    not (another build or version: :func:`headers` then asks confluent-kafka)."""
    size = ctypes.sizeof(_ptr)
    head = object.__basicsize__
    fields = [head + i * size for i in range(5)]
    try:
        probe = Message(topic="t", value=b"v", key=b"k", headers=[("h", b"1")])
    except TypeError:  # confluent-kafka before 2.13: no Message constructor
        return None
    if type(probe).__basicsize__ < fields[-1] + size:
        return None
    address = id(probe)
    found = [_ptr.from_address(address + offset).value for offset in fields]
    if found != [id(probe.topic()), id(probe.value()), id(probe.key()), id(probe.headers()),
                 None]:
        return None
    return _Layout(fields[3], fields[4])


def _ctypes_headers(layout: _Layout) -> Callable[[Message], list[Header] | None]:
    """:func:`headers` in Python, where ``ingestd._native`` is not built."""
    lib = library()
    get_all = lib.rd_kafka_header_get_all

    def read(msg: Message) -> list[Header] | None:
        if type(msg) is not Message:
            raise TypeError(f"not a confluent_kafka.Message: {type(msg).__name__}")
        c_headers = _ptr.from_address(id(msg) + layout.c_headers_at).value
        if c_headers is None:  # none, or made in Python
            return cast("list[Header] | None", msg.headers())
        name, value, size = c_char_p(), _ptr(), c_size_t()
        out: list[Header] = []
        for i in itertools.count():
            if get_all(c_headers, i, ctypes.byref(name), ctypes.byref(value),
                       ctypes.byref(size)):
                return out
            raw = name.value or b""
            try:
                key: str | bytes = raw.decode()
            except UnicodeDecodeError:
                key = raw
            out.append((key, None if value.value is None
                        else ctypes.string_at(value.value, size.value)))
        raise AssertionError("unreachable")  # pragma: no cover

    return read


def _guarded(msg: Message) -> list[Header] | None:
    """confluent-kafka's own ``headers()``, where the layout is not known: a record whose
    headers it cannot read is taken as having none, and the damaged list it left is
    replaced, so that no later call touches it."""
    try:
        return cast("list[Header] | None", msg.headers())
    except Exception:
        msg.set_headers(None)  # type: ignore[arg-type]
        return None


def _reader() -> tuple[Callable[[Message], list[Header] | None], str]:
    """:func:`headers` and how it reads them (``--check`` prints it)."""
    layout = _layout()
    if layout is None:
        return _guarded, "by confluent-kafka (a name that is not UTF-8 loses the headers)"
    try:
        from ingestd import _native
    except ImportError:  # pragma: no cover - the dev install builds it
        return _ctypes_headers(layout), "from librdkafka, through ctypes"
    address = ctypes.cast(library().rd_kafka_header_get_all, _ptr).value
    assert address is not None
    _native.configure_headers(Message, layout.headers_at, layout.c_headers_at, address)
    return _native.record_headers, "from librdkafka, in C (ingestd._native)"


# headers(msg): a consumed record's headers, in order, as [(name, value)]: the name a str
# where it is UTF-8, else bytes; the value bytes, or None for a header without one. None
# for a record without headers. Never raises on any bytes, and may be called again.
# Message.headers() must never be called on a consumed record. Bound to the reader
# itself, not wrapped: it runs once per record.
headers, HEADERS_READ_BY = _reader()


def headers_size(found: Sequence[Header] | None) -> int:
    """The bytes of a record's headers, names and values: with its value and key, what
    counts toward ``--max-record-bytes`` and ``--max-batch-bytes``."""
    return sum(len(name.encode() if type(name) is str else name) + len(value or b"")
               for name, value in found or ())


# --- producing any bytes ----------------------------------------------------------------


class Delivery(NamedTuple):
    """What a delivery report says of a record, as a consumed ``Message`` would."""

    topic_name: str
    partition_id: int
    offset_in: int

    def topic(self) -> str:
        return self.topic_name

    def partition(self) -> int:
        return self.partition_id

    def offset(self) -> int:
        return self.offset_in


OnDelivery = Callable[[KafkaError | None, Delivery], None]


class Producer:
    """A librdkafka producer whose records may carry header names of any bytes. The part
    of confluent-kafka's ``Producer`` that ingestd uses: ``produce`` (``BufferError`` on a
    full queue, ``KafkaException`` on a refusal), ``poll``, ``flush``, ``len``.

    ``props`` are librdkafka properties; ``logger`` (a :class:`logging.Logger`) gets
    librdkafka's logs and errors, as confluent-kafka's does."""

    def __init__(self, props: dict[str, Any]) -> None:
        lib = self._lib = library()
        props = dict(props)
        self.logger: logging.Logger = props.pop("logger", None) or logging.getLogger("librdkafka")
        conf = lib.rd_kafka_conf_new()
        error = ctypes.create_string_buffer(512)
        try:
            for key, value in {**props, "log.queue": True}.items():
                if callable(value):
                    raise ValueError(f"{key}: callbacks are not supported here")
                text = str(value).lower() if isinstance(value, bool) else str(value)
                if lib.rd_kafka_conf_set(conf, key.encode(), text.encode(), error,
                                         len(error)) != _CONF_OK:
                    raise KafkaException(KafkaError(KafkaError._INVALID_ARG,
                                                    error.value.decode(errors="replace")))
            lib.rd_kafka_conf_set_events(conf, _EVENT_DR | _EVENT_LOG | _EVENT_ERROR)
        except BaseException:
            lib.rd_kafka_conf_destroy(conf)
            raise
        self._rk = lib.rd_kafka_new(_PRODUCER, conf, error, len(error))
        if not self._rk:  # the conf is still ours
            lib.rd_kafka_conf_destroy(conf)
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG,
                                            error.value.decode(errors="replace")))
        self._queue = lib.rd_kafka_queue_get_main(self._rk)
        lib.rd_kafka_set_log_queue(self._rk, None)  # logs to the main queue
        self._reports: dict[int, OnDelivery | None] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # poll() from two threads: one serves at a time

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: Sequence[HeaderIn] | None = None, partition: int = -1,
                on_delivery: OnDelivery | None = None) -> None:
        lib = self._lib
        fields: list[tuple[int, str, Any]] = [
            (_VTYPE_TOPIC, "cstr", topic.encode()), (_VTYPE_PARTITION, "i32", partition),
            (_VTYPE_MSGFLAGS, "i", _MSG_F_COPY)]
        if value is not None:
            fields.append((_VTYPE_VALUE, "mem", value))
        if key is not None:
            fields.append((_VTYPE_KEY, "mem", key))
        c_headers = None
        if headers:
            c_headers = lib.rd_kafka_headers_new(len(headers))
            for name, data in headers:
                raw_name = name.encode() if isinstance(name, str) else bytes(name)
                raw = data.encode() if isinstance(data, str) else data
                lib.rd_kafka_header_add(c_headers, raw_name, len(raw_name), raw,
                                        -1 if raw is None else len(raw))
            fields.append((_VTYPE_HEADERS, "ptr", c_headers))
        report_id = next(self._ids)
        fields.append((_VTYPE_OPAQUE, "ptr", report_id))
        vus = (_VU * len(fields))()
        for vu, (vtype, member, data) in zip(vus, fields, strict=True):
            vu.vtype = vtype
            if member == "mem":
                vu.u.mem.ptr = ctypes.cast(c_char_p(data), _ptr)
                vu.u.mem.size = len(data)
            else:
                setattr(vu.u, member, data)
        self._reports[report_id] = on_delivery
        error = lib.rd_kafka_produceva(self._rk, vus, len(fields))
        if not error:
            return
        del self._reports[report_id]
        if c_headers is not None:  # still ours
            lib.rd_kafka_headers_destroy(c_headers)
        code = lib.rd_kafka_error_code(error)
        text = (lib.rd_kafka_error_string(error) or b"").decode(errors="replace")
        lib.rd_kafka_error_destroy(error)
        if code == _QUEUE_FULL:
            raise BufferError(text)
        raise KafkaException(KafkaError(code, text))

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery reports, logs and errors for up to ``timeout`` seconds; the
        number of delivery reports served."""
        with self._lock:
            served, wait = 0, max(0, int(timeout * 1000))
            while True:
                event = self._lib.rd_kafka_queue_poll(self._queue, wait)
                if not event:
                    return served
                try:
                    served += self._serve(event)
                finally:
                    self._lib.rd_kafka_event_destroy(event)
                wait = 0

    def _serve(self, event: int) -> int:
        lib = self._lib
        kind = lib.rd_kafka_event_type(event)
        if kind == _EVENT_DR:
            served = 0
            while message := lib.rd_kafka_event_message_next(event):
                m = message.contents
                report = self._reports.pop(m.opaque or 0, None)
                served += 1
                if report is not None:
                    error = None if m.err == 0 else KafkaError(
                        m.err, lib.rd_kafka_err2str(m.err).decode(errors="replace"))
                    topic = (lib.rd_kafka_topic_name(m.rkt) or b"").decode(errors="replace")
                    report(error, Delivery(topic, m.partition, m.offset))
            return served
        if kind == _EVENT_LOG:
            facility, text, level = c_char_p(), c_char_p(), c_int()
            if lib.rd_kafka_event_log(event, ctypes.byref(facility), ctypes.byref(text),
                                      ctypes.byref(level)) == 0:
                self.logger.log(_LEVELS.get(level.value, logging.INFO), "%s: %s",
                                (facility.value or b"").decode(errors="replace"),
                                (text.value or b"").decode(errors="replace"))
        elif kind == _EVENT_ERROR:
            fatal = lib.rd_kafka_event_error_is_fatal(event)
            self.logger.log(logging.ERROR if fatal else logging.WARNING, "%s%s",
                            "fatal: " if fatal else "",
                            (lib.rd_kafka_event_error_string(event) or b"").decode(
                                errors="replace"))
        return 0

    def flush(self, timeout: float = -1) -> int:
        """Serve the queue until every record has its delivery report, at most ``timeout``
        seconds (-1: no limit); the number of records still waiting."""
        deadline = float("inf") if timeout < 0 else time.monotonic() + timeout
        while len(self) and (left := deadline - time.monotonic()) > 0:
            self.poll(min(left, 0.1))
        return len(self)

    def __len__(self) -> int:
        return int(self._lib.rd_kafka_outq_len(self._rk))

    def close(self, timeout: float = 0.0) -> None:
        """Flush for up to ``timeout`` seconds, drop what is left, and free the client."""
        if not self._rk:
            return
        self.flush(timeout)
        self._lib.rd_kafka_purge(self._rk, _PURGE_QUEUE | _PURGE_INFLIGHT)
        self.poll(0)
        self._lib.rd_kafka_queue_destroy(self._queue)
        self._lib.rd_kafka_destroy(self._rk)
        self._rk = None
