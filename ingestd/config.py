"""Every setting, declared once: type, default, flag, environment variable, TOML key, help.

The argparse parser, ``--help``, ``--check`` output and the README's option
table are generated from :data:`SETTINGS`. Precedence: flag > ``INGESTD_*``
environment > ``--config`` TOML file > the old script's variables > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, NoReturn
from urllib.parse import urlsplit

from ingestd.errors import ConfigError

Parser = Callable[[str], Any]


@dataclass(frozen=True)
class Spec:
    """How one setting is spelled on the command line, in the environment and in TOML."""

    help: str
    parse: Parser = str
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    legacy_env: str | None = None
    repeatable: bool = False
    short: str | None = None
    table: bool = False  # in TOML, a table of KEY = "VALUE" as well as a list of "KEY=VALUE"
    merged: bool = False  # KEY=VALUE items: file, environment and flags merge key by key
    check: Callable[[Any], str | None] | None = None  # returns what was expected, or None
    default_doc: str | None = None


def _positive(v: Any) -> str | None:
    return None if 1 <= v < math.inf else "a whole number >= 1"


def _non_negative(v: Any) -> str | None:
    return None if 0 <= v < math.inf else "a number >= 0"


AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
# A failover list, as kombu spells it: URLs joined by ";". Split only where a URL
# starts, so that a ";" in a password never splits it (nor shows a piece of it).
_NEXT_URL = re.compile(r";\s*(?=[a-z]+://)")


def broker_urls(url: str) -> list[str]:
    """The URLs of a ``--broker-url``: one, or a failover list
    (``amqp://h1//;amqp://h2//``)."""
    return [u.strip() for u in _NEXT_URL.split(url.strip())]


REDIS_SCHEMES = ("redis", "rediss", "sentinel")


def _broker_url(v: str) -> str | None:
    urls = broker_urls(v)
    for url in urls:
        if urlsplit(url).scheme not in (*REDIS_SCHEMES, *AMQP_SCHEMES):
            return "a URL starting with redis://, rediss://, sentinel:// or amqp://"
        try:
            urlsplit(url).port  # noqa: B018  (raises on a bad port)
        except ValueError:
            return "a URL with a numeric port"
    schemes = {urlsplit(u).scheme for u in urls}
    if len(urls) > 1 and not (schemes <= set(AMQP_SCHEMES) or schemes == {"sentinel"}):
        return ("one redis:// URL, or amqp:// URLs joined by ';' (a failover list), or "
                "sentinel:// URLs joined by ';' (Redis Sentinel)")
    return None


VALUE_FORMATS = ("json", "registry-json", "registry-avro", "registry-protobuf")


def _registry_url(v: str) -> str | None:
    parts = urlsplit(v)
    if v and (parts.scheme not in ("http", "https", "mock") or not parts.hostname):
        return "an http://, https:// (or, for tests, mock://) URL of a schema registry"
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        return "a URL with a numeric port"
    return None


def _file_or_empty(v: str) -> str | None:
    return None if not v or os.path.isfile(v) else "a readable file (or empty)"


def _host_port(v: str) -> str | None:
    if v == "":
        return None
    _, sep, port = v.rpartition(":")
    return None if sep and port.isdigit() else "HOST:PORT, or \"\" to disable"


def topic_problem(v: str) -> str | None:
    # Kafka's own rule; task ids embed the name, and codec relies on it needing no escaping.
    return None if re.fullmatch(r"[a-zA-Z0-9._-]{1,249}", v) else "a Kafka topic name " \
        "([a-zA-Z0-9._-], 1 to 249 characters)"


class Route(NamedTuple):
    """Where a topic's records go: the task they are sent as, on which queue."""

    task: str
    queue: str


def parse_route(v: str) -> tuple[str, Route | None]:
    """``TOPIC=TASK[@QUEUE]`` → (topic, route); the queue is "" where none is given. The
    route is None where ``v`` is not of that form."""
    topic, sep, target = (part.strip() for part in v.partition("="))
    task, at, queue = (part.strip() for part in target.partition("@"))
    if not sep or topic_problem(topic) or not task or re.search(r"\s", task) or (
            at and (not queue or re.search(r"\s", queue))):
        return topic, None
    return topic, Route(task, queue)


def _route(v: str) -> str | None:
    return None if parse_route(v)[1] else "TOPIC=TASK or TOPIC=TASK@QUEUE, with a Kafka " \
        "topic name"


def _dlq_topic(v: str | None) -> str | None:
    return None if not v else topic_problem(v)


# Properties ingestd sets itself: its guarantees (at-least-once, the one-batch
# bound, partitions handed over without a stall, dead letters that are never lost
# nor written twice) depend on their values, or an option of its own sets them.
# ``-X`` refuses them; the README shows this table (``protected_table``).
PROTECTED_PROPERTIES: dict[str, str] = {
    "enable.auto.offset.store": "ingestd stores an offset only after the Celery broker "
                                "accepted the record",
    "enable.auto.commit": "ingestd commits stored offsets: in the background, on each "
                          "revoke and at a stop",
    "auto.commit.enable": "an alias of enable.auto.commit",
    "offset.store.method": "offsets are committed to the consumer group",
    "isolation.level": "records of aborted transactions must never reach Celery "
                       "(read_committed)",
    "group.id": "use --group-id: the dead letters and the ownership watcher name it too",
    "group.instance.id": "each worker joins as <--instance-id>-<slot>",
    "group.protocol": "use --group-protocol",
    "partition.assignment.strategy": "ingestd relies on the incremental cooperative-sticky "
                                     "assignor",
    "bootstrap.servers": "use --bootstrap-servers: the dead-letter producer and the "
                         "ownership watcher use it too",
    "metadata.broker.list": "an alias of bootstrap.servers: use --bootstrap-servers",
    "auto.offset.reset": "use --offset-reset: starting at the end skips records, so it is "
                         "an option of its own, which warns",
    "acks": "the dead-letter producer waits for every in-sync replica (all): its offset "
            "is committed only once the letter cannot be lost",
    "request.required.acks": "an alias of acks",
    "enable.idempotence": "the dead-letter producer is idempotent: a retry after a broker "
                          "failure writes no second letter",
}


def _kafka_property(v: str) -> str | None:
    key, sep, _ = v.partition("=")
    key = key.strip()
    if not (sep and key):
        return "key=value"
    if key in PROTECTED_PROPERTIES:
        return f"key=value for any property but {key} ({PROTECTED_PROPERTIES[key]})"
    return None


def protected_table() -> str:
    """The README's table of the properties ``-X`` refuses."""
    rows = ["| property | why ingestd sets it |", "|---|---|"]
    rows += [f"| `{key}` | {why} |" for key, why in PROTECTED_PROPERTIES.items()]
    return "\n".join(rows)


def parse_partitions(spec: str) -> frozenset[int] | None:
    """``"0-5,8"`` → {0, 1, 2, 3, 4, 5, 8}; ``""`` → None (all). Raises ValueError."""
    if not spec.strip():
        return None
    out: set[int] = set()
    for part in spec.split(","):
        low, sep, high = part.strip().partition("-")
        first, last = int(low), int(high) if sep else int(low)
        if first < 0 or last < first:
            raise ValueError(part)
        out.update(range(first, last + 1))
    return frozenset(out)


def _partitions(v: str) -> str | None:
    try:
        parse_partitions(v)
    except ValueError:
        return "a list of partitions and ranges, e.g. 0-5,8"
    return None


def _schema(v: str) -> str | None:
    if v in ("signal", "object") or re.fullmatch(r"[\w.]+:\w+", v):
        return None
    return "signal, object or module:Struct"


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(v)


MIB = 1024 * 1024


def setting(default: Any = None, **spec: Any) -> Any:
    """A dataclass field carrying its :class:`Spec`."""
    meta = {"spec": Spec(**spec)}
    if isinstance(default, list | dict) or callable(default):
        factory = default if callable(default) else (lambda: type(default)(default))
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """The effective configuration; frozen, and all a worker is given besides its slot."""

    workers: int = setting(
        lambda: os.cpu_count() or 1, parse=int, metavar="N", check=_positive,
        default_doc="number of CPUs", help="worker processes")
    topic: tuple[str, ...] = setting(
        ("pulse_signals",), metavar="T", repeatable=True, legacy_env="KAFKA_TOPIC",
        check=topic_problem,
        help="source topic (repeatable; comma-separated in the environment)")
    bootstrap_servers: str = setting(
        "localhost:9092", metavar="HOSTS", legacy_env="KAFKA_BOOTSTRAP", help="Kafka bootstrap")
    group_id: str = setting(
        "pulse_ingest_group", metavar="G", legacy_env="KAFKA_GROUP", help="consumer group")
    assignment: str = setting(
        "group", choices=("group", "static"), help="how partitions are pinned to workers")
    group_protocol: str = setting(
        "classic", choices=("classic", "consumer"),
        help="group mode: classic (cooperative-sticky assignor; a restarted worker takes "
             "its partitions back at once) or consumer (KIP-848, brokers 4.0 and later)")
    group_type: str = setting(
        "classic", choices=("classic", "share"),
        help="group mode: classic (each partition pinned to one worker, in order) or share "
             "(experimental: Kafka 4.2's share groups, KIP-932; every worker takes records "
             "of every partition, so --workers may exceed the partitions; no ordering)")
    offset_reset: str = setting(
        "earliest", choices=("earliest", "latest"),
        help="where a partition without a committed offset, or with one out of range, "
             "starts: earliest (nothing skipped), or latest, which skips the records "
             "already there and warns at start")
    instance_id: str = setting(
        lambda: socket.gethostname(), metavar="ID", default_doc="host name",
        help="static membership id prefix; each worker joins as <instance-id>-<slot>")
    partitions: str = setting(
        "", metavar="LIST", check=_partitions,
        help="static mode: partitions this host owns, e.g. 0-5,8 (all if empty)")
    broker_url: str = setting(
        "redis://localhost:6379/0", metavar="URL", legacy_env="CELERY_BROKER_URL",
        check=_broker_url,
        help="Celery broker (redis://, amqp://; rediss://, amqps:// for TLS, verified); "
             "amqp:// URLs joined by ';' are a failover list, tried in order; "
             "sentinel:// URLs joined by ';' are Redis Sentinels (with --broker-master-name)")
    broker_master_name: str = setting(
        "", metavar="NAME",
        help="with sentinel:// URLs: the name of the Redis master the Sentinels watch "
             "(kombu's master_name transport option)")
    broker_min_replicas: int = setting(
        0, parse=int, metavar="N", check=_non_negative,
        help="Redis: a batch counts as accepted only once N replicas have it (WAIT, "
             "after the LPUSH); 0: once the master has it")
    broker_tls_ca: str = setting(
        "", metavar="FILE", check=_file_or_empty,
        help="CA certificates (PEM) to verify a rediss:// or amqps:// broker with "
             "(default: the system's)")
    broker_tls_cert: str = setting(
        "", metavar="FILE", check=_file_or_empty,
        help="client certificate (PEM) for a broker that asks for one")
    broker_tls_key: str = setting(
        "", metavar="FILE", check=_file_or_empty,
        help="the client certificate's private key (PEM), if not in the certificate's file")
    broker_tls_insecure: bool = setting(
        False, parse=_bool,
        help="do not verify the broker's certificate and host name (tests only: anyone on "
             "the path can read the broker's password; warns at start)")
    task: str = setting("ingest_and_score_signal", metavar="NAME",
                        help="task name, one task per signal")
    queue: str = setting("celery", metavar="Q", help="Celery queue / routing key")
    queue_type: str = setting(
        "classic", choices=("classic", "quorum"),
        help="the type of the queues ingestd declares on an amqp:// broker, as Celery's "
             "task_default_queue_type and task_create_missing_queue_type: quorum for "
             "RabbitMQ's replicated queues (the celery workers must declare the same)")
    route: tuple[str, ...] = setting(
        (), metavar="TOPIC=TASK[@QUEUE]", repeatable=True, table=True, check=_route,
        help="send one topic's records as TASK (in place of --task, or --batch-task in batch "
             "dispatch) on QUEUE (default --queue); repeatable, comma-separated in the "
             "environment, a [route] table in TOML; every TOPIC must be a --topic")
    dispatch: str = setting(
        "each", choices=("each", "batch"),
        help="each: one task per signal; batch: one task per partition slice of a batch")
    batch_task: str = setting("ingest_and_score_signals", metavar="NAME",
                              help="task name in batch dispatch, args [[signal, ...]]")
    with_metadata: bool = setting(
        False, parse=_bool,
        help="give each task the keyword argument kafka: its record's topic, partition, "
             "offset, timestamp, key and headers (in batch dispatch, a list aligned with the "
             "signals)")
    value_format: str = setting(
        "json", choices=VALUE_FORMATS,
        help="the records' values: json, or Confluent's Schema Registry wire format (a "
             "schema id, then JSON Schema, Avro or Protobuf), decoded to JSON with the "
             "schema the registry gives for the id")
    schema_registry_url: str = setting(
        "", metavar="URL", check=_registry_url,
        help="the schema registry's URL for --value-format registry-* (Confluent's REST "
             "API; a user:password@ in it is sent as HTTP basic auth)")
    schema_registry_tls_ca: str = setting(
        "", metavar="FILE", check=_file_or_empty,
        help="CA certificates (PEM) to verify an https:// schema registry with (default: "
             "certifi's)")
    schema_registry_tls_cert: str = setting(
        "", metavar="FILE", check=_file_or_empty,
        help="client certificate (PEM) for a schema registry that asks for one")
    schema_registry_tls_key: str = setting(
        "", metavar="FILE", check=_file_or_empty,
        help="the registry client certificate's private key (PEM), if not in the "
             "certificate's file")
    schema: str = setting(
        "signal", metavar="SCHEMA", check=_schema,
        help="signal, object (any JSON object) or module:Struct (a msgspec Struct)")
    dlq_topic: str | None = setting(
        None, metavar="T", default_doc="<first topic>.dlq", check=_dlq_topic,
        help='dead-letter topic; "" disables (invalid records are counted, logged, skipped)')
    batch_size: int = setting(1000, parse=int, metavar="N", check=_positive,
                              help="records per consume batch")
    batch_timeout_ms: int = setting(
        50, parse=int, metavar="MS", check=_non_negative,
        help="longest a consume waits for a batch's first record (an idle loop wakes this "
             "often)")
    linger_ms: int = setting(
        0, parse=int, metavar="MS", check=_non_negative,
        help="once a batch has its first record, how long to wait for more; 0 takes what "
             "Kafka has fetched already (natural batching: large batches under load, no "
             "record waits for others)")
    max_record_bytes: int = setting(
        1048576, parse=int, metavar="BYTES", check=_positive,
        help="larger records (value, key and headers) are dead-lettered as too_large")
    max_record_items: int = setting(
        10_000, parse=int, metavar="N", check=_positive,
        help="records with more JSON items (containers plus their elements) are "
             "dead-lettered as too_large: memory per record stays bounded")
    max_batch_bytes: int = setting(
        2 * 1024 * 1024, parse=int, metavar="BYTES", check=_positive,
        help="a consume batch ends once its records (values, keys and headers) hold this "
             "many bytes: memory per batch stays bounded whatever the records' size")
    max_task_bytes: int = setting(
        0, parse=int, metavar="BYTES", check=_non_negative,
        help="the largest task message the Celery broker takes; a record whose task is "
             "larger is dead-lettered as too_large (in batch dispatch a task is split "
             "first); 0: the broker's default, 16 MiB for AMQP (RabbitMQ 4's "
             "max_message_size), 512 MiB for Redis (proto-max-bulk-len)")
    max_queue_depth: int = setting(
        0, parse=int, metavar="N", check=_non_negative,
        help="pause consuming while the Celery queue (with routes: their queues in all) holds "
             "more than N (0: off); resume below 80%%")
    max_rate: float = setting(
        0.0, parse=float, metavar="N", check=_non_negative,
        help="most signals a second this host dispatches, all workers together (0: no "
             "limit); over it, workers pause consuming until the host is under it again")
    metrics_addr: str = setting(
        "127.0.0.1:9102", metavar="HOST:PORT", check=_host_port,
        help='HTTP for /metrics, /livez (or /healthz), /readyz; "" disables')
    drain_timeout: float = setting(30.0, parse=float, metavar="SECONDS", check=_non_negative,
                                   help="graceful stop budget")
    worker_timeout: float = setting(
        30.0, parse=float, metavar="SECONDS", check=_positive,
        help="a worker whose loop has not beaten for this long is killed and replaced")
    retry_max_backoff: float = setting(
        30.0, parse=float, metavar="SECONDS", check=_positive,
        help="cap of the exponential backoff while the Celery broker is unreachable")
    kafka_property: tuple[str, ...] = setting(
        (), short="-X", metavar="KEY=VALUE", repeatable=True, check=_kafka_property,
        merged=True,
        help="any librdkafka property (repeatable); the file's, the environment's and the "
             "flags' merge key by key, the later winning")
    log_format: str = setting("text", choices=("text", "json"), help="log format")
    log_level: str = setting(
        "INFO", parse=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level")

    @property
    def dead_letter_topic(self) -> str:
        """The dead-letter topic, or "" when dead-lettering is disabled."""
        return f"{self.topic[0]}.dlq" if self.dlq_topic is None else self.dlq_topic

    @property
    def default_route(self) -> Route:
        """Where a topic without a ``--route`` goes: ``--task`` (``--batch-task`` in batch
        dispatch) on ``--queue``."""
        return Route(self.batch_task if self.dispatch == "batch" else self.task, self.queue)

    @cached_property
    def routes(self) -> dict[str, Route]:
        """Every source topic's route."""
        routes = dict.fromkeys(self.topic, self.default_route)
        for topic, route in map(parse_route, self.route):
            assert route is not None  # checked while loading
            routes[topic] = Route(route.task, route.queue or self.queue)
        return routes

    def route_of(self, topic: str) -> Route:
        """A topic's route; one that is not a source topic (a test's) has the default."""
        return self.routes.get(topic) or self.default_route

    @property
    def kafka_properties(self) -> dict[str, str]:
        return dict(p.split("=", 1) for p in self.kafka_property)

    @property
    def broker_is_redis(self) -> bool:
        return urlsplit(broker_urls(self.broker_url)[0]).scheme in REDIS_SCHEMES

    @property
    def broker_is_sentinel(self) -> bool:
        return urlsplit(broker_urls(self.broker_url)[0]).scheme == "sentinel"

    @property
    def task_limit(self) -> int:
        """``--max-task-bytes``, or the broker's default."""
        return self.max_task_bytes or (512 * MIB if self.broker_is_redis else 16 * MIB)


SETTINGS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(Config)
# Every property librdkafka treats as sensitive (it prints them as [redacted];
# tests/test_config.py walks librdkafka's own list to keep this one in step),
# and the certificate, which an operator may not want in logs either.
SENSITIVE_PROPERTIES = frozenset({
    "sasl.username", "sasl.password", "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret", "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "ssl.key.location", "ssl.key.password", "ssl.key.pem", "ssl.keystore.password",
    "ssl.ca.pem", "ssl.certificate.pem",
})
# And any other key that ends in password, secret or passphrase.
SECRET_KEY = re.compile(r"(password|secret|passphrase)$", re.IGNORECASE)
REDACTED = "***"


def spec_of(f: dataclasses.Field[Any]) -> Spec:
    spec: Spec = f.metadata["spec"]
    return spec


def flag_of(f: dataclasses.Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def env_of(f: dataclasses.Field[Any]) -> str:
    return "INGESTD_" + f.name.upper()


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# --- redaction -------------------------------------------------------------


def redact_url(url: str) -> str:
    """Hide the password of each URL of a failover list; everything between the user's
    ``:`` and the last ``@`` counts as the password, even an unencoded ``/`` that ends a
    URL's netloc."""
    return ";".join(_redact_one(u) for u in broker_urls(url))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not (sep and at and colon):
        return url
    return f"{scheme}://{user}:{REDACTED}@{host}"


def sensitive(key: str) -> bool:
    """Whether a librdkafka property's value must never be shown."""
    key = key.strip()
    return key in SENSITIVE_PROPERTIES or bool(SECRET_KEY.search(key))


def redact_property(prop: str) -> str:
    """A ``KEY=VALUE`` property as it may be shown: the value hidden where the key is
    sensitive, and any URL's password in it anyway."""
    key = prop.partition("=")[0]
    return f"{key}={REDACTED}" if sensitive(key) else redact(prop)


def redact_values(text: str, props: Mapping[str, Any]) -> str:
    """``text`` (say, librdkafka's message about a property) without the value of any
    sensitive property in ``props``."""
    for key, value in props.items():
        if sensitive(key) and isinstance(value, str) and value:
            text = text.replace(value, REDACTED)
    return text


def redact(text: str) -> str:
    """Hide passwords in any URL inside ``text``."""
    return re.sub(r"(\w+://[^/\s:@]*:)[^\s]*@", rf"\g<1>{REDACTED}@", text)


def shown(name: str, value: Any) -> Any:
    """A setting's value as it may appear in logs and ``--check`` output."""
    if name in ("broker_url", "schema_registry_url"):
        return redact_url(value)
    if name == "kafka_property":
        return tuple(redact_property(p) for p in value)
    return value


# --- loading -----------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Exits 2 with one line, no usage block."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


class _Version(argparse.Action):
    """``--version``: the libraries are imported only when it is asked for."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        from ingestd import version

        print("\n".join(version.lines()))
        parser.exit(0)


def build_parser(prog: str = "ingestd", description: str = "Move signals from Kafka into "
                 "Celery.", only: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The daemon's parser; or, for a command that shares the daemon's configuration
    (``ingestd replay``), one with only the settings ``only`` names, and ``--config``.
    Every setting still comes from the environment and the TOML file."""
    p = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                allow_abbrev=False, epilog=None if only is not None else
                "commands: 'ingestd status' shows what a running ingestd does; 'ingestd "
                "replay' sends dead letters back (each with --help)")
    p.add_argument("--config", metavar="FILE", help="TOML file with any of the settings below")
    if only is None:
        p.add_argument("--check", action="store_true",
                       help="validate, reach Kafka and the Celery broker, print the effective "
                            "configuration, exit 0/1")
        p.add_argument("--version", action=_Version, nargs=0,
                       help="print the versions of ingestd and its libraries, and whether the "
                            "C hot path is built, then exit")
    for f in SETTINGS:
        if only is not None and f.name not in only:
            continue
        spec = spec_of(f)
        names = [spec.short, flag_of(f)] if spec.short else [flag_of(f)]
        default = spec.default_doc or default_of(f)
        help_text = f"{spec.help} (env {env_of(f)}; default: {default!r})"
        if isinstance(default_of(f), bool):  # a switch: the flag alone turns it on
            p.add_argument(*names, dest=f.name, action="store_const", const=True,
                           help=help_text)
            continue
        action = p.add_argument(*names, dest=f.name, metavar=spec.metavar,
                                action="append" if spec.repeatable else "store",
                                choices=spec.choices or None, help=help_text)
        if spec.choices:  # argparse checks choices after type: --log-level debug is fine
            action.type = spec.parse
    return p


def _split_list(name: str, raw: str, origin: str) -> list[str]:
    """An environment list: a JSON array of strings, which can hold any text; or
    comma-separated, where a librdkafka property's own value may hold commas
    (``debug=consumer,cgrp``), so those split only before the next ``key=``."""
    if raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name.replace('_', '-')} (from {origin}): not a JSON array: "
                              f"{exc.msg} at character {exc.pos}") from None
        if not isinstance(items, list):
            raise ConfigError(f"{name.replace('_', '-')} (from {origin}): expected a JSON "
                              "array of strings")
        return items
    pattern = r",(?=\s*[^,=\s]+=)" if name == "kafka_property" else ","
    return [item.strip() for item in re.split(pattern, raw) if item.strip()]


