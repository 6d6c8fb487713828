"""Counts survive worker deaths, and dead workers' files do not pile up; the gauges a
dashboard reads are set where they should be."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    from ingestd import metrics

    def total(name, **labels):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry.get_sample_value(name, labels) or 0.0

    for generation in range(5):  # five workers, each dying after it counted
        pid = os.fork()
        if pid == 0:
            metrics.consumed.labels("t").inc(10)
            metrics.batch_size.observe(10)
            metrics.backpressure_paused.set(1)
            os._exit(0)
        os.waitpid(pid, 0)
        metrics.archive_dead_process(pid)
    owners = {f.rsplit("_", 1)[1].removesuffix(".db") for f in os.listdir(sys.argv[1])}
    print(total("ingestd_messages_consumed_total", topic="t"),
          total("ingestd_batch_size_count"), total("ingestd_backpressure_paused"),
          sorted(owners - {str(os.getpid())}))
""")


def test_dead_workers_counts_are_kept_in_one_archive(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], check=True,
                         capture_output=True, text=True).stdout.split(" ", 3)
    assert float(out[0]) == 50.0
    assert float(out[1]) == 5.0
    assert float(out[2]) == 0.0  # live gauges of dead processes are gone
    assert out[3].strip() == "['archive']"  # files of the living process, plus the archive


# --- the gauges an operator's dashboard reads, at the worker's seams -----------------


def _value(gauge: Any, *labels: str) -> float:
    value: float = gauge.labels(*labels)._value.get()
    return value


def test_broker_unreachable_follows_the_celery_broker_and_librdkafkas_statistics() -> None:
    from ingestd import metrics
    from ingestd.errors import DispatchError
    from ingestd.worker.events import KafkaEvents
    from ingestd.worker.status import Status

    status = Status(lambda _line: None, metrics)
    events = KafkaEvents(status, metrics, set)
    gauge = metrics.broker_unreachable
    assert (_value(gauge, "celery"), _value(gauge, "kafka")) == (0, 0)  # shown from the start
    status.refused(DispatchError("redis LPUSH failed: Connection refused"))
    assert _value(gauge, "celery") == 1
    status.refused(None)
    assert _value(gauge, "celery") == 0

    def stats(*states: str) -> str:
        brokers = {f"b{i}": {"state": state} for i, state in enumerate(states)}
        return orjson.dumps({"brokers": brokers}).decode()

    events.on_stats(stats("DOWN", "CONNECT"))  # every connection down: the cluster is away
    assert _value(gauge, "kafka") == 1
    events.on_stats(stats("UP", "INIT"))  # a node down of several is not an outage
    assert _value(gauge, "kafka") == 0


class _Probe:
    def __init__(self) -> None:
        self.asked = 0
        self.depths = {"celery": 7}

    def queue_depths(self) -> dict[str, int]:
        self.asked += 1
        return dict(self.depths)


def test_the_queue_depth_is_probed_every_few_seconds_even_while_publishing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ingestd import metrics
    from ingestd.config import Config
    from ingestd.worker import backpressure

    probe = _Probe()
    monkeypatch.setattr(backpressure.dispatch, "create", lambda *_a: probe)
    now = [1000.0]
    monkeypatch.setattr(backpressure.time, "monotonic", lambda: now[0])
    watch = backpressure.QueueWatch(Config(), lambda _p: None, lambda _e: None, metrics)
    watch.check()
    assert probe.asked == 1 and _value(metrics.celery_queue_depth, "celery") == 7
    probe.depths["celery"] = 9
    for _ in range(4):  # batches accepted every second: the broker is plainly there
        now[0] += 1
        watch.accepted(0)
        watch.check()
    assert probe.asked == 1
    now[0] += 1
    watch.check()
    assert probe.asked == 2 and _value(metrics.celery_queue_depth, "celery") == 9
