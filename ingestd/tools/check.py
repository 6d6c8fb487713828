"""``ingestd --check``: print the effective configuration and reach every dependency."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
)

from ingestd import config as cfg
from ingestd import kafka, rdkafka, registry, version
from ingestd.celery import dispatch
from ingestd.celery import tls as brokertls
from ingestd.errors import ExitCode, IngestdError
from ingestd.supervisor.supervisor import INSECURE

TIMEOUT = 10.0
AUTO_CREATE = "auto.create.topics.enable"


def run_check(loaded: cfg.Loaded) -> int:
    config = loaded.config
    print("effective configuration:")
    for line in cfg.describe(loaded):
        print("  " + line)
    for line in version.lines():
        print(line)
    if brokertls.insecure(config):
        print(f"warning: {INSECURE}")
    problems: list[str] = []
    problems += check_kafka(config)
    problems += check_broker(config)
    if config.value_format != "json":
        problems += check_registry(config)
    for p in problems:
        print(f"problem: {cfg.redact(p)}")
    print("check: ok" if not problems else f"check: {len(problems)} problem(s)")
    return ExitCode.OK if not problems else ExitCode.RUNTIME


def check_kafka(config: cfg.Config) -> list[str]:
    props = kafka.client_config(config, "admin")
    props["logger"] = logging.getLogger("librdkafka")  # not librdkafka's own stderr lines
    admin = AdminClient(props)
    try:
        meta = admin.list_topics(timeout=TIMEOUT)
    except KafkaException as exc:
        return [f"kafka {config.bootstrap_servers}: unreachable ({exc.args[0].str()})"]
    print(f"kafka {config.bootstrap_servers}: reachable, {len(meta.topics)} topics")
    problems = []
    for name in config.topic:
        topic = meta.topics.get(name)
        if topic is None or topic.error is not None:
            problems.append(f"source topic {name!r} does not exist")
        else:
            print(f"  source topic {name}: {len(topic.partitions)} partitions")
    dlq = config.dead_letter_topic
    if not dlq:
        print("  dead-letter topic: disabled")
    elif dlq in meta.topics:
        print(f"  dead-letter topic {dlq}: exists")
    else:
        problems += _missing_dead_letter_topic(admin, dlq, min(meta.brokers, default=None))
    print(f"  record headers: read {rdkafka.HEADERS_READ_BY}")
    return problems


def _missing_dead_letter_topic(admin: AdminClient, dlq: str, broker: int | None) -> list[str]:
    """ingestd does not create the dead-letter topic: the broker does, on the first letter,
    where its ``auto.create.topics.enable`` says so. Where it does not, the workers would
    pause on the first invalid record until someone creates the topic."""
    if broker is None:
        return [f"dead-letter topic {dlq!r} is missing, and no broker answered"]
    resource = ConfigResource(ConfigResource.Type.BROKER, str(broker))
    try:
        entries = admin.describe_configs([resource])[resource].result(timeout=TIMEOUT)
        creates = entries[AUTO_CREATE].value == "true"
    except (KafkaException, KeyError) as exc:
        why = exc.args[0].str() if isinstance(exc, KafkaException) else f"no {AUTO_CREATE}"
        print(f"  dead-letter topic {dlq}: missing; whether broker {broker} creates it on the "
              f"first letter is unknown ({why})")
        return []
    if not creates:
        return [f"dead-letter topic {dlq!r} is missing, and broker {broker} does not create "
                f"topics ({AUTO_CREATE}=false): create it, or the workers pause on the first "
                "invalid record until it exists"]
    future = admin.create_topics([NewTopic(dlq, 1)], validate_only=True)[dlq]
    try:
        future.result(timeout=TIMEOUT)
    except KafkaException as exc:
        return [f"dead-letter topic {dlq!r} is missing and cannot be created: "
                f"{exc.args[0].str()}"]
    print(f"  dead-letter topic {dlq}: missing; broker {broker} creates it on the first letter")
    return []


def check_broker(config: cfg.Config) -> list[str]:
    """Reach the Celery broker, declare every route's queue as ``send_task`` would, and
    show what each holds."""
    broker = f"celery broker {cfg.redact_url(config.broker_url)}"
    try:
        dispatcher = dispatch.create(config)
        depths = dispatcher.queue_depths()
        # INFO only when asked for: a Redis ACL user may be allowed no more than lists.
        replicas = (dispatcher.replicas() if config.broker_min_replicas
                    and isinstance(dispatcher, dispatch.RedisDispatcher) else 0)
        dispatcher.close()
    except IngestdError as exc:
        return [f"{broker}: {exc}"]
    except Exception as exc:
        return [f"{broker}: unreachable ({exc})"]
    for queue, depth in depths.items():  # one line a queue, as without routes
        print(f"{broker}: reachable, queue {queue} holds {depth} messages")
    if config.broker_min_replicas:
        if replicas < config.broker_min_replicas:
            return [f"{broker}: the master has {replicas} replicas connected; with "
                    f"--broker-min-replicas {config.broker_min_replicas} every batch would "
                    "wait for more"]
        print(f"  the master has {replicas} replicas connected (--broker-min-replicas "
              f"{config.broker_min_replicas})")
    for topic, route in config.routes.items():
        print(f"  route {topic} -> task {route.task} on queue {route.queue}")
    return []


def check_registry(config: cfg.Config) -> list[str]:
    """Reach the schema registry, with the credentials and TLS files the workers use."""
    url = cfg.redact_url(config.schema_registry_url)
    try:
        subjects = registry.new_client(config).get_subjects()
    except Exception as exc:
        return [f"schema registry {url}: unreachable or refused ({type(exc).__name__}: "
                f"{cfg.redact(str(exc))})"]
    print(f"schema registry {url}: reachable, {len(subjects)} subjects; values are "
          f"{config.value_format}")
    return []