def _coerce(f: dataclasses.Field[Any], raw: Any, origin: str, *,
            from_file: bool = False) -> Any:
    """Turn a flag, environment or TOML value into the setting's type, or say why not.

    Text (flags, environment) is parsed; TOML values must already have the type.
    Messages show a value only through :func:`shown`, so secrets stay hidden.
    """
    spec = spec_of(f)
    where = f"{flag_of(f)[2:]} (from {origin})"
    text = not from_file
    if spec.repeatable:
        if isinstance(raw, str) and text:
            raw = _split_list(f.name, raw, origin)
        if spec.table and isinstance(raw, dict) and from_file:
            for key, inner in raw.items():
                if isinstance(inner, dict):  # TOML reads a bare a.b = "x" as a.{b = "x"}
                    raise ConfigError(f"{where}: {key!r} holds a table; quote a key with "
                                      f'dots, as in "{key}.{next(iter(inner), "")}" = ...')
            raw = [f"{key}={value}" if isinstance(value, str) else value
                   for key, value in raw.items()]
        kind = "a list (or a table) of strings" if spec.table else "a list of strings"
        if not isinstance(raw, list | tuple):
            raise ConfigError(f"{where}: expected {kind}, got a {type(raw).__name__}")
        for item in raw:
            if not isinstance(item, str):
                raise ConfigError(f"{where}: expected {kind}, got a {type(item).__name__} "
                                  "in it")
        value: Any = tuple(raw)
        if spec.check:
            for item, item_shown in zip(value, shown(f.name, value), strict=True):
                expected = spec.check(item)
                if expected:
                    raise ConfigError(f"{where}: bad value {item_shown!r}, expected {expected}")
        return value
    want = type(default_of(f)) if default_of(f) is not None else str
    if isinstance(raw, str) and (text or want is str):
        try:
            value = spec.parse(raw)
        except ValueError:
            raise ConfigError(f"{where}: bad value {shown(f.name, raw)!r}, expected "
                              f"{_kinds[want.__name__]}") from None
    else:
        if want is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        if not isinstance(raw, want) or isinstance(raw, bool) is not (want is bool):
            raise ConfigError(f"{where}: bad value {raw!r} (a {type(raw).__name__}), expected "
                              f"{_kinds[want.__name__]}")
        value = raw
    if spec.choices and value not in spec.choices:
        raise ConfigError(
            f"{where}: bad value {value!r}, expected one of {', '.join(spec.choices)}")
    if spec.check:
        expected = spec.check(value)
        if expected:
            raise ConfigError(f"{where}: bad value {shown(f.name, value)!r}, expected {expected}")
    return value


