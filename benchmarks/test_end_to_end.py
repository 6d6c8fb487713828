"""End to end: a Kafka topic with a lag of N signals → tasks in a Redis queue.

Every pipeline drains the same preloaded 4-partition topic of ~200-byte signals
with tags, each with a consumer group and a Redis database of its own, in the
same run, each as a process (tree) of its own:

- ``ingestd``: the real ``ingestd`` (``--workers 1`` and ``2``, both dispatch modes;
  ``--workers 8``, more than the partitions, as a classic and as a share group), until
  all N signals are accepted by Redis;
- ``old script``: one ``send_task`` per message after ``json.loads``
  (:mod:`benchmarks.pipes`; it reads only the first ``BASELINE_RECORDS``);
- ``raw pipe``: ingestd's consumer settings, natural batching, one multi-value LPUSH
  of the records' bytes per batch: no decoding, no Celery format.

Each reports in ``extra_info``: the signals/s over the whole run and at steady rate
(from the first signal out to the last, leaving out process start and the group
join), the CPU microseconds per signal at steady rate (user + system of every
process of the pipeline, from ``/proc``) and the peak RSS of its largest process.
``scripts/bench`` writes the results file and ``BENCHMARKS.md`` from them.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from benchmarks import measure, pipes
from tests import stack

RECORDS = int(os.environ.get("INGESTD_BENCH_RECORDS", "200000"))
BASELINE_RECORDS = min(RECORDS, int(os.environ.get("INGESTD_BENCH_BASELINE_RECORDS", "20000")))
PARTITIONS = 4
TIMEOUT = 600.0
POLL = 0.02
MIN_CPU = 0.2  # seconds: /proc counts CPU in 10 ms ticks

pytestmark = [pytest.mark.stack, pytest.mark.benchmark(group="end-to-end")]


@pytest.fixture(scope="module")
def lagging_topic() -> Iterator[str]:
    topic = stack.create_topic(PARTITIONS, prefix="bench")
    stack.produce(topic, (pipes.signal(i) for i in range(RECORDS)))
    yield topic
    stack.delete_topic(topic)


@pytest.fixture
def queue_db() -> Iterator[tuple[str, redis.Redis]]:
    db = stack.fresh_redis_db()
    client = redis.Redis.from_url(stack.redis_url(db))
    yield stack.redis_url(db), client
    client.flushdb()
    stack.release_redis_db(db)


def drain(benchmark: Any, pid: Callable[[], int | None], done: Callable[[], int],
          records: int) -> None:
    """Wait until ``done()`` reaches ``records``; report rates, CPU per signal and peak RSS
    of the process tree ``pid()`` (which the caller stops afterwards)."""
    marks: dict[str, Any] = {}

    def run() -> None:
        marks["start"] = time.perf_counter()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            root = pid()
            n = done()
            if n and "first" not in marks and root is not None:
                marks.update(first=time.perf_counter(), first_n=n,
                             first_cpu=measure.cpu_seconds(root),
                             first_roles=measure.cpu_by_role(root))
            if n >= records and root is not None:
                # VmHWM is the peak already: read once, not a /proc scan every poll
                marks.update(end=time.perf_counter(), end_cpu=measure.cpu_seconds(root),
                             end_roles=measure.cpu_by_role(root),
                             peak=measure.peak_rss_mb(root))
                return
            time.sleep(POLL)
        raise AssertionError(f"not drained in {TIMEOUT:.0f}s: {done()} of {records}")

    benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = marks["end"] - marks["start"]
    steady_n = records - marks["first_n"]
    steady_s = marks["end"] - marks["first"]
    steady = round(steady_n / steady_s) if steady_n and steady_s > 0 else 0
    if not steady_n or marks["end_cpu"] - marks["first_cpu"] < MIN_CPU:
        # A tiny corpus, drained within a few clock ticks: the whole run, start included
        steady_n, marks["first_cpu"] = records, 0.0
        marks["first_roles"] = dict.fromkeys(measure.ROLES, 0.0)
    cpu_us = (marks["end_cpu"] - marks["first_cpu"]) / steady_n * 1e6
    benchmark.extra_info["cpu_us_by_role"] = {
        role: round((cpu - marks["first_roles"][role]) / steady_n * 1e6, 2)
        for role, cpu in marks["end_roles"].items()}
    benchmark.extra_info.update(
        records=records, seconds=round(seconds, 3), signals_per_s=round(records / seconds),
        steady_signals_per_s=steady,
        cpu_us_per_signal=round(cpu_us, 2), peak_rss_mb=marks["peak"])


@pytest.mark.parametrize(("dispatch", "workers", "group_type"), [
    pytest.param("each", 1, "classic", id="each-1"),
    pytest.param("each", 2, "classic", id="each-2"),
    pytest.param("batch", 1, "classic", id="batch-1"),
    # More workers than partitions: the classic group leaves 4 idle, a share group none.
    pytest.param("each", 8, "classic", id="each-8"),
    pytest.param("each", 8, "share", id="share-each-8")])
def test_ingestd(benchmark: Any, lagging_topic: str, dispatch: str, workers: int,
                 group_type: str, queue_db: tuple[str, redis.Redis]) -> None:
    url, client = queue_db
    group, port = f"bench-{uuid.uuid4().hex[:8]}", stack.free_port()
    args = [*stack.ingestd_args(lagging_topic, group, url, "--dispatch", dispatch),
            "--workers", str(workers), "--metrics-addr", f"127.0.0.1:{port}",
            "--group-type", group_type]
    ingestd = stack.Ingestd(*args, env={"INGESTD_LOG_LEVEL": "WARNING"})
    offsets = Consumer({"bootstrap.servers": stack.BOOTSTRAP, "group.id": group})
    partitions = [TopicPartition(lagging_topic, p) for p in range(PARTITIONS)]

    def done() -> int:
        """Signals accepted by Redis. In batch mode a task carries a partition slice of
        them, so count what the group committed: ingestd commits only what Redis took."""
        if dispatch == "each":
            return int(client.llen("celery"))
        return sum(max(tp.offset, 0) for tp in offsets.committed(partitions, timeout=10))

    ingestd.start()
    try:
        assert ingestd.proc is not None
        root = ingestd.proc.pid
        drain(benchmark, lambda: root, done, RECORDS)
        metrics = stack.http_get(f"http://127.0.0.1:{port}/metrics")[1].decode()
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0
    finally:
        ingestd.stop()
        offsets.close()
    assert sum(len(t["args"][0]) if dispatch == "batch" else 1
               for t in stack.queued_tasks(url)) == RECORDS
    batches = _sample(metrics, "ingestd_batch_size_count")
    busy = len(re.findall(r'^ingestd_worker_dispatched_total\{slot="\d+"\} [1-9]', metrics,
                          re.M))
    benchmark.extra_info.update(tasks=int(client.llen("celery")), workers=workers,
                                busy_workers=busy, group_type=group_type,
                                dispatch=dispatch, batches=int(batches),
                                mean_batch=round(_sample(metrics, "ingestd_batch_size_sum")
                                                 / max(batches, 1)))


def _sample(metrics: str, name: str) -> float:
    line = next(x for x in metrics.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


@pytest.mark.parametrize(("pipe", "records"), [("old", BASELINE_RECORDS), ("raw", RECORDS)])
def test_alternative(benchmark: Any, lagging_topic: str, pipe: str, records: int,
                     queue_db: tuple[str, redis.Redis]) -> None:
    """The old script and the raw pipe, in the same run as ingestd."""
    url, client = queue_db
    proc = pipes.spawn(pipe, lagging_topic, url, bootstrap=stack.BOOTSTRAP)
    try:
        drain(benchmark, lambda: proc.pid, lambda: int(client.llen("celery")), records)
    finally:
        proc.kill()
        proc.wait()
    assert client.llen("celery") >= records
