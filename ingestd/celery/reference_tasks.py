"""The reference Celery app that ingestd feeds in the demo, tests and benchmarks.

Run it with ``celery -A ingestd.celery.reference_tasks worker``. Each task scores a
signal against a per-source running mean and deviation (Welford) and records
the task id and the score in Redis, so that callers can count what ran:

- ``<prefix>scores``: hash, field = task id (``<id>/<i>`` for batch items), value = score
- ``<prefix>executed``: counter of executed signals, repeats included
- ``<prefix>runs``: hash, field = record id (``<topic>-<partition>-<offset>``: the task id,
  or for batch tasks each id in the ``ingestd_record_ids`` header), value = times executed,
  so that callers can tell which record ran more than once
- ``<prefix>done``: hash, field = record id, value = when it last ran (Unix seconds), for
  the latency from a record's Kafka timestamp to its execution
- ``<prefix>tasks``: hash, field = record id, value = the name of the task that ran it
- ``<prefix>kafka``: hash, field = record id, value = the record's ``kafka`` keyword
  argument as JSON (``--with-metadata``), where the task got one

``archive_signal`` and ``archive_signals`` do the same under other names: a second
task to route a topic to (``--route``).

The broker comes from ``CELERY_BROKER_URL`` (default ``redis://localhost:6379/0``);
the results go to ``INGESTD_RESULTS_URL``, else to the broker when it is Redis.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task

from ingestd.celery.codec import RECORD_IDS

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
RESULTS_PREFIX = os.environ.get("INGESTD_RESULTS_PREFIX", "ingestd:ref:")
SCORES_KEY = RESULTS_PREFIX + "scores"
EXECUTED_KEY = RESULTS_PREFIX + "executed"
RUNS_KEY = RESULTS_PREFIX + "runs"
DONE_KEY = RESULTS_PREFIX + "done"
TASKS_KEY = RESULTS_PREFIX + "tasks"
KAFKA_KEY = RESULTS_PREFIX + "kafka"

app = Celery("ingestd_reference", broker=BROKER_URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def results_url(broker_url: str = BROKER_URL) -> str:
    """Where the tasks record their scores: a Redis URL."""
    explicit = os.environ.get("INGESTD_RESULTS_URL")
    if explicit:
        return explicit
    if broker_url.startswith(("redis://", "rediss://")):
        return broker_url
    return "redis://localhost:6379/0"


@dataclass
class RunningStats:
    """Welford's online mean and variance."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> float:
        """Fold ``x`` in and return its z-score against the stats before it."""
        std = math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0
        z = (x - self.mean) / std if std > 0 else 0.0
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)
        return z


_stats: dict[str, RunningStats] = {}
_redis: redis.Redis | None = None


def _results() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(results_url())
    return _redis


def score(signal: dict[str, Any]) -> float:
    """The z-score of ``signal['value']`` among earlier values of its source."""
    stats = _stats.setdefault(str(signal.get("source", "")), RunningStats())
    return stats.add(float(signal["value"]))


def _record(task: Task, scores: dict[str, float], runs: list[str],
            kafka: list[Any] | None = None) -> None:
    pipe = _results().pipeline(transaction=False)
    pipe.hset(SCORES_KEY, mapping={k: repr(v) for k, v in scores.items()})
    pipe.incrby(EXECUTED_KEY, len(scores))
    for record_id in runs:
        pipe.hincrby(RUNS_KEY, record_id, 1)
    if runs:
        pipe.hset(DONE_KEY, mapping=dict.fromkeys(runs, repr(time.time())))
        pipe.hset(TASKS_KEY, mapping=dict.fromkeys(runs, str(task.name)))
    if kafka:
        pipe.hset(KAFKA_KEY, mapping={r: json.dumps(k) for r, k in zip(runs, kafka,
                                                                       strict=True)})
    pipe.execute()


def _one(self: Task, signal: dict[str, Any], kafka: dict[str, Any] | None = None) -> float:
    z = score(signal)
    _record(self, {str(self.request.id): z}, [str(self.request.id)],
            [kafka] if kafka else None)
    return z


def _many(self: Task, signals: list[dict[str, Any]],
          kafka: list[dict[str, Any]] | None = None) -> list[float]:
    zs = [score(s) for s in signals]
    # Only ingestd sets the header; a plain send_task carries none.
    record_ids = getattr(self.request, RECORD_IDS, None) or []
    _record(self, {f"{self.request.id}/{i}": z for i, z in enumerate(zs)},
            [str(i) for i in record_ids], kafka)
    return zs


ingest_and_score_signal = app.task(name="ingest_and_score_signal", bind=True)(_one)
ingest_and_score_signals = app.task(name="ingest_and_score_signals", bind=True)(_many)
archive_signal = app.task(name="archive_signal", bind=True)(_one)
archive_signals = app.task(name="archive_signals", bind=True)(_many)