_kinds = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true/false"}


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: TOML syntax error: {exc}") from None
    known = {f.name for f in SETTINGS}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"config: {path}: unknown key {key!r}")
        out[name] = value
    return out


@dataclass(frozen=True)
class Loaded:
    """The effective configuration and where each value came from."""

    config: Config
    sources: Mapping[str, str]
    check: bool = False
    config_file: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # a command's own options


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         parser: argparse.ArgumentParser | None = None) -> Loaded:
    """Parse the command line, environment and TOML file into a :class:`Config`; a
    ``parser`` of a command's own also fills :attr:`Loaded.options` with what it adds."""
    env = os.environ if environ is None else environ
    parser = parser or build_parser()
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    config_file = args.pop("config", None) or env.get("INGESTD_CONFIG") or None
    check = bool(args.pop("check", False))
    file_values = read_toml(config_file) if config_file else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in SETTINGS:
        spec = spec_of(f)
        if spec.merged:
            values[f.name], sources[f.name] = _merged(f, args, env, file_values,
                                                      str(config_file))
        elif f.name in args:
            values[f.name] = _coerce(f, args[f.name], "flag")
            sources[f.name] = "flag"
        elif env_of(f) in env:
            values[f.name] = _coerce(f, env[env_of(f)], env_of(f))
            sources[f.name] = "env"
        elif f.name in file_values:
            values[f.name] = _coerce(f, file_values[f.name], str(config_file), from_file=True)
            sources[f.name] = "file"
        elif spec.legacy_env and spec.legacy_env in env:
            values[f.name] = _coerce(f, env[spec.legacy_env], spec.legacy_env)
            sources[f.name] = f"env {spec.legacy_env}"  # the old script's, on purpose
        else:
            sources[f.name] = "default"
    config = Config(**values)
    if not config.topic:
        raise ConfigError("topic: expected at least one topic")
    _check_routes(config, {"flag": "flag", "env": "INGESTD_ROUTE",
                           "file": str(config_file)}.get(sources["route"], "default"))
    if config.queue_type != "classic" and config.broker_is_redis:
        raise ConfigError(f"queue-type: {config.queue_type} queues are RabbitMQ's; a Redis "
                          "broker has lists, not queue types (use an amqp:// --broker-url)")
    _check_broker(config)
    _check_registry(config)
    _check_group(config)
    names = {f.name for f in SETTINGS}
    options = {k: v for k, v in args.items() if k not in names}
    return Loaded(config, sources, check, config_file, options)


