"""Commits the group coordinator refuses: duplicates stay bounded.

``__consumer_offsets`` set to take no record of more than 10 bytes: the coordinator
refuses every offset commit, while fetches and heartbeats go on. (Kafka 4.1's
coordinator does not check ``min.insync.replicas`` for its writes.) The workers must
stop publishing once a batch's worth of records waits for a confirmed commit, say
why on ``/readyz``, and a SIGKILL then repeats at most that: two batches over two
workers. Before, a refused commit was given up and publishing went on unbounded.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)

from ingestd.worker.loop import COMMIT_STATUS
from tests import stack
from tests.harness import BATCH, PrivateService, Run

pytestmark = pytest.mark.stack

LOAD = 20_000
LOAD_SECONDS = 40
WORKERS = 2


def _refuse_commits(bootstrap: str, refuse: bool) -> None:
    """``__consumer_offsets``'s max.message.bytes: 10, or back to the broker's."""
    entry = ConfigEntry("max.message.bytes", "10" if refuse else "", incremental_operation=(
        AlterConfigOpType.SET if refuse else AlterConfigOpType.DELETE))
    resource = ConfigResource(ConfigResource.Type.TOPIC, "__consumer_offsets",
                              incremental_configs=[entry])
    for future in stack.admin(bootstrap).incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def _waiting_for_commits(port: int) -> bool:
    code, body = stack.http_get(f"http://127.0.0.1:{port}/readyz")
    if code != 503:
        return False
    problems = json.loads(body).get("workers", {})
    return sum(why == COMMIT_STATUS for why in problems.values()) == WORKERS


@pytest.mark.timeout(900)
def test_refused_commits_hold_publishing_and_bound_duplicates(
        private_kafka: PrivateService, make_run: Callable[..., Run]) -> None:
    run = make_run(bootstrap=private_kafka.address)
    port = stack.free_port()
    first = run.ingestd("--metrics-addr", f"127.0.0.1:{port}", workers=WORKERS)
    run.load.start(LOAD, LOAD_SECONDS)
    run.wait_progress(2 * BATCH)
    _refuse_commits(run.bootstrap, True)
    try:
        assert stack.wait_until(lambda: _waiting_for_commits(port), 120), \
            f"{stack.http_get(f'http://127.0.0.1:{port}/readyz')}\n{run.logs()}"
        assert run.quiet(seconds=3, timeout=60)
        executed, produced = run.executed(), len(run.load.produced)
        assert stack.wait_until(lambda: len(run.load.produced) >= produced + 2 * BATCH, 30)
        assert run.executed() == executed  # records come in, nothing more goes out
        for pid in stack.survivors(run.group):  # the workers, then the supervisor
            os.kill(pid, signal.SIGKILL)
        first.wait(10)
    finally:
        _refuse_commits(run.bootstrap, False)
    again = run.ingestd(workers=WORKERS)
    settled = run.settle()
    code = run.stop(again)
    run.verify(max_duplicates=WORKERS * BATCH)
    assert settled and code == 0, run.logs()
