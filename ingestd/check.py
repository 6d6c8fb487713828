"""``ingestd --check``: print the effective configuration and reach every dependency."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ingestd import codec, dispatch, kafka
from ingestd import config as cfg
from ingestd.errors import ExitCode, IngestdError

TIMEOUT = 10.0


def run_check(loaded: cfg.Loaded) -> int:
    config = loaded.config
    print("effective configuration:")
    for line in cfg.describe(loaded):
        print("  " + line)
    print("hot path: " + ("C (ingestd._native)" if codec.native is not None else
                          "Python (ingestd._native was not built: pip found no C compiler)"))
    problems: list[str] = []
    problems += check_kafka(config)
    problems += check_broker(config)
    for p in problems:
        print(f"problem: {cfg.redact(p)}")
    print("check: ok" if not problems else f"check: {len(problems)} problem(s)")
    return ExitCode.OK if not problems else ExitCode.RUNTIME


def check_kafka(config: cfg.Config) -> list[str]:
    props: dict[str, Any] = {k: v for k, v in kafka.producer_config(config).items()
                             if k not in ("acks", "enable.idempotence", "linger.ms")}
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
        future = admin.create_topics([NewTopic(dlq, 1)], validate_only=True)[dlq]
        try:
            future.result(timeout=TIMEOUT)
            print(f"  dead-letter topic {dlq}: missing, can be created")
        except KafkaException as exc:
            problems.append(f"dead-letter topic {dlq!r} is missing and cannot be created: "
                            f"{exc.args[0].str()}")
    return problems


def check_broker(config: cfg.Config) -> list[str]:
    """Reach the Celery broker, declare every route's queue as ``send_task`` would, and
    show what each holds."""
    broker = f"celery broker {cfg.redact_url(config.broker_url)}"
    try:
        dispatcher = dispatch.create(config)
        depths = dispatcher.queue_depths()
        dispatcher.close()
    except IngestdError as exc:
        return [f"{broker}: {exc}"]
    except Exception as exc:
        return [f"{broker}: unreachable ({exc})"]
    for queue, depth in depths.items():  # one line a queue, as without routes
        print(f"{broker}: reachable, queue {queue} holds {depth} messages")
    for topic, route in config.routes.items():
        print(f"  route {topic} -> task {route.task} on queue {route.queue}")
    return []