def _check_broker(config: Config) -> None:
    """What the broker settings must agree on."""
    if config.broker_is_sentinel and not config.broker_master_name:
        raise ConfigError("broker-master-name: expected the name of the master the "
                          "Sentinels watch (sentinel:// broker URLs)")
    if config.broker_master_name and not config.broker_is_sentinel:
        raise ConfigError("broker-master-name: only for sentinel:// broker URLs")
    if config.broker_min_replicas and not config.broker_is_redis:
        raise ConfigError("broker-min-replicas: Redis's WAIT; RabbitMQ's quorum queues "
                          "confirm a message once a majority has it (--queue-type quorum)")
    if config.broker_is_sentinel and (config.broker_tls_ca or config.broker_tls_cert
                                      or config.broker_tls_insecure):
        raise ConfigError("broker-tls: not offered with sentinel:// URLs (kombu would take "
                          "TLS to the master but not to the Sentinels)")


def _check_group(config: Config) -> None:
    """A share group (--group-type share) has no pinned partitions and one protocol."""
    if config.group_type != "share":
        return
    if config.assignment != "group":
        raise ConfigError("group-type: share groups hand records, not partitions, to the "
                          "workers; not with --assignment static")
    if config.group_protocol != "classic":
        raise ConfigError("group-protocol: only for --group-type classic (a share group "
                          "has a protocol of its own)")


