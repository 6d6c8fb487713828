"""A 3-node Kafka cluster (KRaft; topics replicated 3 times, min.insync.replicas=2)
failing under load: the leader of half the source partitions SIGKILLed, the group
coordinator's node SIGKILLed, a rolling restart of every node.

Each asserts what a replicated cluster promises ingestd's users: nothing lost (the
dead-letter topic included), at most one batch run twice, no stall of the group's
commits longer than the session timeout, and no worker restarted. The cluster is
this module's own, on free ports; each scenario leaves it whole for the next.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ingestd.kafka import GROUP_PROTOCOLS
from tests import stack
from tests.harness import BATCH, KafkaCluster, Run, kafka_cluster, wait_gone

pytestmark = pytest.mark.stack

LOAD = 6_000
LOAD_SECONDS = 8
STEP = 1_000
SESSION_TIMEOUT_S = GROUP_PROTOCOLS["classic"]["session.timeout.ms"] / 1000  # ingestd's
DOWN = 3.0  # seconds a stopped node stays down


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaCluster]:
    with kafka_cluster(3) as nodes:
        yield nodes


class Stalls:
    """The longest time a partition's committed offset did not move while it had records
    left to commit, sampled every half second from a thread of its own."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        since: dict[int, float] = {}
        last: dict[int, int] = {}
        while not self._stop.wait(0.5):
            now = time.monotonic()
            try:  # no retry: a sample that cannot be taken counts as no progress
                committed = {p: o for (_, p), o in self.run.committed(timeout=0).items()}
                ends: dict[int, int] = {}
                for _, p, o in list(self.run.load.produced):
                    ends[p] = max(ends.get(p, 0), o + 1)
            except Exception:
                committed, ends = last, {}
            for p, offset in committed.items():
                if offset != last.get(p) or offset >= ends.get(p, offset + 1):
                    since[p] = now
            last = committed
            self.longest = max([self.longest, *(now - t for t in since.values())])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.longest


def under_load(cluster: KafkaCluster, make_run: Callable[..., Run],
               fault: Callable[[Run], None]) -> None:
    """ingestd (2 workers) on the cluster under load; ``fault`` once it has committed
    some; then every record ran or was dead-lettered, and the promises held."""
    run = make_run(bootstrap=cluster.address)
    ingestd = run.ingestd("--retry-max-backoff", "1")
    run.load.start(LOAD, LOAD_SECONDS)
    run.wait_progress(STEP)
    stalls = Stalls(run)
    try:
        fault(run)
        settled = run.settle()
    finally:
        longest = stalls.stop()
        assert stack.wait_until(cluster.in_sync, 120), "the cluster did not heal"
    code = run.stop(ingestd)
    run.verify(max_duplicates=BATCH)
    print(f"longest stall {longest:.1f} s")
    assert settled and code == 0, run.logs()
    assert longest < SESSION_TIMEOUT_S, f"commits stalled {longest:.1f} s\n{run.logs()}"
    assert ingestd.output().count(" started (pid ") == 2, f"a worker restarted\n{run.logs()}"


def restart(cluster: KafkaCluster, node: int, kill: bool) -> None:
    """Stop ``node`` (SIGKILL, or TERM as a rolling restart does), start it again after
    a few seconds."""
    pid = cluster.node_pid(node)
    if kill:
        cluster.kill(pid)
    else:
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid, 60)
    time.sleep(DOWN)
    cluster.up()


@pytest.mark.timeout(600)
def test_leader_of_half_the_partitions_killed(cluster: KafkaCluster,
                                              make_run: Callable[..., Run]) -> None:
    def fault(run: Run) -> None:
        leaders = cluster.leaders(run.topic)
        node = max(set(leaders.values()), key=list(leaders.values()).count)
        assert list(leaders.values()).count(node) == len(leaders) // 2, leaders
        restart(cluster, node, kill=True)

    under_load(cluster, make_run, fault)


@pytest.mark.timeout(600)
def test_group_coordinator_killed(cluster: KafkaCluster, make_run: Callable[..., Run]) -> None:
    under_load(cluster, make_run,
               lambda run: restart(cluster, cluster.coordinator(run.group), kill=True))


@pytest.mark.timeout(600)
def test_rolling_restart(cluster: KafkaCluster, make_run: Callable[..., Run]) -> None:
    def fault(run: Run) -> None:
        for node in range(1, cluster.size + 1):
            restart(cluster, node, kill=False)
            assert stack.wait_until(cluster.in_sync, 120), f"node {node} did not catch up"

    under_load(cluster, make_run, fault)
