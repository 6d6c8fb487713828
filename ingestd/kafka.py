"""librdkafka settings and small helpers around confluent-kafka.

Every client ingestd makes (the workers' consumers, the dead-letter producers, the
ownership watcher's and ``--check``'s admin clients, ``replay``'s consumer and producer)
gets its settings from :func:`client_config`: the bootstrap servers and every ``-X``
property that librdkafka applies to a client of that kind. So a cluster's security
settings (TLS, SASL, OAUTHBEARER, whatever librdkafka names them) reach them all.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from ingestd.config import Config, redact_values
from ingestd.errors import ConfigError
from ingestd.ratelimit import batch_size

# librdkafka's scopes of a property that apply to each kind of client.
SCOPES = {"consumer": ("*", "C"), "producer": ("*", "P"), "admin": ("*",)}


GROUP_PROTOCOLS: dict[str, dict[str, Any]] = {
    # The broker assigns partitions and reconciles each member on its own: no
    # group-wide rounds, so a member killed while it gives partitions up does not
    # leave them without an owner. The session timeout is the broker's.
    "consumer": {"group.protocol": "consumer"},
    "classic": {
        "group.protocol": "classic",
        # A restarted worker gets its own partitions back without moving others'.
        "partition.assignment.strategy": "cooperative-sticky",
        # A static member (group.instance.id) never sends LeaveGroup, not even on
        # a clean close: the group waits this long before it hands a stopped
        # worker's partitions to another host. 10 s is ample for a worker restart
        # (about 2 s) and a quarter of librdkafka's 45 s default.
        "session.timeout.ms": 10000,
        # The session runs from the last answered heartbeat: at librdkafka's 3 s, a
        # group coordinator's failover had as little as 7 s of those 10, and one under
        # load (the dead node the KRaft controller too) took 9. A heartbeat a second
        # leaves it 9 s.
        "heartbeat.interval.ms": 1000,
    },
}


def _member_config(config: Config, slot: int) -> dict[str, Any]:
    """What a worker's consumer of either group type is given."""
    return {
        "bootstrap.servers": config.bootstrap_servers,
        "group.id": config.group_id,
        # A fetch returns as soon as there is data, or after 100 ms, so an
        # idle topic costs few round trips and a busy one waits for nothing.
        "fetch.min.bytes": 1,
        "fetch.wait.max.ms": 100,
        # Consumer lag for the metrics comes from librdkafka's statistics.
        "statistics.interval.ms": 5000,
        "client.id": f"ingestd-{config.instance_id}-{slot}",
    }


def consumer_config(config: Config, slot: int) -> dict[str, Any]:
    """The consumer's settings: throughput defaults, then every ``-X`` override."""
    props: dict[str, Any] = {
        **_member_config(config, slot),
        # At-least-once: librdkafka commits in the background, but only offsets
        # the worker stored after the broker accepted the records.
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "auto.commit.interval.ms": 1000,
        # A new group starts at the beginning: skipping records would lose them.
        "auto.offset.reset": config.offset_reset,
        # Bounded prefetch: memory stays flat however large the lag is. The
        # limit is per consumer (librdkafka's default is 64 MiB). The default
        # queued.min.messages (100,000 per partition) stays: lowering it to
        # 20,000 starved the fetcher and cut throughput fourfold here.
        "queued.max.messages.kbytes": 32768,
    }
    if config.assignment == "group":
        props["group.instance.id"] = f"{config.instance_id}-{slot}"
        props.update(GROUP_PROTOCOLS[config.group_protocol])
    props.update(client_config(config, "consumer"))
    return props


def share_consumer_config(config: Config, slot: int) -> dict[str, Any]:
    """The share consumer's settings (--group-type share). The group, not the client,
    holds a share group's session, its record locks, its delivery limit and where it
    starts: librdkafka refuses the classic consumer's settings for them."""
    props: dict[str, Any] = {
        **_member_config(config, slot),
        # Each record is accepted only once the Celery broker has its task.
        "share.acknowledgement.mode": "explicit",
        # A hint: a poll may return more (whole record batches). --max-rate caps it as it
        # caps a batch.
        "max.poll.records": batch_size(config.batch_size, config.max_rate),
    }
    props.update(client_config(config, "consumer"))
    return props


def producer_config(config: Config) -> dict[str, Any]:
    """The dead-letter producer: durable, idempotent, sharing the consumer's security."""
    return {"acks": "all", "enable.idempotence": True, "linger.ms": 5,
            **client_config(config, "producer")}


def client_config(config: Config, kind: str) -> dict[str, Any]:
    """The bootstrap servers and every ``-X`` property that librdkafka applies to a
    ``kind`` of client (``consumer``, ``producer``, ``admin``): not a fetch setting for
    a producer, say, which librdkafka would log and ignore. One it does not know is
    given to every client, for librdkafka to refuse."""
    from ingestd.rdkafka import properties

    known, scopes = properties(), SCOPES[kind]
    props: dict[str, Any] = {"bootstrap.servers": config.bootstrap_servers}
    props.update({k: v for k, v in config.kafka_properties.items()
                  if k not in known or known[k].scope in scopes})
    return props


def check_properties(props: dict[str, Any], share: bool = False) -> None:
    """Reject unknown or malformed consumer properties at start, with librdkafka's own
    message (``share``: those a share consumer refuses, too)."""
    from confluent_kafka import Consumer, ShareConsumer

    kind = ShareConsumer if share else Consumer
    try:
        client = kind({**props,
                       "bootstrap.servers": props.get("bootstrap.servers", "localhost"),
                       "logger": logging.getLogger("librdkafka")})
    except (KafkaException, ValueError, TypeError) as exc:
        msg = exc.args[0].str() if exc.args and isinstance(exc.args[0], KafkaError) else str(exc)
        raise ConfigError(f"kafka-property: {redact_values(msg, props)}") from None
    client.close()
