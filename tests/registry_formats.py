"""Records in Confluent's Schema Registry wire format, written by confluent-kafka's own
serializers, as a producer of a Kafka shop writes them; and the JSON each must become
(``ingestd.registry``'s rule). Shared by ``tests/test_registry.py``, the fault
scenario and the benchmark."""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka.serialization import MessageField, SerializationContext

AVRO_SCHEMA = """{
  "type": "record", "name": "Signal", "namespace": "ingestd.test",
  "fields": [
    {"name": "name", "type": "string"},
    {"name": "value", "type": "double"},
    {"name": "source", "type": "string"},
    {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "tags", "type": {"type": "map", "values": "string"}},
    {"name": "raw", "type": "bytes"},
    {"name": "price", "type": {"type": "bytes", "logicalType": "decimal",
                               "precision": 12, "scale": 3}},
    {"name": "day", "type": {"type": "int", "logicalType": "date"}},
    {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "level", "type": {"type": "enum", "name": "Level",
                               "symbols": ["LOW", "HIGH"]}},
    {"name": "note", "type": ["null", "string"], "default": null},
    {"name": "samples", "type": {"type": "array", "items": "long"}}
  ]
}"""

JSON_SCHEMA = """{
  "$schema": "http://json-schema.org/draft-07/schema#",
  "title": "Signal", "type": "object",
  "properties": {"name": {"type": "string"}, "value": {"type": "number"},
                 "source": {"type": "string"}, "timestamp": {"type": "number"}},
  "required": ["name", "value", "source", "timestamp"]
}"""


def avro_record(i: int) -> dict[str, Any]:
    return {"name": "cpu.load", "value": i * 0.25, "source": f"host-{i % 7}",
            "timestamp": datetime.datetime(2026, 12, 7, 9, 0, tzinfo=datetime.UTC)
            + datetime.timedelta(milliseconds=i),
            "tags": {"dc": "eu1"}, "raw": bytes([i % 256, 255]),
            "price": decimal.Decimal(f"{i}.125"), "day": datetime.date(2026, 12, 7),
            "id": uuid.UUID(int=i), "level": "HIGH" if i % 2 else "LOW",
            "note": None if i % 3 else f"n{i}", "samples": [i, -i, 2**40]}


def avro_json(i: int) -> dict[str, Any]:
    """What the task gets for ``avro_record(i)``."""
    import base64

    ts = datetime.datetime(2026, 12, 7, 9, 0, tzinfo=datetime.UTC) + \
        datetime.timedelta(milliseconds=i)
    return {"name": "cpu.load", "value": i * 0.25, "source": f"host-{i % 7}",
            "timestamp": ts.isoformat(), "tags": {"dc": "eu1"},
            "raw": base64.b64encode(bytes([i % 256, 255])).decode(),
            "price": f"{i}.125", "day": "2026-12-07", "id": str(uuid.UUID(int=i)),
            "level": "HIGH" if i % 2 else "LOW", "note": None if i % 3 else f"n{i}",
            "samples": [i, -i, 2**40]}


def json_record(i: int) -> dict[str, Any]:
    return {"name": "cpu.load", "value": i * 0.25, "source": f"host-{i % 7}",
            "timestamp": 1732800000 + i}


