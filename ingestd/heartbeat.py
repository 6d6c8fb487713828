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


class Heartbeat:
    """Created by the supervisor before fork; the worker beats, the supervisor reads."""

    def __init__(self, directory: str | None = None) -> None:
        fd, path = tempfile.mkstemp(prefix="ingestd-beat-", dir=directory)
        os.unlink(path)
        self.fd = fd
        self._last = 0.0
        self._status = ""
        self.beat(STARTING)

    def beat(self, status: str) -> None:
        now = time.monotonic()
        if status != self._status:
            data = status.encode()[:512]
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))
            self._status = status
        elif now - self._last < BEAT_INTERVAL:
            return
        os.utime(self.fd, (now, now))
        self._last = now

    def age(self) -> float:
        """Seconds since the last beat, on the monotonic clock."""
        return time.monotonic() - os.fstat(self.fd).st_mtime

    def status(self) -> str:
        return os.pread(self.fd, 512, 0).decode(errors="replace")

    def close(self) -> None:
        os.close(self.fd)
