"""systemd's notify protocol: READY=1, STATUS=, WATCHDOG=1, STOPPING=1 on $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from ingestd import logs

log = logs.get("systemd")


class Notifier:
    """Does nothing when ``NOTIFY_SOCKET`` is not set (not run by systemd)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the watchdog period, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if watchdog else 0.0
        self._next_watchdog = 0.0
        self._ready = False
        self._status = ""
        self.sock: socket.socket | None = None
        if self.addr:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def send(self, *fields: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.addr)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.addr, exc.strerror)

    def ready(self, status: str) -> None:
        if not self._ready:
            self._ready = True
            self._status = status
            self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        if self.watchdog_interval and time.monotonic() >= self._next_watchdog:
            self._next_watchdog = time.monotonic() + self.watchdog_interval
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining")
