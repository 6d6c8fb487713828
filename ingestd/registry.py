"""Confluent's Schema Registry wire format (``--value-format registry-*``).

A record's value is a magic byte (0), the schema id (4 bytes, big-endian), then the
payload in the schema's format: JSON (JSON Schema), Avro, or Protobuf (its message
indexes first). Each record becomes the JSON text ingestd would have consumed, and
goes on as that: ``--schema`` validates it, the task's argument is it. The dead
letter of a record keeps the record's own bytes.

- **JSON Schema**: the payload is the JSON text, passed on as it is.
- **Avro**: confluent-kafka's ``AvroDeserializer`` (fastavro) decodes it; orjson writes
  it as JSON, with what JSON has no type for as :func:`_plain` says: bytes and fixed
  as base64, decimals as strings (exact), timestamps, dates and times in ISO 8601,
  UUIDs as strings.
- **Protobuf**: confluent-kafka's ``ProtobufDeserializer``, given the message class
  the writer's schema declares (built from the registry's descriptor, one per schema
  id and message index), decodes it; then the proto3 JSON mapping
  (``MessageToDict``): the field names as declared, every field present (a proto3
  default too), 64-bit integers as numbers where a double holds them exactly (every
  one up to 2**53), as strings otherwise, bytes as base64, enums by name, Timestamps
  in RFC 3339.

The schemas come from the registry once per worker and schema id, before a batch is
decoded (:meth:`Registry.resolve`), never while it is: an id the registry does not
know makes its records ``schema_id`` dead letters (asked again after
:data:`UNKNOWN_KEPT`); a registry that does not answer raises
:class:`RegistryUnavailable`, which the worker waits out with its partitions
paused, as it does a Celery broker outage.
"""

from __future__ import annotations

import base64
import decimal
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from confluent_kafka import Message

from ingestd.config import Config, redact_url
from ingestd.errors import IngestdError, RecordError
from ingestd.schema import DECODE, DETAIL_MAX, INTERNAL, SCHEMA_ID

MAGIC = 0
HEADER = 5  # the magic byte and the schema id
REQUEST_TIMEOUT = 5.0  # one request to the registry, well inside --worker-timeout
UNKNOWN_KEPT = 30.0  # seconds before an id the registry did not know is asked again
KINDS = {"registry-json": "JSON", "registry-avro": "AVRO", "registry-protobuf": "PROTOBUF"}

Decoder = Callable[[bytes], bytes]  # a framed record's value to its JSON text


class RegistryUnavailable(IngestdError):
    """The schema registry did not answer, or refused ingestd: wait, then ask again."""


def client_config(config: Config) -> dict[str, Any]:
    """confluent-kafka's ``SchemaRegistryClient`` settings: the URL without its
    credentials (sent as basic auth), the TLS files, a short timeout and no retries of
    its own (the worker retries, with its partitions paused and its heartbeat going)."""
    parts = urllib.parse.urlsplit(config.schema_registry_url)
    netloc = parts.netloc.rpartition("@")[2]
    conf: dict[str, Any] = {"url": parts._replace(netloc=netloc).geturl(),
                            "timeout": REQUEST_TIMEOUT, "max.retries": 0}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        conf["basic.auth.user.info"] = f"{user}:{password}"
    for key, value in (("ssl.ca.location", config.schema_registry_tls_ca),
                       ("ssl.certificate.location", config.schema_registry_tls_cert),
                       ("ssl.key.location", config.schema_registry_tls_key)):
        if value:
            conf[key] = value
    return conf


def new_client(config: Config) -> Any:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient.new_client(client_config(config))  # mock:// for tests


def schema_id(value: bytes | None) -> int | None:
    """The schema id a framed value names; None when it is not framed."""
    if value is not None and len(value) > HEADER and value[0] == MAGIC:
        return int.from_bytes(value[1:HEADER], "big")
    return None


