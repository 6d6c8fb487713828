"""Hard kills under load: the supervisor, and the Kafka broker itself.

Kafka's OffsetValidationTest's hard bounces: nothing may be lost and no commit may
pass what was delivered. A killed supervisor's workers drain within a few seconds
(each repeats at most one full batch). A killed broker fails commits, and a
batch whose commit failed is consumed again: duplicates are reported, not bounded.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests import stack
from tests.harness import BATCH, PrivateService, Run

pytestmark = pytest.mark.stack

LOAD = 20_000
LOAD_SECONDS = 25
STEP = 2_000
ORPHANS_GONE = 10.0  # seconds: the workers' drain is capped at 3 s once the supervisor is gone


@pytest.mark.timeout(600)
def test_supervisor_sigkilled_then_restarted(run: Run) -> None:
    ingestd = run.ingestd(workers=2)
    run.load.start(LOAD, LOAD_SECONDS)
    run.wait_progress(STEP)
    ingestd.signal(signal.SIGKILL)
    ingestd.wait(10)
    assert stack.wait_until(lambda: not stack.survivors(run.group), ORPHANS_GONE), \
        f"still running: {stack.survivors(run.group)}\n{run.logs()}"
    again = run.ingestd(workers=2)
    settled = run.settle()
    code = run.stop(again)
    run.verify(max_duplicates=2 * BATCH)
    assert settled and code == 0, run.logs()


@pytest.mark.timeout(900)
def test_kafka_broker_sigkilled_and_restarted(private_kafka: PrivateService,
                                              make_run: Callable[..., Run]) -> None:
    """A broker of the test's own: ingestd, the load, the group's offsets and the dead
    letters all live on it."""
    run = make_run(bootstrap=private_kafka.address)
    ingestd = run.ingestd(workers=2)
    run.load.start(LOAD, LOAD_SECONDS)
    run.wait_progress(STEP)
    private_kafka.kill()
    time.sleep(2)
    private_kafka.up()
    settled = run.settle(timeout=480)
    code = run.stop(ingestd)
    run.verify(max_duplicates=None)
    assert settled and code == 0, run.logs()
