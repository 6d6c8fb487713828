"""Worker heartbeats: an unlinked temp file per worker, beaten from the work loop.

The worker sets the file's mtime to its monotonic clock (as gunicorn does), so
the supervisor sees a stuck loop, not just a dead process. The file's content
is the worker's last status line (``assigned``, ``broker unreachable: ...``).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time

BEAT_INTERVAL = 0.5
READY = "ready"  # the status of a worker that consumes and reaches its broker
STARTING = "starting"
# Sent by the supervisor when a successor will join with the worker's static
# member id (HUP): drain, but stay in the group, so that no rebalance happens.
# TERM and INT drain and leave the group.
REPLACE = signal.SIGUSR1
# Sent by the supervisor when partitions stay without an owner (classic protocol):
# leave the group and join again, so that a rebalance hands them out.
REJOIN = signal.SIGUSR2


class ChildFile:
    """An unlinked temp file the supervisor creates before fork: the child writes it, the
    supervisor reads it, and no other process can open it."""

    def __init__(self, prefix: str) -> None:
        fd, path = tempfile.mkstemp(prefix=prefix)
        os.unlink(path)
        self.fd = fd

    def write(self, data: bytes) -> None:
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def read(self) -> bytes:
        return os.pread(self.fd, os.fstat(self.fd).st_size, 0)

    def close(self) -> None:
        os.close(self.fd)


class Heartbeat(ChildFile):
    """Created by the supervisor before fork; the worker beats, the supervisor reads."""

    def __init__(self) -> None:
        super().__init__("ingestd-beat-")
        self._last = 0.0
        self._status = ""
        self.beat(STARTING)

    def beat(self, status: str) -> None:
        now = time.monotonic()
        if status != self._status:
            self.write(status.encode()[:512])
            self._status = status
        elif now - self._last < BEAT_INTERVAL:
            return
        os.utime(self.fd, (now, now))
        self._last = now

    def age(self) -> float:
        """Seconds since the last beat, on the monotonic clock."""
        return time.monotonic() - os.fstat(self.fd).st_mtime

    def status(self) -> str:
        return self.read().decode(errors="replace")
