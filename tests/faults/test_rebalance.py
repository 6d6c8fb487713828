"""Partitions moving under load: workers joining a backlog, TTIN and TTOU, a second
instance joining and leaving, and a worker SIGKILLed in the middle of a rebalance.

Clean moves (a join, TTOU, a TERM) must repeat nothing, as in Kafka's
OffsetValidationTest's clean bounces: a revoke waits for the batch in flight and
its offsets are committed with it. A SIGKILL may repeat the killed worker's batch
in flight, no more.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from tests import stack
from tests.harness import BATCH, Run

pytestmark = pytest.mark.stack

BACKLOG = 60_000
# Batch dispatch keeps the celery worker ahead; a bounded Celery queue then paces the
# consumption by the celery worker's speed, so that the joins land mid-backlog however
# fast ingestd is.
BACKLOG_ARGS = ("--dispatch", "batch", "--batch-size", "100", "--max-queue-depth", "40")
LOAD = 20_000
LOAD_SECONDS = 25
STEP = 2_000  # records committed between two faults
REVOKED = re.compile(r"worker-(\d+) assignment: revoked (?!nothing)")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("round_", range(5))
@pytest.mark.parametrize("workers", [2, 3])
def test_workers_starting_on_a_backlog(run: Run, workers: int, round_: int) -> None:
    """The workers join one after another while the first already consumes the backlog:
    each join is a rebalance in the middle of batches, at a different point every round."""
    run.load.produce(BACKLOG)
    ingestd = run.ingestd(*BACKLOG_ARGS, workers=workers)
    if not stack.wait_until(lambda: REVOKED.search(ingestd.output()), 5):
        # Every worker made the group's first generation, so nothing moved, and much of the
        # backlog may be gone: one more worker joins while a second backlog goes in, so that
        # it joins in the middle of that backlog's batches.
        print("\nevery worker joined at once; adding one (TTIN) and a second backlog")
        ingestd.signal(signal.SIGTTIN)
        run.load.produce(BACKLOG)
        assert stack.wait_until(lambda: REVOKED.search(ingestd.output()), 60), run.logs()
    left = len(run.load.produced) - run.progress()
    print(f"\nfirst revoke with {left} of {len(run.load.produced)} records uncommitted")
    settled = run.settle()
    code = run.stop(ingestd)
    run.verify(max_duplicates=0)
    assert settled and code == 0, run.logs()
    assert run.stuck() == []
    assert left > 0, "the backlog was consumed before the first rebalance: nothing was tested"


@pytest.mark.timeout(600)
def test_ttin_and_ttou_under_load(run: Run) -> None:
    ingestd = run.ingestd(workers=2)
    run.load.start(LOAD, LOAD_SECONDS)
    run.wait_progress(STEP)
    for sig, workers in ((signal.SIGTTIN, 3), (signal.SIGTTOU, 2), (signal.SIGTTOU, 1)):
        ingestd.signal(sig)
        assert stack.wait_until(lambda n=workers: len(ingestd.worker_pids()) == n, 60)
        run.wait_progress(STEP)
    settled = run.settle()
    code = run.stop(ingestd)
    run.verify(max_duplicates=0)
    assert settled and code == 0, run.logs()


@pytest.mark.timeout(600)
def test_second_instance_joins_and_leaves_under_load(run: Run) -> None:
    first = run.ingestd(instance="a")
    run.load.start(LOAD, LOAD_SECONDS)
    run.wait_progress(STEP)
    second = run.ingestd(instance="b")
    assert stack.wait_until(lambda: run.assigned(second), 60), run.logs()
    run.wait_progress(STEP)
    left = run.stop(second)
    run.wait_progress(STEP)
    settled = run.settle()
    code = run.stop(first)
    run.verify(max_duplicates=0)
    assert settled and code == left == 0, run.logs()


def revoking_worker(ingestd: stack.Ingestd, after: int) -> int | None:
    """The pid of a worker that logged a revoke past the first ``after`` characters of the
    log: one in the middle of a rebalance."""
    text = ingestd.output()
    found = REVOKED.search(text, after)
    if found is None:
        return None
    started = re.findall(rf"worker {found[1]} started \(pid (\d+)\)", text[:found.start()])
    return int(started[-1]) if started else None


@pytest.mark.timeout(600)
@pytest.mark.parametrize("trigger", ["ttin", "second instance"])
def test_worker_killed_during_a_rebalance(run: Run, trigger: str) -> None:
    """The rebalance a TTIN or a second instance starts: the first worker that logs a
    revoke is SIGKILLed while it gives its partitions up. Its batch in flight may be
    repeated; nothing may be lost, and no partition may stay without an owner."""
    first = run.ingestd(instance="a")
    run.load.start(LOAD, LOAD_SECONDS)
    run.wait_progress(STEP)
    mark = len(first.output())
    others = []
    if trigger == "ttin":
        first.signal(signal.SIGTTIN)
    else:
        others.append(run.ingestd(instance="b"))
    victim = None

    def revoking() -> bool:
        nonlocal victim
        victim = revoking_worker(first, mark)
        return victim is not None

    assert stack.wait_until(revoking, 60, 0.02), run.logs()
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    run.wait_progress(STEP)
    settled = run.settle()
    codes = [run.stop(proc) for proc in (*others, first)]
    run.verify(max_duplicates=BATCH)
    assert f"(pid {victim}) died (signal SIGKILL)" in first.output()
    assert settled and codes == [0] * len(codes), run.logs()
