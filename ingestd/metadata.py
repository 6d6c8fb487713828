"""What a task learns of its Kafka record besides the JSON: ``--with-metadata``'s ``kafka``
keyword argument, and the record's W3C trace context.

Both are read from the consumed message while its batch is decoded, and only
where they apply: the metadata with ``--with-metadata``, the trace context for
records that carry headers at all.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from ingestd.rdkafka import Header

# W3C Trace Context, as OpenTelemetry's propagators write it into Kafka headers, and as
# opentelemetry-instrumentation-celery reads it from a task message's headers.
TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
# W3C: a tracestate holds at most 512 characters. A traceparent is 55 in version 00; a
# later version may add fields, and one longer than this is left out too.
MAX_TRACE_HEADER = 512
# version-trace id-parent id-flags, as OpenTelemetry's TraceContextTextMapPropagator reads
# it (blanks around it allowed): version ff, an all-zero id, and version 00 with more
# fields are invalid.
_TRACEPARENT = re.compile(
    r"[ \t]*(?!ff)([0-9a-f]{2})-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
    r"(-.*)?[ \t]*")


def kafka_metadata(msg: Message, headers: Sequence[Header] | None) -> dict[str, Any]:
    """The ``kafka`` keyword argument for the task of ``msg`` (a record without an error),
    whose headers (:func:`ingestd.rdkafka.headers`) are ``headers``.

    ``{"topic", "partition", "offset", "timestamp", "key", "headers", "base64"}``:
    the timestamp in milliseconds since the epoch (None where the record has none);
    the key, and each header as ``[name, value]`` in the record's order. Keys, header
    names and header values are strings where they are valid UTF-8, else base64 of
    their bytes; ``base64`` names those (``"key"``, ``"headers.<index>"`` for a value,
    ``"headers.<index>.name"`` for a name)."""
    encoded: list[str] = []

    def text(value: bytes | str | None, where: str) -> str | None:
        if value is None or isinstance(value, str):
            return value
        try:
            return value.decode()
        except UnicodeDecodeError:
            encoded.append(where)
            return base64.b64encode(value).decode()

    kind, timestamp = msg.timestamp()
    return {
        "topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset(),
        "timestamp": None if kind == TIMESTAMP_NOT_AVAILABLE else timestamp,
        "key": text(msg.key(), "key"),
        "headers": [[text(name, f"headers.{i}.name"), text(value, f"headers.{i}")]
                    for i, (name, value) in enumerate(headers or ())],
        "base64": encoded,
    }


def trace_context(headers: Sequence[Header]) -> dict[str, str] | None:
    """The record's ``traceparent`` and ``tracestate`` headers, as Celery message headers;
    None without a ``traceparent`` (a tracestate alone continues nothing). Names match
    in any case, as HTTP's do; the first of a name wins. A ``traceparent`` not in W3C's
    form, a ``tracestate`` that is not printable ASCII, and either one longer than
    :data:`MAX_TRACE_HEADER`, are left out."""
    found: dict[str, str | None] = {}
    for name, value in headers:
        if not isinstance(name, str):  # not UTF-8: no trace header's name
            continue
        low = name.lower()
        if low not in (TRACEPARENT, TRACESTATE) or low in found:
            continue
        found[low] = None  # the first of a name wins, valid or not
        if value is None or len(value) > MAX_TRACE_HEADER or not value.isascii():
            continue
        text = value if isinstance(value, str) else value.decode()
        if low == TRACEPARENT:
            match = _TRACEPARENT.fullmatch(text)
            if match is not None and not (match[1] == "00" and match[2]):
                found[low] = text
        elif text.isprintable():
            found[low] = text
    if found.get(TRACEPARENT) is None:
        return None
    return {name: kept for name in (TRACEPARENT, TRACESTATE)
            if (kept := found.get(name)) is not None}
