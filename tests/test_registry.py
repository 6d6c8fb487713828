"""``--value-format registry-*``: records in Confluent's Schema Registry wire format,
written by confluent-kafka's serializers, become the JSON the README's rule gives; bad
records become ``decode`` or ``schema_id`` dead letters with their own bytes; a registry
that does not answer is an outage, not a dead letter. Against confluent-kafka's
``mock://`` registry at the seam, and end to end against the stack's Apicurio Registry
with a stock ``celery worker``."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from celery.utils.saferepr import saferepr
from confluent_kafka import Message
from confluent_kafka.schema_registry import SchemaRegistryClient

from ingestd import dlq, registry
from ingestd.celery import reference_tasks
from ingestd.config import Config, describe, load
from ingestd.errors import RecordError
from ingestd.registry import Registry, RegistryUnavailable
from tests import registry_formats as formats
from tests import stack
from tests.conftest import Certs
from tests.test_poison import headers_of

KINDS = ("avro", "json", "protobuf")


def message(value: bytes | None, topic: str = "t") -> Message:
    return Message(topic=topic, partition=0, offset=0, value=value)


def mock_registry(kind: str) -> tuple[Registry, Callable[[int, str], bytes]]:
    """A Registry and a serializer sharing one of confluent-kafka's mock registries."""
    client = SchemaRegistryClient.new_client({"url": f"mock://{uuid.uuid4().hex}"})
    config = Config(value_format=f"registry-{kind}", schema_registry_url="mock://x")
    return Registry(config, client), formats.serializer(kind, client)


def decoded(reg: Registry, value: bytes) -> Any:
    reg.resolve([message(value)])
    return orjson.loads(reg.decode(value))


# --- at the seam: confluent-kafka's mock:// registry ----------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_becomes_the_json_the_rule_gives(kind: str) -> None:
    reg, serialize = mock_registry(kind)
    for i in (0, 1, 3, 255):
        assert decoded(reg, serialize(i, "t")) == formats.expected(kind, i)


def test_a_json_schema_payload_is_passed_on_byte_for_byte() -> None:
    """Integers beyond 64 bits and the writer's spacing survive: the payload is the JSON."""
    reg, serialize = mock_registry("json")
    framed = serialize(1, "t")
    payload = b'{"name": "n", "value": 123456789012345678901234567890, "x": [1, 2]}'
    value = framed[:registry.HEADER] + payload
    reg.resolve([message(value)])
    assert reg.decode(value) == payload


