"""Share groups (``--group-type share``) under load: 8 workers on a 4-partition topic,
workers SIGKILLed mid-batch, a worker added and removed, the Celery broker down for
longer than a retry in place may take, a record that kills every worker that takes
it, and a new group that must start at the beginning.

A share group commits no offsets: a run is settled once every valid record ran and
every poison one was dead-lettered. Nothing may be lost. A record a killed worker held
unacknowledged comes back once its lock expires, and runs again: duplicates are
bounded by what the killed workers held, at most a poll's records each.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable

import pytest
import redis

from ingestd import dlq
from ingestd.celery import codec
from ingestd.tools import checker
from tests import stack
from tests.conftest import PrivateRedis
from tests.harness import BATCH, Run

pytestmark = pytest.mark.stack

LOAD = 20_000
LOAD_SECONDS = 20
WORKERS = 8
# What a killed worker may hold: a poll's records, about max.poll.records (--batch-size)
# rounded up to whole record batches; the bound leaves room for three batches' worth.
POLL_BOUND = 3 * BATCH
# The group's record lock: the least Kafka allows by default
# (group.share.min.record.lock.duration.ms), so that a retry in place runs out sooner.
LOCK_MS = 15_000


def share_run(run: Run, *extra: str, workers: int = WORKERS) -> tuple[stack.Ingestd, str]:
    """ingestd on ``run`` as a share group with metrics on, and the group's record lock
    set to :data:`LOCK_MS`; and where its metrics are."""
    stack.set_group_config(run.group, {"share.record.lock.duration.ms": str(LOCK_MS)},
                           run.bootstrap)
    port = stack.free_port()
    proc = run.ingestd("--group-type", "share", "--metrics-addr", f"127.0.0.1:{port}",
                       *extra, workers=workers)
    return proc, f"http://127.0.0.1:{port}/metrics"


def dispatched_by_worker(metrics_url: str) -> dict[int, float]:
    """``ingestd_worker_dispatched_total`` per worker slot."""
    _, body = stack.http_get(metrics_url)
    return {int(slot): float(value) for slot, value in re.findall(
        r'^ingestd_worker_dispatched_total\{slot="(\d+)"\} (\S+)$', body.decode(), re.M)}


def settle(run: Run, timeout: float = 300) -> bool:
    """A share group's settled run: every valid record ran, every poison one was
    dead-lettered, and the celery worker has gone quiet."""
    deadline = time.monotonic() + timeout
    run.load.wait()

    def done() -> bool:
        report = run.report(committed={})
        return report.executed == report.valid and report.dead_lettered == \
            report.produced - report.valid

    ok = stack.wait_until(done, deadline - time.monotonic(), 1.0)
    return run.quiet(timeout=max(30.0, deadline - time.monotonic())) and ok


def verify(run: Run, max_duplicates: int) -> checker.Report:
    """The checker's verdict: nothing lost, misrouted or executed that was poison; no
    offsets to judge."""
    report = run.report(committed={})
    print(f"\n{report.summary()}")
    assert not report.failures(max_duplicates), \
        f"{report.explain(max_duplicates)}\n{run.logs()}"
    return report


@pytest.mark.timeout(600)
def test_share_group_kills_and_resizes_under_load(
        private_redis_factory: Callable[..., PrivateRedis], make_run: Callable[..., Run]
        ) -> None:
    """Two workers SIGKILLed mid-batch: Redis is paused (SIGSTOP) first, so that the
    workers wait on publishes, holding what they polled; some LPUSHes are in Redis's
    socket already and run once it resumes, though their records were never
    acknowledged. Then a worker added (TTIN) and one removed (TTOU), all under load.
    Duplicates are at most what the killed workers held; every worker does work."""
    broker = private_redis_factory()
    run = make_run(broker_url=broker.url, celery=False)
    ingestd, metrics = share_run(run)
    run.load.start(LOAD, LOAD_SECONDS)
    assert stack.wait_until(lambda: run.queued() > 2_000, 120, 0.5), run.logs()
    pid = int(redis.Redis.from_url(broker.url).info("server")["process_id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2)  # the workers poll what came meanwhile and wait on its publish
        killed = ingestd.worker_pids()[:2]
        for worker in killed:
            os.kill(worker, signal.SIGKILL)
        time.sleep(1)
    finally:
        os.kill(pid, signal.SIGCONT)
    queued = run.queued()
    assert stack.wait_until(lambda: run.queued() > queued + 1_000, 120, 0.5), run.logs()
    ingestd.signal(signal.SIGTTIN)
    assert stack.wait_until(lambda: run.queued() > queued + 3_000, 120, 0.5), run.logs()
    ingestd.signal(signal.SIGTTOU)
    run.start_celery()
    settled = settle(run)
    by_worker = dispatched_by_worker(metrics)
    code = run.stop(ingestd)
    verify(run, max_duplicates=len(killed) * POLL_BOUND)
    assert settled and code == 0, run.logs()
    idle = [slot for slot in range(WORKERS) if not by_worker.get(slot)]
    assert not idle, f"workers that dispatched nothing: {idle} ({by_worker})"


@pytest.mark.timeout(600)
def test_share_group_redis_down_longer_than_a_lock(
        private_redis_factory: Callable[..., PrivateRedis], make_run: Callable[..., Run]
        ) -> None:
    """Redis stopped for longer than a refused batch may be retried in place (the lock
    less the publish timeout): the workers release their records and poll no more
    until Redis answers; then everything runs, and no record reaches the group's
    delivery limit (a letter would show it)."""
    broker = private_redis_factory()
    run = make_run(broker_url=broker.url, celery=False)
    ingestd, _ = share_run(run, "--retry-max-backoff", "1", workers=4)
    run.load.start(LOAD, LOAD_SECONDS)
    assert stack.wait_until(lambda: run.queued() > 2_000, 120, 0.5), run.logs()
    broker.stop()
    try:
        assert stack.wait_until(lambda: "releasing them" in ingestd.output(), 60, 0.5), \
            run.logs()
        time.sleep(2)
    finally:
        broker.start()
    run.start_celery()
    settled = settle(run)
    code = run.stop(ingestd)
    verify(run, max_duplicates=0)  # no valid record dead-lettered at its delivery limit
    assert settled and code == 0, run.logs()


def test_share_group_unknown_group_starts_at_the_beginning(run: Run) -> None:
    """A share group starts at the end of each partition unless its config says
    otherwise; ingestd sets it from --offset-reset (earliest), so records produced before
    the group existed run."""
    run.load.produce(200)
    ingestd, _ = share_run(run, workers=2)
    assert settle(run, timeout=120), run.logs()
    run.stop(ingestd)
    verify(run, max_duplicates=0)


@pytest.mark.timeout(600)
def test_share_group_record_that_kills_its_workers_is_dead_lettered(
        topic_factory: Callable[..., str], broker_url: str) -> None:
    """A record that SIGKILLs every worker that validates it (``tests.poison:Killing``),
    in the middle of 1,000: it comes back after each death, once its lock expires; from
    its third delivery it goes alone, and on its last (Kafka's delivery limit, 5) it is
    dead-lettered as ``internal`` instead. Every other record runs."""
    topic = topic_factory()
    n, poison = 1000, 500
    stack.produce(topic, [stack.signal_record(i, name="kill") if i == poison
                          else stack.signal_record(i) for i in range(n)], partition=0)
    group = stack.group()
    stack.set_group_config(group, {"share.record.lock.duration.ms": str(LOCK_MS)})
    args = stack.ingestd_args(topic, group, broker_url, "--schema", "tests.poison:Killing",
                              "--group-type", "share", "--workers", "2")
    with stack.Ingestd(*args) as ingestd:
        letters = stack.consume_all(f"{topic}.dlq", 1, timeout=240)
        assert stack.wait_until(lambda: {
            rid for t in stack.queued_tasks(broker_url) for rid in t.get(
                codec.RECORD_IDS) or [t["id"]]} >= {f"{topic}-0-{i}" for i in range(n)
                                                   if i != poison}, 60), \
            ingestd.output()[-3000:]
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()[-3000:]
    stack.delete_topic(f"{topic}.dlq")
    out = ingestd.output()
    assert out.count("signal SIGKILL") == 4, out[-3000:]
    (letter,) = letters
    headers = {k: v.decode() for k, v in letter.headers()}
    assert (headers[dlq.OFFSET], headers[dlq.ERROR]) == (str(poison), "internal")
    assert headers[dlq.DETAIL].startswith("delivered 5 times"), headers
    tasks = [rid for t in stack.queued_tasks(broker_url)
             for rid in t.get(codec.RECORD_IDS) or [t["id"]]]
    assert f"{topic}-0-{poison}" not in tasks
