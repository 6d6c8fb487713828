"""The batch in flight: published to the Celery broker on a thread of its own.

The broker's round trip (a multi-value LPUSH, or AMQP confirms) and the
dead-letter deliveries wait on other processes. Done on this thread, they
overlap the next batch's consume, validate and build on the worker's own. A small
batch is published on the worker's own thread instead (:meth:`InFlight.run`):
there is little to overlap, and the hand-off (two thread switches, each waiting
for the GIL) costs more than the round trip.

This thread never touches the Kafka consumer: storing and committing offsets
stay on the worker's thread, which owns the consumer. So a rebalance callback
(run by librdkafka inside ``consume()`` on that thread) may wait for the batch
in flight without waiting for itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

from ingestd.errors import DispatchError

B = TypeVar("B")


class InFlight(Generic[B]):
    """At most one batch at a time, sent by ``send`` on the publish thread."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="publish")
        self._pending: tuple[B, Future[None]] | None = None
        self.since = 0.0  # monotonic time the batch in flight was handed over

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def submit(self, batch: B, send: Callable[[B], None]) -> None:
        assert self._pending is None, "take the previous batch first"
        self.since = time.monotonic()
        self._pending = (batch, self._executor.submit(send, batch))

    def run(self, batch: B, send: Callable[[B], None]) -> None:
        """Publish ``batch`` on the caller's thread: :meth:`take` has its result at once."""
        assert self._pending is None, "take the previous batch first"
        self.since = time.monotonic()
        future: Future[None] = Future()
        try:
            send(batch)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(None)
        self._pending = (batch, future)

    def wait(self, timeout: float) -> bool:
        """True once nothing is in flight or the batch in flight finished."""
        if self._pending is None:
            return True
        try:
            self._pending[1].exception(timeout)
        except FutureTimeout:
            return False
        return True

    def take(self) -> tuple[B, DispatchError | None] | None:
        """The finished batch and how it ended (None: the broker accepted it); None while
        it runs or when nothing is in flight. Any other exception is a bug: raised here."""
        if self._pending is None or not self._pending[1].done():
            return None
        batch, future = self._pending
        self._pending = None
        exc = future.exception()
        if exc is None or isinstance(exc, DispatchError):
            return batch, exc
        raise exc

    def close(self) -> None:
        """Stop the thread; a publish still running is not waited for (its batch was
        not stored, so it is consumed again)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
