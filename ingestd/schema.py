"""Decode and validate one record with msgspec.

Validation never rewrites the record: the caller forwards the original bytes,
and the decoded object is used only to validate and to build ``argsrepr``.

msgspec decodes rather than orjson: it was as fast or faster in
``benchmarks/test_micro.py`` (group ``decode+validate``), and it keeps integers
beyond 64 bits exact where orjson turns them into floats, which would make the
task's ``argsrepr`` differ from what ``send_task`` writes for the same signal.
"""

from __future__ import annotations

import importlib
import math
import re
from datetime import datetime
from typing import Annotated, Any

import msgspec

from ingestd.config import Config
from ingestd.errors import ConfigError, RecordError

DECODE, NOT_OBJECT, SCHEMA, TOO_LARGE = "decode", "not_object", "schema", "too_large"
SCHEMA_ID = "schema_id"  # --value-format registry-*: the registry does not know the id
INTERNAL = "internal"  # any other exception while one record was handled
REASONS = (DECODE, NOT_OBJECT, SCHEMA, SCHEMA_ID, TOO_LARGE, INTERNAL)
DETAIL_MAX = 1024
# A prefork `celery worker` fails tasks nested ~500 deep (pickling recursion)
# and dies at ~700, on every retry: such records are refused here.
MAX_DEPTH = 256
# A JSON string: its content may hold any bracket or comma. Possessive, and the closing
# quote optional: every match runs to its string's end or the text's, never backtracks
# and never fails, so a text is scanned once (an unterminated string of escaped quotes
# made a plain pattern retry from every quote: quadratic, 12 s for 90 KB).
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)


class Signal(msgspec.Struct):
    """The default ``signal`` schema; other fields are allowed and kept."""

    name: Annotated[str, msgspec.Meta(min_length=1)]
    value: float
    source: str
    timestamp: float | Annotated[datetime, msgspec.Meta(tz=True)]
    id: str | None = None
    tags: dict[str, str] | None = None


def load_struct(schema: str) -> type[msgspec.Struct] | None:
    """The Struct a ``--schema`` value names; None for ``object``."""
    if schema == "object":
        return None
    if schema == "signal":
        return Signal
    module_name, _, attr = schema.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # an import runs arbitrary code: any error is a bad setting
        raise ConfigError(
            f"schema: cannot import {schema!r}: {type(exc).__name__}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, msgspec.Struct)):
        raise ConfigError(f"schema: {schema!r} is not a msgspec.Struct subclass")
    return obj


class Validator:
    """Built once per worker; :meth:`check` is called for every record."""

    def __init__(self, schema: str, max_record_bytes: int,
                 max_record_items: int = Config.max_record_items, typed: bool = False) -> None:
        self.struct = load_struct(schema)
        self.finite_value = self.struct is Signal
        self.max_record_bytes = max_record_bytes
        self.max_record_items = max_record_items
        self.uncounted = min(max_record_items, 2 * MAX_DEPTH)  # bytes
        self._decode = msgspec.json.Decoder().decode
        self._typed = (msgspec.json.Decoder(self.struct).decode
                       if typed and self.struct is not None else None)

    def check(self, raw: bytes | None, extra: int = 0) -> Any:
        """The decoded JSON object, or :class:`RecordError` naming the category. ``extra``:
        the bytes of the record's key and headers, which count toward
        ``--max-record-bytes`` with its value.

        A ``typed`` validator with a struct schema decodes straight into the struct (one
        pass, no dict), and returns None for a record it accepts: for a caller that needs
        the record itself only where it cannot work from the bytes
        (``codec.record_argsrepr``). A record the struct refuses is checked again the dict
        way, so that its reason and detail are the same either way."""
        if not raw:
            detail = "empty value" if raw is not None else "null value (tombstone)"
            raise RecordError(DECODE, detail)
        if len(raw) + extra > self.max_record_bytes:
            parts = f" (value {len(raw)}, key and headers {extra})" if extra else ""
            raise RecordError(TOO_LARGE,
                              f"{len(raw) + extra} bytes{parts} > {self.max_record_bytes}")
        # Counted before decoding: a record of a million bytes can decode to tens of
        # megabytes of Python objects. Every item takes at least a byte and every level
        # two, so a record no longer than the limits holds neither too many items nor more
        # than MAX_DEPTH levels, and is not counted. Otherwise the count of every comma and
        # bracket bounds the items from above; only a record above the limit by that bound is
        # counted exactly.
        containers = 0
        if len(raw) > self.uncounted:
            containers = raw.count(b"[") + raw.count(b"{")
            if raw.count(b",") + 2 * containers > self.max_record_items:
                items = count_items(raw)
                if items > self.max_record_items:
                    raise RecordError(TOO_LARGE, f"{items} JSON items > {self.max_record_items}")
        if self._typed is not None and containers <= MAX_DEPTH:
            try:
                record = self._typed(raw)
            except Exception:  # any refusal: the dict way names it
                pass
            else:
                if not self.finite_value or math.isfinite(record.value):  # type: ignore[attr-defined]
                    return None
        try:
            obj = self._decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise RecordError(DECODE, str(exc)[:DETAIL_MAX]) from None
        except RecursionError:
            raise RecordError(DECODE, "nested too deep") from None
        if type(obj) is not dict:
            raise RecordError(NOT_OBJECT, f"top-level JSON {type(obj).__name__}, expected object")
        if containers > MAX_DEPTH and _too_deep(obj):
            raise RecordError(DECODE, f"JSON nested deeper than {MAX_DEPTH} levels")
        if self.struct is not None:
            try:
                msgspec.convert(obj, self.struct)
            except msgspec.ValidationError as exc:
                raise RecordError(SCHEMA, str(exc)[:DETAIL_MAX]) from None
            if self.finite_value and not math.isfinite(obj["value"]):
                raise RecordError(SCHEMA, "Expected a finite number - at `$.value`")
        return obj


def count_items(raw: bytes) -> int:
    """The items of a JSON text: its containers plus their elements (array items and
    object members). Counted on the bytes, at C speed, without decoding: the strings
    and white space are taken out, then commas and brackets are counted. Linear in the
    text's length, whatever its shape. On text that is not JSON the count means nothing
    (the decoder refuses such text anyway)."""
    bare = _STRING.sub(b"0", raw).translate(None, b" \t\r\n")
    containers = bare.count(b"[") + bare.count(b"{")
    empty = bare.count(b"[]") + bare.count(b"{}")
    return containers + bare.count(b",") + containers - empty


def _too_deep(obj: Any) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        for child in node.values() if type(node) is dict else node:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False
