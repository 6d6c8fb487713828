"""The host-wide rate limit (``--max-rate``): one token bucket that every worker takes from.

The supervisor creates the bucket before it forks: four numbers (tokens, when
they were last refilled, the rate, the capacity) in an unlinked temp file that
every worker maps shared, replacements included. Each take is a
read-modify-write under a POSIX record lock (``lockf``) on that file; the
kernel releases such a lock when its process dies, so a worker killed inside
one cannot stall the others. Such a lock is the process's, not a thread's: in
the supervisor, whose HTTP thread reads the bucket while its main thread sets a
new rate on HUP, a thread lock comes first. ``time.monotonic`` is the system-wide
``CLOCK_MONOTONIC``: the same clock in every process.

A worker takes one token per signal once it has built a batch, and may take
the bucket into debt: the batch goes out all the same (a batch is never held
back), and the worker pauses its partitions until the bucket is out of debt.
So over any span of time the host dispatches at most the rate times the
span, plus the bucket's capacity (:data:`CAPACITY` seconds of the rate: what
an idle host may send at once) and one batch per worker; a worker caps its
batches at :data:`BATCH` seconds of the rate, which keeps that margin small.
The capacity also keeps what a pause costs (a resumed partition is fetched
again) from lowering the rate: the bucket refills meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

_STATE = struct.Struct("=dddd")  # tokens, last refill (monotonic), rate, capacity
_LEVEL = struct.Struct("=dd")  # tokens, last refill: all a take writes
CAPACITY = 1.0  # seconds of the rate the bucket holds
BATCH = 0.1  # seconds of the rate: a worker's largest batch


def batch_cap(rate: float) -> int:
    """The largest batch a worker consumes under ``rate`` (0: no limit)."""
    return max(1, int(rate * BATCH)) if rate > 0 else 0


def batch_size(size: int, rate: float) -> int:
    """A worker's batch size: ``--batch-size``, capped under ``--max-rate``."""
    return min(size, batch_cap(rate) or size)


class RateLimit:
    """Created by the supervisor before fork; the workers take, the supervisor shows."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        fd, path = tempfile.mkstemp(prefix="ingestd-rate-")
        os.unlink(path)
        os.ftruncate(fd, _STATE.size)
        self.fd = fd
        self.map = mmap.mmap(fd, _STATE.size, mmap.MAP_SHARED)
        self.clock = clock
        self._thread_lock = threading.Lock()
        # A fork while another thread holds it would leave it held in the child for good.
        os.register_at_fork(after_in_child=self._new_thread_lock)
        self.configure(rate)

    def _new_thread_lock(self) -> None:
        self._thread_lock = threading.Lock()

    def configure(self, rate: float) -> None:
        """Set the rate (signals per second; 0: no limit), with a full bucket."""
        capacity = max(1.0, rate * CAPACITY)
        with self._locked():
            _STATE.pack_into(self.map, 0, capacity, self.clock(), float(rate), capacity)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _now(self) -> tuple[float, float, float]:
        """Tokens after the refill up to now, now, and the rate."""
        tokens, last, rate, capacity = _STATE.unpack_from(self.map)
        now = self.clock()
        return min(capacity, tokens + max(0.0, now - last) * rate), now, rate

    @property
    def rate(self) -> float:
        rate: float = _STATE.unpack_from(self.map)[2]
        return rate

    def take(self, n: int) -> float:
        """Take ``n`` signals' worth: the seconds until the bucket is out of debt (0 while
        it is not in debt, and without a limit)."""
        with self._locked():
            tokens, now, rate = self._now()
            if rate <= 0:
                return 0.0
            tokens -= n
            _LEVEL.pack_into(self.map, 0, tokens, now)
        return 0.0 if tokens >= 0 else -tokens / rate

    def debt(self) -> float:
        """The seconds until the bucket is out of debt; 0 when it is not in debt."""
        with self._locked():
            tokens, _, rate = self._now()
        return 0.0 if tokens >= 0 or rate <= 0 else -tokens / rate

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)