def _check_registry(config: Config) -> None:
    """The value format and the schema registry's settings agree."""
    registry = config.value_format != "json"
    if registry and not config.schema_registry_url:
        raise ConfigError(f"schema-registry-url: expected the registry's URL for "
                          f"--value-format {config.value_format}")
    tls = (config.schema_registry_tls_ca or config.schema_registry_tls_cert
           or config.schema_registry_tls_key)
    if not registry and (config.schema_registry_url or tls):
        raise ConfigError("schema-registry-url: only for --value-format registry-json, "
                          "registry-avro or registry-protobuf")
    if config.schema_registry_tls_key and not config.schema_registry_tls_cert:
        raise ConfigError("schema-registry-tls-key: the key of a client certificate "
                          "(--schema-registry-tls-cert)")
    if tls and urlsplit(config.schema_registry_url).scheme != "https":
        raise ConfigError("schema-registry-tls: only for an https:// schema registry URL")


def _merged(f: dataclasses.Field[Any], args: Mapping[str, Any], env: Mapping[str, str],
            file_values: Mapping[str, Any], config_file: str) -> tuple[tuple[str, ...], str]:
    """A ``KEY=VALUE`` list from the file, then the environment, then the flags, merged key
    by key: a later one's value for a key replaces an earlier one's, in its place. The
    source names every place that gave one."""
    merged: dict[str, str] = {}
    used = []
    for source, present, raw, origin, from_file in (
            ("file", f.name in file_values, file_values.get(f.name), config_file, True),
            ("env", env_of(f) in env, env.get(env_of(f)), env_of(f), False),
            ("flag", f.name in args, args.get(f.name), "flag", False)):
        if present:
            used.append(source)
            for item in _coerce(f, raw, origin, from_file=from_file):
                key, _, value = item.partition("=")
                merged[key.strip()] = value
    return tuple(f"{k}={v}" for k, v in merged.items()), "+".join(used) or "default"