def protobuf_class() -> Any:
    """A ``Signal`` message class, from a descriptor made here (no protoc needed): name,
    value, source, an int64 timestamp, a google.protobuf.Timestamp, bytes, an enum, a
    nested message and a repeated int64."""
    from google.protobuf import descriptor_pb2, descriptor_pool, timestamp_pb2
    from google.protobuf.message_factory import GetMessageClass

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="ingestd_test_signal.proto", package="ingestd.test", syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"])
    level = proto.enum_type.add(name="Level")
    level.value.add(name="LOW", number=0)
    level.value.add(name="HIGH", number=1)
    where = proto.message_type.add(name="Where")
    where.field.add(name="dc", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    signal = proto.message_type.add(name="Signal")
    for number, (name, kind, label, type_name) in enumerate([
            ("name", f.TYPE_STRING, f.LABEL_OPTIONAL, ""),
            ("value", f.TYPE_DOUBLE, f.LABEL_OPTIONAL, ""),
            ("source", f.TYPE_STRING, f.LABEL_OPTIONAL, ""),
            ("timestamp", f.TYPE_INT64, f.LABEL_OPTIONAL, ""),
            ("at", f.TYPE_MESSAGE, f.LABEL_OPTIONAL, ".google.protobuf.Timestamp"),
            ("raw", f.TYPE_BYTES, f.LABEL_OPTIONAL, ""),
            ("level", f.TYPE_ENUM, f.LABEL_OPTIONAL, ".ingestd.test.Level"),
            ("where", f.TYPE_MESSAGE, f.LABEL_OPTIONAL, ".ingestd.test.Where"),
            ("samples", f.TYPE_INT64, f.LABEL_REPEATED, "")], 1):
        field = signal.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    return GetMessageClass(pool.FindMessageTypeByName("ingestd.test.Signal"))


def protobuf_record(cls: Any, i: int) -> Any:
    message = cls(name="cpu.load", value=i * 0.25, source=f"host-{i % 7}",
                  timestamp=1732800000 + i, raw=bytes([i % 256, 255]), level=i % 2,
                  samples=[i, 2**60 + 1])
    message.at.FromSeconds(1732800000 + i)
    message.where.dc = "eu1"
    return message


def protobuf_json(i: int) -> dict[str, Any]:
    import base64

    at = datetime.datetime.fromtimestamp(1732800000 + i, datetime.UTC)
    return {"name": "cpu.load", "value": i * 0.25, "source": f"host-{i % 7}",
            "timestamp": 1732800000 + i, "at": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "raw": base64.b64encode(bytes([i % 256, 255])).decode(),
            "level": "HIGH" if i % 2 else "LOW", "where": {"dc": "eu1"},
            "samples": [i, str(2**60 + 1)]}


def serializer(kind: str, client: Any, schema: str | None = None) -> Callable[[int, str], bytes]:
    """``(i, topic) -> value``: record i framed by confluent-kafka's serializer of
    ``kind`` (avro, json, protobuf), its schema (Avro's or JSON's: ``schema``, if given)
    registered under ``<topic>-value`` at the first record."""
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer

    if kind == "avro":
        avro = AvroSerializer(client, schema or AVRO_SCHEMA)
        return lambda i, topic: avro(avro_record(i), _ctx(topic))
    if kind == "json":
        js = JSONSerializer(schema or JSON_SCHEMA, client)
        return lambda i, topic: js(json_record(i), _ctx(topic))
    cls = protobuf_class()
    pb = ProtobufSerializer(cls, client, {"use.deprecated.format": False})
    return lambda i, topic: pb(protobuf_record(cls, i), _ctx(topic))


def expected(kind: str, i: int) -> dict[str, Any]:
    return {"avro": avro_json, "json": json_record, "protobuf": protobuf_json}[kind](i)


def _ctx(topic: str) -> SerializationContext:
    return SerializationContext(topic, MessageField.VALUE)


# --- the default signal, in each format: what the benchmark compares with plain JSON ----

SIGNAL_AVRO = """{
  "type": "record", "name": "Signal", "namespace": "ingestd.bench",
  "fields": [{"name": "name", "type": "string"}, {"name": "value", "type": "double"},
             {"name": "source", "type": "string"}, {"name": "timestamp", "type": "double"},
             {"name": "tags", "type": {"type": "map", "values": "string"}}]
}"""


def signal_protobuf_class() -> Any:
    """The signal as a Protobuf message: the same five fields, tags a map."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from google.protobuf.message_factory import GetMessageClass

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="ingestd_bench_signal.proto",
                                               package="ingestd.bench", syntax="proto3")
    signal = proto.message_type.add(name="Signal")
    entry = signal.nested_type.add(name="TagsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    for number, (name, kind) in enumerate([("name", f.TYPE_STRING), ("value", f.TYPE_DOUBLE),
                                           ("source", f.TYPE_STRING),
                                           ("timestamp", f.TYPE_DOUBLE)], 1):
        signal.field.add(name=name, number=number, type=kind, label=f.LABEL_OPTIONAL)
    signal.field.add(name="tags", number=5, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
                     type_name=".ingestd.bench.Signal.TagsEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return GetMessageClass(pool.FindMessageTypeByName("ingestd.bench.Signal"))


def signal_serializer(kind: str, client: Any) -> Callable[[dict[str, Any], str], bytes]:
    """``(signal, topic) -> value``: a signal dict framed in ``kind``'s format."""
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer

    if kind == "avro":
        avro = AvroSerializer(client, SIGNAL_AVRO)
        return lambda signal, topic: avro(signal, _ctx(topic))
    if kind == "json":
        js = JSONSerializer(JSON_SCHEMA, client)
        return lambda signal, topic: js(signal, _ctx(topic))
    cls = signal_protobuf_class()
    pb = ProtobufSerializer(cls, client, {"use.deprecated.format": False})
    return lambda signal, topic: pb(cls(**signal), _ctx(topic))
