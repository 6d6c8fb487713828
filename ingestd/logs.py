"""Logging: text for people or JSON lines for machines, and a rate limiter."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from ingestd.config import redact

_context: dict[str, Any] = {"role": "supervisor", "slot": None}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        who = _context["role"] if _context["slot"] is None else f"worker-{_context['slot']}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        event = getattr(record, "event", record.name)
        text = f"{ts}Z {record.levelname:<7} {who} {event}: {redact(record.getMessage())}"
        if record.exc_info:
            text += "\n" + redact(self.formatException(record.exc_info))
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "role": _context["role"],
            "slot": _context["slot"],
            "event": getattr(record, "event", record.name),
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(doc).decode()


def configure(fmt: str, level: str, role: str = "supervisor", slot: int | None = None) -> None:
    _context.update(role=role, slot=slot)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("kombu", "celery", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get(event: str) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose records carry ``event`` as their event name."""
    return logging.LoggerAdapter(logging.getLogger(f"ingestd.{event}"), {"event": event})


class RateLimited:
    """At most ``burst`` messages per ``interval`` seconds, then one line saying how many
    were suppressed."""

    def __init__(self, log: logging.LoggerAdapter[logging.Logger], interval: float = 10.0,
                 burst: int = 5) -> None:
        self.log = log
        self.interval = interval
        self.burst = burst
        self.window = 0.0
        self.sent = 0
        self.suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.window >= self.interval:
            if self.suppressed:
                self.log.warning("%d similar messages suppressed in the last %.0fs",
                                 self.suppressed, now - self.window)
            self.window, self.sent, self.suppressed = now, 0, 0
        if self.sent < self.burst:
            self.sent += 1
            self.log.warning(msg, *args)
        else:
            self.suppressed += 1
