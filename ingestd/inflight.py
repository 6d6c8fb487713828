"""The batch in flight: published, stored and committed on a thread of its own.

The broker's round trip (a multi-value LPUSH, or AMQP confirms) and the offset
commit (about 5 ms on a stock Kafka 4 broker, whose group coordinator lingers
before it appends) both wait on other processes. Done on this thread, they
overlap the next batch's consume, validate and build on the worker's own.
The worker hands over a batch only after the previous one settled, so a crash
still repeats at most the batch in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from ingestd.errors import DispatchError

B = TypeVar("B")


class InFlight(Generic[B]):
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="publish")
        self._pending: tuple[B, Future[None]] | None = None
        self._failed: tuple[B, DispatchError] | None = None

    def submit(self, batch: B, send: Callable[[B], None]) -> None:
        assert self._pending is None and self._failed is None, "settle the previous batch first"
        self._pending = (batch, self._executor.submit(send, batch))

    def wait(self) -> B | None:
        """Wait until the batch in flight is done and return it; keep it instead if the
        broker refused it (see :meth:`take_failed`)."""
        if self._pending is None:
            return None
        batch, future = self._pending
        self._pending = None
        try:
            future.result()
        except DispatchError as exc:
            self._failed = (batch, exc)
            return None
        return batch

    def take_failed(self) -> tuple[B, DispatchError] | None:
        """The batch whose publish failed, for the caller to retry; once."""
        failed, self._failed = self._failed, None
        return failed

    def close(self) -> None:
        self.wait()
        self._executor.shutdown()
