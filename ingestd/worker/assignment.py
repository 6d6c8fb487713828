"""How a worker gets its partitions: group membership, or a static share.

``group``: the worker subscribes with static membership (``group.instance.id``
is ``<instance-id>-<slot>``, set in :mod:`ingestd.kafka`) and an incremental
protocol (KIP-848's ``consumer`` protocol, or the classic one with the
cooperative-sticky assignor), so a restarted worker gets its partitions back
without moving anyone else's. librdkafka commits the offsets stored for
revoked partitions as part of the revoke.

``static``: every worker computes the same map of partitions to slots from the
topic metadata and ``assign()``s its own share; commits still go to the group.
The metadata is re-read periodically, so partitions added to a topic are
picked up without a restart.
"""

from __future__ import annotations

import time
import zlib
from typing import Protocol

from confluent_kafka import Consumer, KafkaException, TopicPartition

from ingestd import logs
from ingestd.config import Config, parse_partitions

log = logs.get("assignment")
METADATA_REFRESH = 30.0


def static_share(partitions: dict[str, int], allowed: frozenset[int] | None, slot: int,
                 workers: int) -> list[tuple[str, int]]:
    """This slot's share of the host's partitions, topic by topic.

    Within a topic the k-th allowed partition goes to slot ``(k + offset) % workers``,
    the offset coming from the topic's name so that single-partition topics do not
    all land on slot 0. A partition added to one topic moves nothing: neither that
    topic's existing partitions nor any other topic's.
    """
    share = []
    for topic, count in sorted(partitions.items()):
        offset = zlib.crc32(topic.encode())
        mine = [p for p in range(count) if allowed is None or p in allowed]
        share += [(topic, p) for k, p in enumerate(mine) if (k + offset) % workers == slot]
    return share


def names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


class Listener(Protocol):
    """What the worker does when partitions come and go; called on the consumer's thread,
    inside ``consume()``. None of these may wait for anything that needs the consumer."""

    def assigned(self, partitions: list[TopicPartition]) -> None: ...

    def revoking(self, partitions: list[TopicPartition]) -> None: ...

    def lost(self, partitions: list[TopicPartition]) -> None: ...


class Assignment:
    """Owns the consumer's subscription or static assignment."""

    def __init__(self, consumer: Consumer, config: Config, slot: int,
                 listener: Listener) -> None:
        self.consumer = consumer
        self.config = config
        self.slot = slot
        self.listener = listener
        self.static = config.assignment == "static"
        self.allowed = parse_partitions(config.partitions)
        self.owned: set[tuple[str, int]] = set()
        self.revision = 0  # counts the times partitions were taken away
        self.joined = False
        self._next_refresh = 0.0

    def start(self) -> None:
        if self.static:
            self.refresh()
        else:
            self.consumer.subscribe(list(self.config.topic), on_assign=self._on_assign,
                                    on_revoke=self._on_revoke, on_lost=self._on_lost)

    def refresh(self) -> None:
        """Static mode: take up partitions the topics gained since the last look."""
        if not self.static or time.monotonic() < self._next_refresh:
            return
        self._next_refresh = time.monotonic() + METADATA_REFRESH
        counts: dict[str, int] = {}
        for topic in self.config.topic:
            try:
                meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
            except KafkaException as exc:
                log.warning("metadata for %s unavailable: %s", topic, exc.args[0].str())
                return
            if meta is None or meta.error is not None:
                log.warning("topic %s not found; retrying in %.0fs", topic, METADATA_REFRESH)
                return
            counts[topic] = len(meta.partitions)
        share = set(static_share(counts, self.allowed, self.slot, self.config.workers))
        new = sorted(share - self.owned)
        self.joined = True
        if new:
            tps = [TopicPartition(t, p) for t, p in new]
            self.consumer.incremental_assign(tps)
            self.owned |= set(new)
            log.info("assigned %s", names(tps))
            self.listener.assigned(tps)

    def leave(self, timeout: float) -> None:
        """Leave the group now, so that the partitions move at once.

        A static member sends no LeaveGroup when it closes; it does when it
        unsubscribes. The revoke is served by consuming; what that returns is
        neither dispatched nor stored, so its new owner consumes it again.
        """
        if self.static:
            return
        self.consumer.unsubscribe()
        deadline = time.monotonic() + timeout
        while self.consumer.assignment() and time.monotonic() < deadline:
            self.consumer.consume(1000, 0.1)

    def rejoin(self, timeout: float) -> None:
        """Leave the group and subscribe again: the rebalance that follows hands out
        partitions that a member killed in the middle of a rebalance left without an owner
        (classic protocol with static members: its successor takes back the assignment it
        had been given, and no second round runs)."""
        if self.static:
            return
        log.info("rejoining the group to have every partition assigned")
        self.leave(timeout)
        self.start()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Assigned here rather than by confluent-kafka after the callback, so that the
        listener can pause the new partitions before any of their records is fetched."""
        log.info("assigned %s", names(partitions))
        consumer.incremental_assign(partitions)
        self.owned |= {(tp.topic, tp.partition) for tp in partitions}
        self.joined = True
        self.listener.assigned(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", names(partitions))
        self.listener.revoking(partitions)
        self.owned -= {(tp.topic, tp.partition) for tp in partitions}
        self.revision += 1

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Lost, not revoked: another member may own them already, so store nothing."""
        log.warning("lost %s", names(partitions))
        self.owned -= {(tp.topic, tp.partition) for tp in partitions}
        self.revision += 1
        self.listener.lost(partitions)
