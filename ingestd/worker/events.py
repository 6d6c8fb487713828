"""librdkafka's news for a worker: errors, statistics and refused commits.

librdkafka calls these inside ``consume()``, on the worker's own thread: they only
note and count. A fatal error (a fenced static member, an instance id still in use)
is kept, and :meth:`KafkaEvents.check` raises it from the loop or from whatever the
worker waits for, within a second.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import orjson
from confluent_kafka import KafkaError

from ingestd import logs
from ingestd.errors import KafkaFatalError
from ingestd.worker.pipeline import Partition
from ingestd.worker.status import TOO_LARGE_TO_FETCH, Status


class KafkaEvents:
    """The callbacks: ``error_cb``, ``stats_cb``, the commit failures Offsets reports, and
    the errors consumed as records. ``owned`` gives the partitions the worker owns."""

    def __init__(self, status: Status, metrics: ModuleType,
                 owned: Callable[[], set[Partition]]) -> None:
        self.status = status
        self.metrics = metrics
        self.owned = owned
        self.log = logs.RateLimited(logs.get("kafka"))
        self.fatal: KafkaError | None = None
        self.requests: dict[str, int] = {}  # librdkafka's totals at its last report

    def check(self) -> None:
        """Raise a fatal error librdkafka reported: the worker exits, and a fresh one
        rejoins."""
        if self.fatal is not None:
            raise KafkaFatalError(f"fatal Kafka error: {self.fatal.str()}; exiting so that "
                                  "a fresh worker rejoins")

    def on_error(self, err: KafkaError) -> None:
        if _fatal(err):
            self.fatal = err
            return
        self.log.warning("%s (librdkafka retries)", err.str())
        if err.code() == KafkaError._BAD_MSG and TOO_LARGE_TO_FETCH in err.str():
            self.status.fetch_too_large(err.str())

    def on_record_error(self, err: KafkaError) -> None:
        if _fatal(err):
            self.fatal = err
        elif err.code() != KafkaError._PARTITION_EOF:
            self.log.warning("%s", err.str())

    def commit_failed(self, err: KafkaError) -> None:
        if _fatal(err):
            self.fatal = err
        self.metrics.commit_failures.inc()
        self.log.warning("offsets not stored or committed: %s", err.str())

    def on_stats(self, stats_json: str) -> None:
        """The lag of every owned partition, the requests sent since the last report, and
        whether any connection to a Kafka broker is up."""
        stats: dict[str, Any] = orjson.loads(stats_json)
        self._count_requests(stats)
        self.status.kafka(any(broker.get("state") == "UP"
                              for broker in stats.get("brokers", {}).values()))
        gauge, owned = self.metrics.consumer_lag, self.owned()
        for topic, tdata in stats.get("topics", {}).items():
            for pid, pdata in tdata.get("partitions", {}).items():
                lag = pdata.get("consumer_lag", -1)
                # Owned only: a report made while a partition was being revoked would
                # otherwise set the lag of a partition this worker no longer has.
                if (pid != "-1" and lag >= 0 and pdata.get("fetch_state") == "active"
                        and (topic, int(pid)) in owned):
                    gauge.labels(topic, pid).set(lag)


    def _count_requests(self, stats: dict[str, Any]) -> None:
        totals: dict[str, int] = {}
        for broker in stats.get("brokers", {}).values():
            for request, n in broker.get("req", {}).items():
                if n:
                    totals[request] = totals.get(request, 0) + n
        counter = self.metrics.kafka_requests
        for request, n in totals.items():
            if n > self.requests.get(request, 0):
                counter.labels(request).inc(n - self.requests.get(request, 0))
        self.requests = totals


def _fatal(err: KafkaError) -> bool:
    """librdkafka reports a fatal error (fencing, an instance id still in use) to the
    error callback and as a consumed error with the code _FATAL, where ``fatal()`` is
    False."""
    return bool(err.fatal()) or err.code() == KafkaError._FATAL
