"""``--max-rate``: the host's shared token bucket, and the rate a real ingestd achieves."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
import redis

from ingestd.ratelimit import RateLimit, batch_cap
from tests import stack
from tests.test_cli import run_cli, sample, scrape


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_goes_into_debt_and_out_of_it_as_the_clock_runs() -> None:
    clock = Clock()
    bucket = RateLimit(10, clock)  # capacity: 1 s of the rate, 10 signals
    assert bucket.take(4) == 0 and bucket.debt() == 0
    assert bucket.take(11) == pytest.approx(0.5)  # 6 left, 11 taken: 5 in debt
    assert bucket.debt() == pytest.approx(0.5)
    clock.now += 0.3
    assert bucket.debt() == pytest.approx(0.2)
    clock.now += 0.21
    assert bucket.debt() == 0
    clock.now += 60  # refills up to its capacity, no more
    assert bucket.take(10) == 0
    assert bucket.take(1) == pytest.approx(0.1)


def test_without_a_limit_nothing_waits() -> None:
    bucket = RateLimit(0)
    assert bucket.take(10**9) == 0 and bucket.debt() == 0
    bucket.configure(50)
    assert bucket.rate == 50 and bucket.take(50) == 0 and bucket.take(1) > 0


def test_batches_stay_within_a_tenth_of_a_second_of_the_rate() -> None:
    assert batch_cap(0) == 0 and batch_cap(5) == 1 and batch_cap(500) == 50
    assert batch_cap(1_000_000) == 100_000


def _in_child(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_every_forked_worker_takes_from_the_same_bucket() -> None:
    clock = Clock()
    bucket = RateLimit(10, clock)
    _in_child(lambda: (bucket.take(10), bucket.take(10)))
    _in_child(lambda: bucket.take(5))
    assert bucket.debt() == pytest.approx(1.5)


def test_a_worker_killed_inside_a_take_does_not_stall_the_others() -> None:
    """The kernel releases a dead process's record lock."""
    bucket = RateLimit(100)

    def die_holding_the_lock() -> None:
        with bucket._locked():
            os.kill(os.getpid(), signal.SIGKILL)

    assert os.WIFSIGNALED(_in_child(die_holding_the_lock))
    signal.alarm(5)  # a stalled take fails the test instead of hanging it
    try:
        assert bucket.take(1) == 0
    finally:
        signal.alarm(0)


def test_the_supervisors_threads_take_turns_and_a_fork_meanwhile_is_not_stalled() -> None:
    """A record lock is the process's: a second thread would get in while one holds it.
    The thread lock that keeps it out must not stay held in a child forked meanwhile."""
    bucket = RateLimit(100)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with bucket._locked():
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(10)
        assert not bucket._thread_lock.acquire(timeout=0.1)  # the other thread waits
        pid = os.fork()
        if pid == 0:  # forked while the thread holds both locks
            signal.alarm(5)  # a stalled take ends the child instead of hanging it
            os._exit(0 if bucket.take(1) == 0 else 1)
        release.set()  # the child's take gets the record lock once the thread lets go
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        release.set()
        thread.join()


@pytest.mark.parametrize("rate", ["-1", "inf", "nan"])
def test_a_negative_or_infinite_rate_exits_2_with_one_line(rate: str) -> None:
    result = run_cli(f"--max-rate={rate}", "--check")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "max-rate" in result.stderr and "expected a number >= 0" in result.stderr


RATE = 400
SECONDS = 20
BACKLOG = 2 * RATE * SECONDS  # never drained within the measurement


def test_the_host_dispatches_at_most_max_rate(topic_factory: Callable[..., str],
                                              broker_url: str) -> None:
    """Two workers on a backlog share the limit: over 20 s the host dispatches the rate,
    within a generous bound (a behaviour check, not a benchmark). Nothing is lost: what
    the group committed is in the queue, once each."""
    topic = topic_factory(partitions=4)
    stack.produce(topic, (stack.signal_record(i) for i in range(BACKLOG)))
    port = stack.free_port()
    g = stack.group()
    args = stack.ingestd_args(topic, g, broker_url, "--metrics-addr", f"127.0.0.1:{port}",
                              "--workers", "2", "--max-rate", str(RATE))
    base = f"http://127.0.0.1:{port}"
    client = redis.Redis.from_url(broker_url)

    def dispatched() -> float:
        return sample(scrape(base), "ingestd_messages_dispatched_total", topic=topic,
                      task="ingest_and_score_signal") or 0.0

    with stack.Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: stack.http_get(f"{base}/readyz")[0] == 200, 90), \
            ingestd.output()
        time.sleep(2)  # past the first batches, and any burst
        start, first = time.monotonic(), dispatched()
        time.sleep(SECONDS)
        rate = (dispatched() - first) / (time.monotonic() - start)
        samples = scrape(base)
        status, body = stack.http_get(f"{base}/readyz?verbose")
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()
    assert 0.75 * RATE <= rate <= 1.25 * RATE, rate
    assert sample(samples, "ingestd_max_rate") == RATE
    assert sample(samples, "ingestd_rate_limited") is not None
    assert status == 200, body  # throttled is not unready
    detail = json.loads(body)["detail"]
    assert detail["max_rate"] == RATE and isinstance(detail["rate_limited"], bool)
    # (a partition may have no commit yet: librdkafka hands over what it fetched of one
    # partition, up to max.partition.fetch.bytes, before the next)
    committed = sum(max(0, o) for o in stack.committed_offsets(g, topic, 4).values())
    ids = [t["id"] for t in stack.queued_tasks(broker_url)]
    assert 0 < committed < BACKLOG
    assert len(ids) == len(set(ids)) == client.llen("celery")
    assert committed <= len(ids)  # every committed record was dispatched
    assert len(ids) - committed <= 2 * 40  # at most a batch a worker beyond the commit