@pytest.mark.parametrize("kind", KINDS)
def test_an_unknown_schema_id_is_a_schema_id_dead_letter_asked_again_later(
        kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reg, serialize = mock_registry(kind)
    value = serialize(1, "t")
    unknown = value[:1] + (2**31 - 1).to_bytes(4, "big") + value[registry.HEADER:]
    asked: list[int] = []
    get_schema = reg.client.get_schema
    monkeypatch.setattr(reg.client, "get_schema",
                        lambda sid, **kw: (asked.append(sid), get_schema(sid, **kw))[1])
    now = [100.0]
    monkeypatch.setattr(registry.time, "monotonic", lambda: now[0])
    reg.resolve([message(unknown), message(unknown)])
    with pytest.raises(RecordError) as err:
        reg.decode(unknown)
    assert (err.value.reason, err.value.detail) == (
        "schema_id", "schema id 2147483647 is not in the schema registry mock://x")
    now[0] += registry.UNKNOWN_KEPT - 1
    reg.resolve([message(unknown)])
    assert asked == [2**31 - 1]  # the 404 is kept a while, not asked for every record
    now[0] += 1
    reg.resolve([message(unknown)])
    assert asked == [2**31 - 1] * 2


def test_an_id_never_asked_of_the_registry_is_never_called_unknown() -> None:
    """Only an id the registry said it does not know is ``schema_id``: one that decode()
    meets unasked (a batch a stop abandoned) is no claim about the registry."""
    reg, serialize = mock_registry("avro")
    with pytest.raises(RecordError) as err:
        reg.decode(serialize(1, "t"))
    assert err.value.reason == "internal"


@pytest.mark.parametrize(("value", "detail"), [
    (b'{"plain": "json"}', "not in the Schema Registry wire format"),
    (b"\x00\x00\x00", "not in the Schema Registry wire format"),
    (b"", "empty value"),
    (None, "null value (tombstone)")])
def test_a_value_not_framed_is_a_decode_dead_letter(value: bytes | None, detail: str) -> None:
    reg, _ = mock_registry("avro")
    reg.resolve([message(value)])
    with pytest.raises(RecordError) as err:
        reg.decode(value)
    assert err.value.reason == "decode" and err.value.detail.startswith(detail)


@pytest.mark.parametrize("kind", ["avro", "protobuf"])
def test_a_payload_its_schema_cannot_decode_is_a_decode_dead_letter(kind: str) -> None:
    reg, serialize = mock_registry(kind)
    value = serialize(1, "t")
    corrupt = value[:registry.HEADER + 1] + b"\xff\xff\xff\xff"
    reg.resolve([message(corrupt)])
    with pytest.raises(RecordError) as err:
        reg.decode(corrupt)
    assert err.value.reason == "decode"
    assert f"payload does not decode with schema id {registry.schema_id(value)}" in \
        err.value.detail


def test_a_schema_of_another_kind_is_a_decode_dead_letter() -> None:
    client = SchemaRegistryClient.new_client({"url": f"mock://{uuid.uuid4().hex}"})
    value = formats.serializer("avro", client)(1, "t")
    reg = Registry(Config(value_format="registry-protobuf", schema_registry_url="mock://x"),
                   client)
    reg.resolve([message(value)])
    with pytest.raises(RecordError) as err:
        reg.decode(value)
    assert (err.value.reason, err.value.detail) == (
        "decode", "schema id 1 is a AVRO schema; --value-format is registry-protobuf")


def test_a_registry_that_does_not_answer_is_an_outage_not_a_dead_letter() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connection refused
    config = Config(value_format="registry-avro",
                    schema_registry_url=f"http://u:pw@127.0.0.1:{port}")
    reg = Registry(config)
    value = b"\x00\x00\x00\x00\x07payload"
    with pytest.raises(RegistryUnavailable) as err:
        reg.resolve([message(value)])
    assert f"schema registry http://u:***@127.0.0.1:{port} unreachable" in str(err.value)
    assert "pw" not in str(err.value)
    assert reg.decoders == {} and reg.unknown == {}


def test_the_client_gets_the_url_without_its_credentials_and_the_tls_files(
        tmp_path: Any) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    loaded = load(["--value-format", "registry-avro", "--schema-registry-url",
                   "https://ingestd:s%40cret@registry.example:8443/apis/ccompat/v7",
                   "--schema-registry-tls-ca", str(ca)], environ={})
    conf = registry.client_config(loaded.config)
    assert conf["url"] == "https://registry.example:8443/apis/ccompat/v7"
    assert conf["basic.auth.user.info"] == "ingestd:s@cret"
    assert conf["ssl.ca.location"] == str(ca) and conf["max.retries"] == 0
    assert "s%40cret" not in "\n".join(describe(loaded))


# --- end to end: Apicurio Registry, Kafka, a stock celery worker -----------------------


@pytest.mark.registry
@pytest.mark.parametrize(("kind", "group_type"),
                         [*((kind, "classic") for kind in KINDS), ("avro", "share")])
def test_records_of_each_format_run_on_a_stock_celery_worker(
        topic_factory: Callable[..., str], broker_url: str, redis_db: int, kind: str,
        group_type: str) -> None:
    """confluent-kafka's serializer writes records (registering its schema); ingestd
    sends each as the JSON the rule gives, with the argsrepr send_task would write; the
    bad ones are dead letters with their own bytes; a stock celery worker runs the rest.
    A share group's workers decode the same way."""
    topic = topic_factory(partitions=2)
    topic_factory(partitions=1, name=f"{topic}.dlq")
    serialize = formats.serializer(kind, SchemaRegistryClient({"url": stack.REGISTRY_URL}))
    n = 100
    values = [serialize(i, topic) for i in range(n)]
    bad = {values[0][:1] + (2**31 - 1).to_bytes(4, "big") + values[0][5:]: "schema_id",
           b'{"name": "plain json"}': "decode"}
    stack.produce(topic, [*values, *bad], partition=0)
    args = stack.ingestd_args(topic, stack.group(), broker_url, "--value-format",
                              f"registry-{kind}", "--schema-registry-url", stack.REGISTRY_URL,
                              "--group-type", group_type)
    check = subprocess.run([sys.executable, "-m", "ingestd", "--check", *args],
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"schema registry {stack.REGISTRY_URL}: reachable" in check.stdout
    with stack.Ingestd(*args) as ingestd:
        letters = stack.consume_all(f"{topic}.dlq", len(bad), timeout=60)
        assert stack.wait_until(lambda: len(stack.queued_tasks(broker_url)) == n, 60), \
            ingestd.output()[-3000:]
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    assert {m.value(): headers_of(m)[dlq.ERROR] for m in letters} == bad
    tasks = {t["id"]: t for t in stack.queued_tasks(broker_url)}
    for i in range(n):
        task = tasks[f"{topic}-0-{i}"]
        assert task["args"] == [formats.expected(kind, i)]
        assert task["argsrepr"] == saferepr(task["args"], 1024)  # as send_task writes it
    results_url = stack.redis_url(redis_db)
    with stack.celery_worker(broker_url, env={"INGESTD_RESULTS_URL": results_url}):
        results = redis.Redis.from_url(results_url)
        assert stack.wait_until(lambda: results.hlen(reference_tasks.SCORES_KEY) >= n, 60)
    assert {k.decode() for k in results.hkeys(reference_tasks.SCORES_KEY)} == set(tasks)


# --- TLS: a real listener with a certificate from the tests' own CA ----------------------

PASSWORD = "registry-s3cret"


class TlsFront:
    """A TLS listener in front of the stack's registry, with ``cert`` (asking clients
    for a certificate from ``clients_ca``, if given): it forwards each GET and keeps the
    Authorization header of each request that reached it."""

    def __init__(self, cert: Path, clients_ca: Path | None = None) -> None:
        import ssl
        import threading
        import urllib.error
        import urllib.request
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.auth: list[str | None] = []
        front = self

        class Forward(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                front.auth.append(self.headers.get("Authorization"))
                base = stack.REGISTRY_URL.split("/apis/")[0]
                try:
                    with urllib.request.urlopen(base + self.path, timeout=10) as answer:
                        status, body = answer.status, answer.read()
                except urllib.error.HTTPError as exc:
                    status, body = exc.code, exc.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert))
        if clients_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(str(clients_ca))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, password: str = PASSWORD) -> str:
        return f"https://ingestd:{password}@127.0.0.1:{self.port}/apis/ccompat/v7"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tls_front() -> Iterator[Callable[..., TlsFront]]:
    fronts: list[TlsFront] = []

    def start(cert: Path, clients_ca: Path | None = None) -> TlsFront:
        fronts.append(TlsFront(cert, clients_ca))
        return fronts[-1]

    yield start
    for front in fronts:
        front.close()