def _check_routes(config: Config, origin: str) -> None:
    """Every routed topic is a source topic, and routed once."""
    seen: set[str] = set()
    for topic, _ in map(parse_route, config.route):
        if topic not in config.topic:
            raise ConfigError(f"route (from {origin}): topic {topic!r} is not a source topic "
                              f"(--topic {','.join(config.topic)})")
        if topic in seen:
            raise ConfigError(f"route (from {origin}): topic {topic!r} is routed twice")
        seen.add(topic)


def describe(loaded: Loaded) -> list[str]:
    """The effective configuration, one ``name = value  (source)`` line per setting."""
    width = max(len(f.name) for f in SETTINGS)
    return [f"{f.name:<{width}} = {shown(f.name, getattr(loaded.config, f.name))!r}  "
            f"({loaded.sources[f.name]})" for f in SETTINGS]


def summary(config: Config) -> str:
    """One line for the startup log, secrets redacted."""
    return " ".join(f"{f.name}={shown(f.name, getattr(config, f.name))!r}" for f in SETTINGS)


def options_table() -> str:
    """The README's option table, generated from the declarations."""
    rows = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for f in SETTINGS:
        spec = spec_of(f)
        flag = f"`{spec.short} {spec.metavar}`, " if spec.short else ""
        arg = f" {spec.metavar}" if spec.metavar else (
            " " + "\\|".join(spec.choices) if spec.choices else "")
        default = spec.default_doc or f"`{default_of(f)!r}`"
        rows.append(f"| {flag}`{flag_of(f)}{arg}` | `{env_of(f)}` | {default} | "
                    f"{spec.help.replace('%%', '%')} |")
    return "\n".join(rows)


def command_table(parser: argparse.ArgumentParser) -> str:
    """The README's table of a command's own options (``ingestd replay``, ``ingestd
    status``); the daemon's settings it shares are in :func:`options_table`."""
    settings = {flag_of(f) for f in SETTINGS} | {"--config", "--help"}
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        flag = max(action.option_strings, key=len, default="")
        if not flag or flag in settings:
            continue
        arg = f" {action.metavar}" if action.metavar else (
            " " + "\\|".join(action.choices) if action.choices else "")
        default = "" if action.default in (None, False, []) else f"`{action.default}`"
        rows.append(f"| `{flag}{arg}` | {default} | {action.help} |")
    return "\n".join(rows)
