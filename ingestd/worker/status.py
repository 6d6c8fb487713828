"""What a worker tells the supervisor through its heartbeat: ``ready``, or why not.

The supervisor shows the line on ``/readyz`` and in ``ingestd status``. A problem
(the Celery broker unreachable, the dead-letter topic refusing letters, a record
too large to fetch) comes first, then what a wait waits for, then a worker not yet
given partitions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

from ingestd import logs
from ingestd.dlq import DeadLetterError
from ingestd.errors import DispatchError
from ingestd.heartbeat import READY

log = logs.get("worker")
# librdkafka's error for a fetch response over receive.message.max.bytes; the status it
# gives stands until the error has not come again for this long.
TOO_LARGE_TO_FETCH = "Invalid response size"
FETCH_ERROR_KEPT = 30.0
LIMIT = 300  # characters of a problem shown


class Status:
    """The worker's problems, and the line they make; ``beat`` sends it on."""

    def __init__(self, beat: Callable[[str], None], metrics: ModuleType) -> None:
        self.beat = beat
        self.metrics = metrics
        self.broker_log = logs.RateLimited(logs.get("broker"), burst=1)
        self.registry_log = logs.RateLimited(logs.get("registry"), burst=1)
        self.broker_error = ""  # the Celery broker is unreachable: why
        self.dlq_error = ""  # the dead-letter topic refuses letters: why
        self.registry_error = ""  # the schema registry does not answer: why
        self.fetch_error, self.fetch_error_at = "", 0.0  # a record too large to fetch
        self.line = ""
        self.unreachable = {name: metrics.broker_unreachable.labels(name)
                            for name in ("celery", "kafka", "schema_registry")}
        for gauge in self.unreachable.values():
            gauge.set(0)

    def update(self, waiting: str, joined: bool) -> None:
        """The line for what the worker waits for (``waiting``) and whether it has its
        partitions, sent with the heartbeat."""
        if self.fetch_error and time.monotonic() - self.fetch_error_at > FETCH_ERROR_KEPT:
            self.fetch_error = ""
            self.metrics.fetch_too_large.set(0)
        problem = self.broker_error or self.dlq_error or self.registry_error or self.fetch_error
        if problem:
            self.line = problem
        elif waiting:
            self.line = waiting
        elif not joined:
            self.line = "waiting for partition assignment"
        else:
            self.line = READY
        self.beat(self.line)

    def refused(self, exc: DispatchError | None) -> None:
        """A batch was refused (by the Celery broker or the dead-letter topic), or accepted
        (None: both took it)."""
        if exc is None or isinstance(exc, DeadLetterError):
            self.dlq(exc)
        if not isinstance(exc, DeadLetterError):
            self.broker(exc)

    def broker(self, exc: DispatchError | None) -> None:
        error = f"celery broker unreachable: {exc}"[:LIMIT] if exc else ""
        if error == self.broker_error:
            return
        if exc is None:
            log.info("celery broker reachable again")
        else:
            self.broker_log.warning("%s", exc)
        self.broker_error = error
        self.unreachable["celery"].set(1 if exc else 0)

    def registry(self, error: str) -> None:
        """The schema registry did not answer (why, and the retry), or did ("")."""
        if error and not self.registry_error:
            self.unreachable["schema_registry"].set(1)
        elif self.registry_error and not error:
            log.info("schema registry reachable again")
            self.unreachable["schema_registry"].set(0)
        if error:
            self.registry_log.warning("%s", error)
        self.registry_error = error[:LIMIT]

    def kafka(self, reachable: bool) -> None:
        """librdkafka's statistics show a connection to a Kafka broker up, or none."""
        self.unreachable["kafka"].set(0 if reachable else 1)

    def dlq(self, exc: DeadLetterError | None) -> None:
        error = str(exc)[:LIMIT] if exc else ""
        if error == self.dlq_error:
            return
        if exc is None:
            log.info("dead-letter topic accepts letters again")
        self.dlq_error = error
        self.metrics.dlq_refused.set(1 if exc else 0)

    def fetch_too_large(self, error: str) -> None:
        """No fetch from a broker can succeed: a record is larger than the consumer
        takes, and librdkafka retries forever. Say so, and what to raise."""
        self.fetch_error = ("a record too large to fetch stops consuming from a broker: "
                            "raise -X receive.message.max.bytes (and -X fetch.max.bytes "
                            f"below it): {error}")[:LIMIT]
        self.fetch_error_at = time.monotonic()
        self.metrics.fetch_too_large.set(1)
