"""Why a worker's partitions are paused, and the waits that serve Kafka meanwhile.

Every wait (a slow broker, a refused batch, a commit) pauses the assigned
partitions and keeps serving the consumer: group membership, rebalances and
librdkafka's callbacks go on, the heartbeat too. So do the other reasons a worker
holds back: backpressure from the Celery queue, and the host's ``--max-rate``.
The partitions are paused while any reason holds.

A stop gives the waits a deadline: past it, a wait ends and the batch it waited
for is abandoned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

from confluent_kafka import Consumer

from ingestd import logs
from ingestd.ratelimit import RateLimit
from ingestd.worker.feed import Feed

log = logs.get("worker")
SLICE = 0.02  # a long wait serves Kafka and checks what it waits for this often


class Pauses:
    """The pause reasons and the waits; ``tick`` runs once a slice of a wait (a fatal
    Kafka error raised from it, the status beaten)."""

    def __init__(self, consumer: Consumer, feed: Feed, tick: Callable[[], None],
                 rate_limit: RateLimit | None, metrics: ModuleType) -> None:
        self.consumer = consumer
        self.feed = feed
        self.tick = tick
        self.rate_limit = rate_limit  # --max-rate's bucket; None without a limit
        self.metrics = metrics
        self.reasons: set[str] = set()
        self.waiting = ""  # what a wait waits for, shown on /readyz
        self.stop_at = float("inf")  # a stop's deadline for every wait
        self.abandoned = False  # a wait ran past it: publish and store nothing more
        self.rate_until = 0.0  # the bucket's debt is paid by then

    def __bool__(self) -> bool:
        return bool(self.reasons)

    def set(self, why: str, on: bool) -> None:
        """Pause the assigned partitions while any reason (broker, backpressure, a slow
        publish or commit, the rate limit) holds."""
        before = bool(self.reasons)
        if on:
            self.reasons.add(why)
        else:
            self.reasons.discard(why)
        log.debug("%s %s: partitions paused by %s", "pause" if on else "unpause", why,
                  sorted(self.reasons) or "nothing")
        if before != bool(self.reasons):
            tps = self.consumer.assignment()
            if self.reasons:
                self.consumer.pause(tps)
            else:
                self.consumer.resume(tps)

    def wait(self, done: Callable[[], bool], seconds: float, why: str, status: str) -> bool:
        """Serve Kafka with every partition paused until ``done()`` or ``seconds`` pass.
        Records that come all the same (fetched before the pause took effect) are
        carried into the next batch. ``status`` says what the wait is for ("" keeps
        what the status says already). False when a stop leaves no more time: the
        caller's batch is abandoned."""
        self.set(why, True)
        self.waiting = status
        deadline = time.monotonic() + seconds
        try:
            while not done() and (left := deadline - time.monotonic()) > 0:
                if time.monotonic() > self.stop_at:
                    self.abandoned = True
                    return False
                self.tick()
                self.feed.keep(self.consumer.consume(self.feed.batch_size, min(left, SLICE)))
            return True
        finally:
            self.waiting = ""
            self.set(why, False)

    # --- --max-rate, and the Celery queue's depth ----------------------------------

    def take_rate(self, signals: int) -> None:
        """--max-rate: take a batch's signals from the host's bucket. The batch goes out
        all the same; if that took the bucket into debt, the partitions pause until it is
        out of it (:meth:`check_rate`)."""
        if self.rate_limit is not None:
            self._rate(self.rate_limit.take(signals))

    def check_rate(self) -> None:
        """Once per loop: pause while the host is over --max-rate (other workers may have
        taken the bucket into debt), resume once it is not."""
        if self.rate_limit is None or time.monotonic() < self.rate_until:
            return
        self._rate(self.rate_limit.debt())

    def _rate(self, wait: float) -> None:
        """Paused for ``wait`` seconds (the bucket's debt) when it is > 0, else resumed."""
        paused = "rate" in self.reasons
        if wait > 0:
            self.rate_until = time.monotonic() + wait
            if not paused:
                self.set("rate", True)
                self.metrics.rate_limited.set(1)
        elif paused:
            self.set("rate", False)
            self.metrics.rate_limited.set(0)

    def backpressure(self, on: bool) -> None:
        """--max-queue-depth: the Celery queue is over it (on) or back under 80%."""
        self.set("backpressure", on)
        self.metrics.backpressure_paused.set(1 if on else 0)