def registry_check(topic: str, url: str, *tls: str) -> subprocess.CompletedProcess[str]:
    args = stack.ingestd_args(topic, stack.group(), stack.redis_url(0), "--dlq-topic", "",
                              "--value-format", "registry-avro", "--schema-registry-url",
                              url, *tls)
    return subprocess.run([sys.executable, "-m", "ingestd", "--check", *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=stack.REPO)


def registry_line(result: subprocess.CompletedProcess[str]) -> str:
    assert PASSWORD not in result.stdout + result.stderr
    (line,) = [x for x in result.stdout.splitlines()
               if x.startswith(("schema registry", "problem: schema registry"))]
    return line


@pytest.mark.registry
@pytest.mark.parametrize("case", ["untrusted", "no CA given", "wrong host"])
def test_a_registry_not_verified_gets_no_password(
        topic_factory: Callable[..., str], certs: Certs,
        tls_front: Callable[..., TlsFront], case: str) -> None:
    """The handshake fails before a byte of HTTP: the password never leaves."""
    cert = {"untrusted": certs.untrusted, "no CA given": certs.server,
            "wrong host": certs.wrong_host}[case]
    front = tls_front(cert)
    ca = () if case == "no CA given" else ("--schema-registry-tls-ca", str(certs.ca))
    result = registry_check(topic_factory(), front.url(), *ca)
    assert result.returncode == 1, result.stdout
    line = registry_line(result)
    assert line.startswith("problem: schema registry https://ingestd:***@127.0.0.1"), line
    assert "CERTIFICATE_VERIFY_FAILED" in line or "certificate verify failed" in line, line
    assert front.auth == []


@pytest.mark.registry
def test_a_verified_registry_gets_the_credentials_and_serves_the_workers(
        topic_factory: Callable[..., str], broker_url: str, certs: Certs,
        tls_front: Callable[..., TlsFront]) -> None:
    """With its CA given: --check reaches it with the URL's credentials as basic auth,
    and the workers get their schemas through it (a client certificate too, where the
    registry asks for one)."""
    import base64

    front = tls_front(certs.server, clients_ca=certs.ca)
    topic = topic_factory()
    tls = ("--schema-registry-tls-ca", str(certs.ca))
    without_cert = registry_check(topic, front.url(), *tls)
    assert without_cert.returncode == 1 and front.auth == []
    tls += ("--schema-registry-tls-cert", str(certs.client))
    result = registry_check(topic, front.url(), *tls)
    assert result.returncode == 0, result.stdout + result.stderr
    assert registry_line(result).startswith("schema registry https://ingestd:***@127.0.0.1")
    assert front.auth == ["Basic " + base64.b64encode(f"ingestd:{PASSWORD}".encode()).decode()]
    serialize = formats.serializer("avro", SchemaRegistryClient({"url": stack.REGISTRY_URL}))
    n = 20
    stack.produce(topic, [serialize(i, topic) for i in range(n)])
    args = stack.ingestd_args(topic, stack.group(), broker_url, "--dlq-topic", "",
                              "--value-format", "registry-avro", "--schema-registry-url",
                              front.url(), *tls)
    with stack.Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: len(stack.queued_tasks(broker_url)) == n, 60), \
            ingestd.output()[-3000:]
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    assert PASSWORD not in ingestd.output()
    assert {t["id"]: t["args"] for t in stack.queued_tasks(broker_url)} == \
        {f"{topic}-0-{i}": [formats.expected("avro", i)] for i in range(n)}