class Registry:
    """A worker's schemas, by id, and the decoder each gives."""

    def __init__(self, config: Config, client: Any = None) -> None:
        self.format = config.value_format
        self.kind = KINDS[config.value_format]
        self.url = redact_url(config.schema_registry_url)
        self.client = client if client is not None else new_client(config)
        self.decoders: dict[int, Decoder] = {}
        self.unknown: dict[int, float] = {}  # schema id -> when the registry said 404
        self._avro: Any = None  # one AvroDeserializer serves every id (it caches by id)

    def resolve(self, messages: Iterable[Message]) -> None:
        """Fetch the schema of every id these records name that is not known yet; raise
        :class:`RegistryUnavailable` when the registry does not answer."""
        now = time.monotonic()
        for msg in messages:
            if msg.error() is not None:
                continue
            sid = schema_id(msg.value())
            if sid is None or sid in self.decoders:
                continue
            told = self.unknown.get(sid)
            if told is None or now - told >= UNKNOWN_KEPT:
                self._fetch(sid)

    def decode(self, value: bytes | None) -> bytes:
        """The JSON text of a framed record; :class:`~ingestd.errors.RecordError` with the
        reason ``decode`` or ``schema_id``."""
        sid = schema_id(value)
        if sid is None:
            raise RecordError(DECODE, "not in the Schema Registry wire format (a magic "
                                      "byte 0 and a schema id, then the payload)"
                              if value else "empty value" if value is not None
                              else "null value (tombstone)")
        decoder = self.decoders.get(sid)
        if decoder is None:
            if sid not in self.unknown:  # resolve() did not run: a stop abandoned the batch
                raise RecordError(INTERNAL, f"schema id {sid} was not asked of the registry")
            raise RecordError(SCHEMA_ID, f"schema id {sid} is not in the schema registry "
                                         f"{self.url}")
        assert value is not None
        try:
            return decoder(value)
        except RecordError:
            raise
        except Exception as exc:  # the payload does not decode with its schema
            raise RecordError(DECODE, f"{self.kind} payload does not decode with schema id "
                                      f"{sid}: {_describe(exc)}"[:DETAIL_MAX]) from None

    # --- the schemas ------------------------------------------------------------

    def _fetch(self, sid: int) -> None:
        """Ask the registry for a schema, and parse it (with the schemas it references,
        from the registry too): decoding then needs no request."""
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            # A Protobuf schema as its descriptor (base64), not as .proto text.
            schema = self.client.get_schema(sid, fmt="serialized" if self.kind == "PROTOBUF"
                                            else None)
            decoder = self._decoder(sid, schema)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                self.unknown[sid] = time.monotonic()
                return
            raise RegistryUnavailable(f"schema registry {self.url}: {exc}") from None
        except Exception as exc:
            if not _transport(exc):  # a schema that does not parse: its records are refused
                decoder = _refuse(f"schema id {sid} cannot be used: {_describe(exc)}")
            else:  # no answer: connection refused, a timeout, TLS, ...
                raise RegistryUnavailable(f"schema registry {self.url} unreachable: "
                                          f"{_describe(exc)}") from None
        self.unknown.pop(sid, None)
        self.decoders[sid] = decoder

    def _decoder(self, sid: int, schema: Any) -> Decoder:
        kind = schema.schema_type or "AVRO"  # the registry leaves Avro's type out
        if kind != self.kind:
            return _refuse(f"schema id {sid} is a {kind} schema; --value-format is "
                           f"{self.format}")
        if kind == "JSON":
            return _json_payload
        if kind == "AVRO":
            if self._avro is None:
                from confluent_kafka.schema_registry.avro import AvroDeserializer

                self._avro = AvroDeserializer(self.client)
            deserialize = self._avro
            deserialize._get_parsed_schema(schema)  # now, not at the first record
            return lambda value: orjson.dumps(deserialize(value, None), default=_plain)
        return _protobuf_decoder(self.client, schema)


def _transport(exc: BaseException) -> bool:
    """An error of the way to the registry (the HTTP client's, a socket's, TLS's), not
    of what it answered."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in (
        "httpx", "httpx2", "httpcore", "httpcore2", "ssl")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:DETAIL_MAX]


def _refuse(detail: str) -> Decoder:
    def refuse(_value: bytes) -> bytes:
        raise RecordError(DECODE, detail)

    return refuse


def _json_payload(value: bytes) -> bytes:
    return value[HEADER:]


def _plain(value: Any) -> Any:
    """What orjson cannot write itself, in JSON's types: bytes as base64 (as Kafka
    Connect's JsonConverter and the proto3 JSON mapping write them), a decimal as its
    exact digits in a string. orjson itself writes datetimes, dates and times in ISO
    8601 and UUIDs as strings."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} has no JSON form")


def _protobuf_decoder(client: Any, schema: Any) -> Decoder:
    """The decoder of one Protobuf schema: a ``ProtobufDeserializer`` for each message
    of its file that records name (by their message indexes), each given that
    message's class, built from the registry's descriptor."""
    from confluent_kafka.schema_registry import dual_schema_id_deserializer
    from confluent_kafka.schema_registry._sync.protobuf import _resolve_named_schema
    from confluent_kafka.schema_registry.common.protobuf import (
        _init_pool,
        _str_to_proto,
    )
    from confluent_kafka.schema_registry.common.serde import SchemaId
    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer
    from google.protobuf import json_format
    from google.protobuf.descriptor_pool import DescriptorPool
    from google.protobuf.message_factory import GetMessageClass

    pool = DescriptorPool()
    _init_pool(pool)
    _resolve_named_schema(schema, client, pool)  # the schemas it imports, from the registry
    proto = _str_to_proto("default", schema.schema_str)
    pool.Add(proto)
    file = pool.FindFileByName(proto.name)
    by_path: dict[tuple[int, ...], Callable[[bytes, None], Any]] = {}

    def deserializer(path: tuple[int, ...]) -> Callable[[bytes, None], Any]:
        if path not in by_path:
            desc = file.message_types_by_name[list(file.message_types_by_name)[path[0]]]
            for index in path[1:]:
                desc = desc.nested_types[index]
            by_path[path] = ProtobufDeserializer(GetMessageClass(desc), {}, client)
        return by_path[path]

    def decode(value: bytes) -> bytes:
        framing = SchemaId("PROTOBUF")
        dual_schema_id_deserializer(value, None, framing)
        message = deserializer(tuple(framing.message_indexes or [0]))(value, None)
        return orjson.dumps(json_format.MessageToDict(
            message, preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True, unquote_int64_if_possible=True))

    return decode
