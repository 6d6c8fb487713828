"""Offset commits that overlap the next batch's work.

A synchronous commit costs a round trip to the group coordinator (about 5 ms
on a stock Kafka 4 broker, whose coordinator lingers before it appends). The
committer runs it on a thread of its own while the worker consumes, decodes
and encodes the next batch; the worker calls :meth:`Committer.wait` before it
publishes that batch, so a crash can still repeat only the batch in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException


class Committer:
    def __init__(self, consumer: Consumer, on_error: Callable[[KafkaError], None]) -> None:
        self.consumer = consumer
        self.on_error = on_error
        self._cond = threading.Condition()
        self._requested = False
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="committer", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Commit the offsets stored so far, in the background."""
        with self._cond:
            self._requested = True
            self._cond.notify_all()

    def wait(self) -> None:
        """Return once every requested commit has finished."""
        with self._cond:
            self._cond.wait_for(lambda: not self._requested and not self._busy)

    def commit_now(self) -> None:
        """Wait for the background commit, then commit in this thread (revoke, close)."""
        self.wait()
        commit(self.consumer, self.on_error)

    def close(self) -> None:
        self.wait()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._requested or self._closed)
                if self._closed:
                    return
                self._requested, self._busy = False, True
            try:
                commit(self.consumer, self.on_error)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def commit(consumer: Consumer, on_error: Callable[[KafkaError], None]) -> None:
    """Commit the stored offsets synchronously; nothing stored is not an error."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        err: KafkaError = exc.args[0]
        if err.code() != KafkaError._NO_OFFSET:
            on_error(err)
    except RuntimeError:  # the consumer is closed
        pass
