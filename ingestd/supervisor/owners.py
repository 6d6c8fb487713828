"""Partitions without an owner, as the cluster sees the consumer group.

A worker sees only its own partitions, and several hosts may share a group;
a partition that no member owns is consumed by nobody and shows nowhere else.
In group mode the supervisor forks one watcher process besides the workers
(the supervisor itself creates no librdkafka object). Every
:data:`CHECK_INTERVAL` it asks the cluster for the group's members and their
assignments (``describe_consumer_groups``) and for the partitions of the
subscribed topics, and sets ``ingestd_unowned_partitions{topic}``. A partition
may be without an owner for a moment while a rebalance moves it; one that
stays so for :data:`GRACE` is logged, and its heartbeat status, which the
supervisor shows on ``/readyz``, says which.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from ingestd import kafka, logs
from ingestd.config import Config
from ingestd.heartbeat import READY

log = logs.get("owners")
CHECK_INTERVAL = 5.0
GRACE = 15.0
REQUEST_TIMEOUT = 10.0


def unowned(admin: AdminClient, group: str, topics: tuple[str, ...]) -> dict[str, list[int]]:
    """Each subscribed topic's partitions that no member of ``group`` owns."""
    described: Any = admin.describe_consumer_groups(
        [group], request_timeout=REQUEST_TIMEOUT)[group].result(REQUEST_TIMEOUT)
    owned = {(tp.topic, tp.partition) for member in described.members
             if member.assignment is not None for tp in member.assignment.topic_partitions}
    metadata = admin.list_topics(timeout=REQUEST_TIMEOUT)
    out: dict[str, list[int]] = {}
    for topic in topics:
        meta = metadata.topics.get(topic)
        if meta is not None and meta.error is None:
            out[topic] = sorted(p for p in meta.partitions if (topic, p) not in owned)
    return out


class Watcher:
    """The watcher process's loop: ask, count, tell after the grace period."""

    def __init__(self, config: Config, beat: Callable[[str], None]) -> None:
        from ingestd import metrics  # after fork: PROMETHEUS_MULTIPROC_DIR is set by now

        self.config = config
        self.beat = beat
        self.gauge = metrics.unowned_partitions
        self.checked = metrics.owners_checked
        props: dict[str, Any] = {**kafka.client_config(config, "admin"),
                                 "logger": logging.getLogger("librdkafka")}
        self.admin = AdminClient(props)
        self.since: dict[tuple[str, int], float] = {}  # first seen without an owner
        self.told: set[tuple[str, int]] = set()
        self.status = READY
        self.errors = logs.RateLimited(log, burst=1)
        self.stopping = False

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        while not self.stopping:
            self.check()
            deadline = time.monotonic() + CHECK_INTERVAL
            while not self.stopping and time.monotonic() < deadline:
                self.beat(self.status)
                time.sleep(0.2)

    def check(self) -> None:
        try:
            found = unowned(self.admin, self.config.group_id, self.config.topic)
        except KafkaException as exc:
            self.errors.warning("cannot ask the cluster who owns which partition: %s",
                                exc.args[0].str())
            return
        except concurrent.futures.TimeoutError:  # the coordinator's node died, say
            self.errors.warning("cannot ask the cluster who owns which partition: no "
                                "answer within %.0fs", REQUEST_TIMEOUT)
            return
        now = time.monotonic()
        current = {(t, p) for t, parts in found.items() for p in parts}
        for topic, parts in found.items():
            self.gauge.labels(topic).set(len(parts))
        self.checked.set_to_current_time()
        self.since = {key: self.since.get(key, now) for key in current}
        overdue = {key for key, first in self.since.items() if now - first >= GRACE}
        self.status = self._describe(overdue, now) if overdue else READY
        if overdue - self.told:
            log.warning("%s", self.status)
        elif self.told and not overdue:
            log.info("every partition has an owner again")
        self.told = overdue

    def _describe(self, keys: set[tuple[str, int]], now: float) -> str:
        longest = max(now - self.since[key] for key in keys)
        names = ", ".join(f"{t}[{p}]" for t, p in sorted(keys))
        return (f"{len(keys)} partitions of group {self.config.group_id!r} without an owner "
                f"for {longest:.0f}s: {names}")[:400]

    def _stop(self, _signum: int, _frame: Any) -> None:
        self.stopping = True
