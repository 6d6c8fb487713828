"""Watching the Celery queue: backpressure above ``--max-queue-depth``, and broker health.

The watcher asks the queue's depth (with routes: every route's queue, in all;
LLEN for Redis, a passive declare for
AMQP) at most every BACKPRESSURE_CHECK_INTERVAL while backpressure is on, or
every BROKER_PROBE_INTERVAL when nothing was published lately, so a broker
that went away while the topic was idle still shows on /readyz; and at least
every DEPTH_INTERVAL, for ``ingestd_celery_queue_depth{queue}``. Between two
asks it adds what the worker published to the last answer, so a fast worker
does not overshoot by a whole interval's worth. It has a connection of its
own: the batch in flight uses the worker's on another thread. It asks on the
worker's own thread, so its broker calls are bounded by :data:`PROBE_TIMEOUT`,
well inside the heartbeat.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

from ingestd import logs
from ingestd.celery import dispatch
from ingestd.config import Config
from ingestd.errors import DispatchError

log = logs.get("backpressure")
BACKPRESSURE_CHECK_INTERVAL = 0.25
BROKER_PROBE_INTERVAL = 2.0
DEPTH_INTERVAL = 5.0
RESUME_BELOW = 0.8
PROBE_TIMEOUT = 2.0


class QueueWatch:
    def __init__(self, config: Config, pause: Callable[[bool], None],
                 broker: Callable[[DispatchError | None], None], metrics: ModuleType) -> None:
        self.limit = config.max_queue_depth
        queues = list(dict.fromkeys(r.queue for r in config.routes.values()))
        self.queues = ("queue " if len(queues) == 1 else "queues ") + ", ".join(queues)
        self.probe = dispatch.create(config, PROBE_TIMEOUT)
        self.pause = pause  # pause(True) / pause(False)
        self.broker = broker  # broker(error) / broker(None) when reachable
        self.paused = False
        self.depth = 0  # the last answer plus what was handed over since
        self.unsent = 0  # handed over, not yet accepted: not in the broker's answer
        self._next_check = 0.0
        self._last_contact = time.monotonic()
        self._next_depth = 0.0  # the next probe, whatever else happens
        self._gauge = metrics.celery_queue_depth

    def handed_over(self, n: int) -> None:
        """``n`` tasks go in flight: count them now, before the broker does."""
        self.depth += n
        self.unsent += n

    def accepted(self, n: int) -> None:
        self.unsent -= n
        self._last_contact = time.monotonic()

    def check(self) -> None:
        now = time.monotonic()
        due = now >= self._next_check and (
            self.limit or now - self._last_contact >= BROKER_PROBE_INTERVAL)
        if due or now >= self._next_depth:
            self._next_check = now + (BACKPRESSURE_CHECK_INTERVAL if self.limit
                                      else BROKER_PROBE_INTERVAL)
            self._next_depth = now + DEPTH_INTERVAL
            try:
                # unsent first: a batch accepted while the broker answers is then
                # counted twice (pausing a little early), never missed (pausing late).
                unsent = self.unsent
                depths = self.probe.queue_depths()
            except DispatchError as exc:
                self.broker(exc)
                return
            self.depth = sum(depths.values()) + unsent
            for queue, depth in depths.items():
                self._gauge.labels(queue).set(depth)
            self._last_contact = now
            self.broker(None)
        if not self.limit:
            return
        if self.depth > self.limit and not self.paused:
            log.info("%s hold %d > %d tasks: pausing", self.queues, self.depth, self.limit)
            self.paused = True
            self.pause(True)
        elif self.depth < RESUME_BELOW * self.limit and self.paused:
            log.info("%s hold %d tasks: resuming", self.queues, self.depth)
            self.paused = False
            self.pause(False)

    def close(self) -> None:
        self.probe.close()
