"""The supervisor end to end: the real ``ingestd`` process, real Kafka, real Redis.

Which worker owns which partition is read from the workers' own ``assignment``
log events (``--log-format json``); what reached the Celery broker is read from
the Redis queue (task ids are ``<topic>-<partition>-<offset>``), or, where a
real ``celery worker`` runs the tasks, from what the reference tasks recorded.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Consumer
from confluent_kafka.admin import NewPartitions

from ingestd.celery import reference_tasks
from ingestd.worker.assignment import static_share
from tests import stack

pytestmark = pytest.mark.stack

Owned = dict[int, set[tuple[str, int]]]
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
ENDED = re.compile(r"worker (\d+) \(pid (\d+)\) (?:exited|died)")
PARTITION = re.compile(r"([\w.-]+)\[(\d+)\]")
# Static members send no LeaveGroup when they close: a stopped worker's partitions
# move to another member after the session timeout (ingestd's default: 10 s). The
# broker's minimum keeps that short in tests.
SESSION = ("-X", "session.timeout.ms=6000")


# --- helpers --------------------------------------------------------------



def run(topic: str, grp: str, broker_url: str, *extra: str,
        env: dict[str, str] | None = None) -> stack.Ingestd:
    """An ``ingestd`` with JSON logs, so that the assignment events can be parsed."""
    return stack.Ingestd(*stack.ingestd_args(topic, grp, broker_url, "--log-format", "json",
                                             *extra), env=env)


def events(ingestd: stack.Ingestd) -> list[dict[str, Any]]:
    """The JSON log lines, in order; anything else (librdkafka's stderr) is skipped."""
    out = []
    for line in ingestd.output().splitlines():
        if line.startswith("{"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return out


def supervisor_lines(ingestd: stack.Ingestd) -> list[str]:
    return [e["msg"] for e in events(ingestd) if e["role"] == "supervisor"]


def ownership(ingestd: stack.Ingestd) -> Owned:
    """Slot -> the (topic, partition) pairs its current worker owns, from the logs."""
    owned: Owned = {}
    for e in events(ingestd):
        if e["role"] == "supervisor":
            m = STARTED.match(e["msg"]) or ENDED.match(e["msg"])
            if m:
                owned[int(m[1])] = set()
        elif e["role"] == "worker" and e["event"] == "assignment":
            verb, _, rest = e["msg"].partition(" ")
            pairs = {(t, int(p)) for t, p in PARTITION.findall(rest)}
            slot = owned.setdefault(int(e["slot"]), set())
            if verb == "assigned":
                slot |= pairs
            elif verb in ("revoked", "lost"):
                slot -= pairs
    return owned


def settled(ingestd: stack.Ingestd, topic: str, partitions: int, workers: int) -> None:
    """Wait until the group's assignment is complete: each partition owned by one worker.

    Tests stop ingestd only then: see test_term_while_a_rebalance_is_stuck_still_drains.
    """
    assert stack.wait_until(lambda: is_partitioned(ownership(ingestd), topic, partitions,
                                                   workers), 90), ownership(ingestd)


def partitions_of(owned: Owned) -> dict[int, set[int]]:
    return {slot: {p for _, p in pairs} for slot, pairs in owned.items()}


def shares(topic: str, partitions: int, workers: int,
           allowed: frozenset[int] | None = None) -> dict[int, set[int]]:
    """What static mode must give each slot: ingestd's own map, one topic."""
    return {slot: {p for _, p in static_share({topic: partitions}, allowed, slot, workers)}
            for slot in range(workers)}


def is_partitioned(owned: Owned, topic: str, partitions: int, workers: int) -> bool:
    """Every partition owned by exactly one of ``workers`` slots, each owning some."""
    busy = [pairs for pairs in owned.values() if pairs]
    every = [pair for pairs in busy for pair in pairs]
    return (len(busy) == workers and len(every) == len(set(every))
            and set(every) == {(topic, p) for p in range(partitions)})


def task_ids(broker_url: str) -> list[str]:
    """The id of every task message waiting in the Redis queue, repeats included."""
    client = redis.Redis.from_url(broker_url)
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange("celery", 0, -1)]


def produced_ids(topic: str, partitions: int) -> set[str]:
    return {f"{topic}-{p}-{o}" for p, end in stack.end_offsets(topic, partitions).items()
            for o in range(end)}


def wait_ids(broker_url: str, expected: set[str], timeout: float = 180) -> list[str]:
    """Wait until every expected task id is queued; return all queued ids."""
    client = redis.Redis.from_url(broker_url)
    assert stack.wait_until(lambda: client.llen("celery") >= len(expected), timeout, 0.5), \
        f"{client.llen('celery')} of {len(expected)} tasks queued"
    assert stack.wait_until(lambda: set(task_ids(broker_url)) >= expected, timeout, 1), \
        f"{len(expected - set(task_ids(broker_url)))} tasks missing"
    return task_ids(broker_url)


def duplicates(ids: list[str]) -> int:
    return sum(n - 1 for n in collections.Counter(ids).values())


def records(n: int, start: int = 0) -> Iterator[bytes]:
    return (stack.signal_record(i) for i in range(start, start + n))


def kill_survivors(marker: str) -> None:
    for pid in stack.survivors(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue




def stop(ingestd: stack.Ingestd) -> None:
    ingestd.signal(signal.SIGTERM)
    assert ingestd.wait(60) == 0, ingestd.output()[-3000:]


# --- 1. pinning -------------------------------------------------------------


def test_group_mode_pins_each_partition_to_one_worker(topic_factory: Callable[..., str],
                                                      broker_url: str) -> None:
    topic = topic_factory(partitions=6)
    n = 30_000
    with run(topic, stack.group(), broker_url, "--workers", "3") as ingestd:
        settled(ingestd, topic, 6, 3)
        assert sorted(len(p) for p in ownership(ingestd).values()) == [2, 2, 2]
        stack.produce(topic, records(n))
        ids = wait_ids(broker_url, produced_ids(topic, 6))
        stop(ingestd)
    assert len(ids) == n and duplicates(ids) == 0


def test_static_mode_gives_each_worker_its_share(topic_factory: Callable[..., str],
                                                 broker_url: str) -> None:
    topic = topic_factory(partitions=6)
    n = 30_000
    stack.produce(topic, records(n))
    g = stack.group()
    with run(topic, g, broker_url, "--workers", "3", "--assignment", "static") as ingestd:
        ids = wait_ids(broker_url, produced_ids(topic, 6))
        assert stack.wait_until(lambda: stack.committed_offsets(g, topic, 6) ==
                                stack.end_offsets(topic, 6), 60)
        owned = ownership(ingestd)
        stop(ingestd)
    assert partitions_of(owned) == shares(topic, 6, 3)
    assert sorted(len(p) for p in partitions_of(owned).values()) == [2, 2, 2]
    assert len(ids) == n and duplicates(ids) == 0
    assert stack.committed_offsets(g, topic, 6) == stack.end_offsets(topic, 6)


def test_static_mode_consumes_only_the_partitions_given(topic_factory: Callable[..., str],
                                                        broker_url: str) -> None:
    topic = topic_factory(partitions=6)
    per = 1000
    for p in (5, 4, 3, 0, 1, 2):  # the foreign ones first: they would be consumed first too
        stack.produce(topic, records(per, p * per), partition=p)
    g = stack.group()
    args = ("--workers", "3", "--assignment", "static", "--partitions", "0-2")
    with run(topic, g, broker_url, *args) as ingestd:
        ids = wait_ids(broker_url, {f"{topic}-{p}-{o}" for p in range(3) for o in range(per)})
        assert stack.wait_until(
            lambda: stack.committed_offsets(g, topic, 3) == {0: per, 1: per, 2: per}, 60)
        owned = ownership(ingestd)
        stop(ingestd)
    assert partitions_of(owned) == shares(topic, 6, 3, frozenset({0, 1, 2}))
    assert sorted(len(p) for p in partitions_of(owned).values()) == [1, 1, 1]
    assert len(ids) == 3 * per and duplicates(ids) == 0
    assert {int(i.rsplit("-", 2)[1]) for i in ids} == {0, 1, 2}
    assert all(o < 0 for p, o in stack.committed_offsets(g, topic, 6).items() if p >= 3)


# --- 2. static mode and a growing topic -------------------------------------


def add_partitions(topic: str, total: int) -> None:
    futures = stack.admin().create_partitions([NewPartitions(topic, total)],
                                              operation_timeout=15)
    futures[topic].result(timeout=30)
    stack.wait_for_topic(topic, total)


def test_static_mode_takes_up_partitions_added_later(topic_factory: Callable[..., str],
                                                     broker_url: str) -> None:
    """Slow: ingestd re-reads the topic metadata every METADATA_REFRESH (30 s)."""
    topic = topic_factory(partitions=2)
    stack.produce(topic, records(2000))
    g = stack.group()
    with run(topic, g, broker_url, "--workers", "2", "--assignment", "static") as ingestd:
        wait_ids(broker_url, produced_ids(topic, 2))
        pids = ingestd.worker_pids()
        add_partitions(topic, 4)
        for p in (2, 3):
            stack.produce(topic, records(500, 10_000 * p), partition=p)
        ids = wait_ids(broker_url, produced_ids(topic, 4), timeout=120)
        assert ingestd.worker_pids() == pids  # no restart
        owned = ownership(ingestd)
        stop(ingestd)
    assert partitions_of(owned) == shares(topic, 4, 2)
    assert len(ids) == 3000 and duplicates(ids) == 0
    assert stack.committed_offsets(g, topic, 4) == stack.end_offsets(topic, 4)


def test_static_mode_growing_one_topic_leaves_the_others_alone(
        topic_factory: Callable[..., str], broker_url: str) -> None:
    """Slow: ingestd re-reads the topic metadata every METADATA_REFRESH (30 s)."""
    first, second = topic_factory(partitions=2, prefix="a"), topic_factory(partitions=2, prefix="b")
    g = stack.group()
    args = ("--topic", second, "--workers", "2", "--assignment", "static")
    with run(first, g, broker_url, *args) as ingestd:
        assert stack.wait_until(lambda: sum(map(len, ownership(ingestd).values())) == 4, 60)
        add_partitions(first, 3)
        assert stack.wait_until(
            lambda: any((first, 2) in pairs for pairs in ownership(ingestd).values()), 90)
        stack.produce(second, records(2000))
        stack.produce(first, records(500), partition=2)
        expected = produced_ids(second, 2) | {f"{first}-2-{o}" for o in range(500)}
        ids = wait_ids(broker_url, expected)
        owned = ownership(ingestd)
        stop(ingestd)
    every = [pair for pairs in owned.values() for pair in pairs]
    assert len(every) == len(set(every)) == 5, owned
    assert duplicates(ids) == 0


# --- 3. a killed worker ------------------------------------------------------


def test_killed_worker_is_replaced_and_nothing_is_lost(topic_factory: Callable[..., str],
                                                       broker_url: str) -> None:
    topic = topic_factory(partitions=4)
    n, batch = 60_000, 500
    g = stack.group()
    client = redis.Redis.from_url(broker_url)
    with run(topic, g, broker_url, "--workers", "2", "--batch-size", str(batch)) as ingestd:
        settled(ingestd, topic, 4, 2)
        stack.produce(topic, records(n))
        assert stack.wait_until(lambda: client.llen("celery") >= 5000, 60)
        before = ingestd.worker_pids()
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        assert stack.wait_until(lambda: len(ingestd.worker_pids()) == 2
                                and victim not in ingestd.worker_pids(), 30)
        (replacement,) = set(ingestd.worker_pids()) - set(before)
        ids = wait_ids(broker_url, produced_ids(topic, 4))
        settled(ingestd, topic, 4, 2)  # the replacement has its partitions back
        stop(ingestd)
    assert replacement != victim
    assert f"(pid {victim}) died (signal SIGKILL)" in ingestd.output()
    assert set(ids) == produced_ids(topic, 4)
    assert duplicates(ids) <= batch, duplicates(ids)
    assert stack.committed_offsets(g, topic, 4) == stack.end_offsets(topic, 4)


# --- 4. TERM under load --------------------------------------------------------


def test_term_under_load_drains_and_commits_exactly_what_was_dispatched(
        topic_factory: Callable[..., str], broker_url: str) -> None:
    topic = topic_factory(partitions=4)
    n = 60_000
    g = stack.group()
    client = redis.Redis.from_url(broker_url)
    args = ("--workers", "2", "--batch-size", "500", "--drain-timeout", "30")
    with run(topic, g, broker_url, *args) as ingestd:
        settled(ingestd, topic, 4, 2)
        stack.produce(topic, records(n))
        assert stack.wait_until(lambda: client.llen("celery") >= 5000, 60)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()[-3000:]
    committed = stack.committed_offsets(g, topic, 4)
    ids = task_ids(broker_url)
    assert duplicates(ids) == 0
    dispatched: dict[int, set[int]] = collections.defaultdict(set)
    for task_id in ids:
        t, p, o = task_id.rsplit("-", 2)
        assert t == topic
        dispatched[int(p)].add(int(o))
    ends = stack.end_offsets(topic, 4)
    for p in range(4):
        upto = max(committed[p], 0)  # no commit yet: nothing may have been dispatched
        assert dispatched[p] == set(range(upto)), (p, committed[p], len(dispatched[p]))
        assert upto <= ends[p]
    assert "draining" in ingestd.output()


def test_term_while_a_rebalance_is_stuck_still_drains(topic_factory: Callable[..., str],
                                                      broker_url: str) -> None:
    """Another member of the group (another host, or a worker SIGKILLed in the middle of a
    join) does not answer a rebalance; a TERM must still end ingestd cleanly."""
    topic = topic_factory(partitions=4)
    g = stack.group()

    def member() -> Consumer:
        return Consumer({"bootstrap.servers": stack.BOOTSTRAP, "group.id": g,
                         "partition.assignment.strategy": "cooperative-sticky",
                         "enable.auto.commit": False})

    def polled(consumer: Consumer, condition: Callable[[], bool]) -> bool:
        consumer.poll(0.1)  # the topic is empty: this serves the group, nothing else
        return bool(condition())

    stuck, late = member(), member()
    got: list[Any] = []
    try:
        with run(topic, g, broker_url, "--drain-timeout", "10") as ingestd:
            settled(ingestd, topic, 4, 1)
            for p in range(4):  # so that the worker has an offset to commit on every partition
                stack.produce(topic, records(250, 250 * p), partition=p)
            wait_ids(broker_url, produced_ids(topic, 4))
            stuck.subscribe([topic], on_assign=lambda _c, ps: got.append(ps))
            assert stack.wait_until(lambda: polled(stuck, lambda: any(got)), 60)
            # ``stuck`` polls no more: it cannot take part in the next rebalance
            late.subscribe([topic])
            assert stack.wait_until(lambda: polled(late, lambda: len(ownership(ingestd)[0]) == 1),
                                    60), ownership(ingestd)
            ingestd.signal(signal.SIGTERM)
            code = ingestd.wait(60)
    finally:
        late.close()
        stuck.close()
    assert code == 0, ingestd.output()[-3000:]


# --- 5. HUP ---------------------------------------------------------------------


def test_hup_replaces_every_worker_one_at_a_time(topic_factory: Callable[..., str],
                                                 broker_url: str) -> None:
    topic = topic_factory(partitions=4)
    n = 40_000
    client = redis.Redis.from_url(broker_url)
    with run(topic, stack.group(), broker_url, "--workers", "2", "--batch-size", "500") as ingestd:
        settled(ingestd, topic, 4, 2)
        stack.produce(topic, records(n))
        assert stack.wait_until(lambda: client.llen("celery") >= 2000, 60)
        old = set(ingestd.worker_pids())
        ingestd.signal(signal.SIGHUP)
        assert stack.wait_until(lambda: len(ingestd.worker_pids()) == 2
                                and not old & set(ingestd.worker_pids()), 90), \
            ingestd.output()[-3000:]
        stack.produce(topic, records(n // 4, n))
        ids = wait_ids(broker_url, produced_ids(topic, 4))
        settled(ingestd, topic, 4, 2)
        stop(ingestd)
    assert set(ids) == produced_ids(topic, 4)
    assert duplicates(ids) == 0
    lines = supervisor_lines(ingestd)
    (hup,) = [i for i, line in enumerate(lines) if line.startswith("HUP")]
    after = lines[hup:]
    ended = [next(i for i, line in enumerate(after) if (m := ENDED.match(line)) and
                  int(m[2]) == pid) for pid in sorted(old)]
    started = [i for i, line in enumerate(after) if STARTED.match(line)]
    assert len(started) == 2, after
    # one at a time: the second old worker is stopped only after the first one's successor
    assert ended[0] < started[0] < ended[1] < started[1] or \
        ended[1] < started[0] < ended[0] < started[1], after


# --- 6. TTIN / TTOU ----------------------------------------------------------------


def test_ttin_and_ttou_change_the_worker_count(topic_factory: Callable[..., str],
                                               broker_url: str) -> None:
    topic = topic_factory(partitions=4)
    step = 5000
    with run(topic, stack.group(), broker_url, "--workers", "2", *SESSION) as ingestd:
        settled(ingestd, topic, 4, 2)
        stack.produce(topic, records(step))
        wait_ids(broker_url, produced_ids(topic, 4))

        ingestd.signal(signal.SIGTTIN)
        assert stack.wait_until(lambda: len(ingestd.worker_pids()) == 3, 30)
        settled(ingestd, topic, 4, 3)
        stack.produce(topic, records(step, step))
        wait_ids(broker_url, produced_ids(topic, 4))

        ingestd.signal(signal.SIGTTOU)
        assert stack.wait_until(lambda: len(ingestd.worker_pids()) == 2, 60)
        ingestd.signal(signal.SIGTTOU)
        assert stack.wait_until(lambda: len(ingestd.worker_pids()) == 1, 60)
        last = ingestd.worker_pids()
        ingestd.signal(signal.SIGTTOU)  # one worker is the least
        assert stack.wait_until(lambda: supervisor_lines(ingestd).count("workers now 1") == 2, 30)
        assert ingestd.worker_pids() == last
        stack.produce(topic, records(step, 2 * step))
        ids = wait_ids(broker_url, produced_ids(topic, 4))
        settled(ingestd, topic, 4, 1)
        stop(ingestd)
    assert set(ids) == produced_ids(topic, 4) and len(set(ids)) == 3 * step


def test_ttin_in_static_mode_reshares_the_partitions(topic_factory: Callable[..., str],
                                                     broker_url: str) -> None:
    topic = topic_factory(partitions=6)
    step = 6000
    args = ("--workers", "2", "--assignment", "static")
    with run(topic, stack.group(), broker_url, *args) as ingestd:
        stack.produce(topic, records(step))
        wait_ids(broker_url, produced_ids(topic, 6))
        assert partitions_of(ownership(ingestd)) == shares(topic, 6, 2)
        old = set(ingestd.worker_pids())
        ingestd.signal(signal.SIGTTIN)
        assert stack.wait_until(lambda: len(ingestd.worker_pids()) == 3
                                and not old & set(ingestd.worker_pids()), 60)
        assert stack.wait_until(lambda: partitions_of(ownership(ingestd)) ==
                                shares(topic, 6, 3), 60), ownership(ingestd)
        stack.produce(topic, records(step, step))
        ids = wait_ids(broker_url, produced_ids(topic, 6))
        stop(ingestd)
    assert set(ids) == produced_ids(topic, 6)


# --- 7. two instances ------------------------------------------------------------


def test_two_instances_share_the_group_and_take_over_on_stop(
        topic_factory: Callable[..., str], broker_url: str) -> None:
    topic = topic_factory(partitions=4)
    g, tag = stack.group(), uuid.uuid4().hex[:6]
    step = 3000
    a = run(topic, g, broker_url, "--instance-id", f"a-{tag}", *SESSION)
    b = run(topic, g, broker_url, "--instance-id", f"b-{tag}", *SESSION)
    results = redis.Redis.from_url(broker_url)
    with stack.celery_worker(broker_url), a, b:
        def split() -> bool:
            owned_a, owned_b = ownership(a).get(0, set()), ownership(b).get(0, set())
            return (len(owned_a) == len(owned_b) == 2 and not owned_a & owned_b)
        assert stack.wait_until(split, 90), (ownership(a), ownership(b))
        stack.produce(topic, records(step))
        assert stack.wait_until(lambda: results.hlen(reference_tasks.SCORES_KEY) >= step, 120)

        stop(a)
        stack.produce(topic, records(step, step))
        assert stack.wait_until(lambda: is_partitioned(ownership(b), topic, 4, 1), 90), \
            ownership(b)
        expected = produced_ids(topic, 4)
        assert stack.wait_until(
            lambda: results.hlen(reference_tasks.SCORES_KEY) >= len(expected), 120)
        stop(b)
    ran = {k.decode() for k in results.hkeys(reference_tasks.SCORES_KEY)}
    assert ran == expected and len(ran) == 2 * step
    executed = int(results.get(reference_tasks.EXECUTED_KEY) or 0)
    assert executed == len(ran), f"{executed - len(ran)} repeats"


def test_drained_instance_leaves_the_group(topic_factory: Callable[..., str],
                                           broker_url: str) -> None:
    """TERM leaves the group, although workers are static members (which send no
    LeaveGroup on close): the other instance takes over without a session timeout."""
    topic = topic_factory(partitions=4)
    g, tag = stack.group(), uuid.uuid4().hex[:6]
    a = run(topic, g, broker_url, "--instance-id", f"a-{tag}")
    b = run(topic, g, broker_url, "--instance-id", f"b-{tag}")
    with a, b:
        assert stack.wait_until(lambda: ownership(a).get(0) and ownership(b).get(0), 90)
        stop(a)
        (described,) = stack.admin().describe_consumer_groups([g]).values()
        members = {m.group_instance_id for m in described.result(timeout=30).members}
        stop(b)
    assert members == {f"b-{tag}-0"}


# --- 8. workers that cannot boot ---------------------------------------------------


def test_worker_that_cannot_boot_stops_ingestd_with_code_3(topic_factory: Callable[..., str],
                                                          redis_db: int) -> None:
    """A broker URL option kombu does not know passes the configuration check (the
    supervisor imports no Celery) and fails in the worker, when it builds its dispatcher."""
    topic = topic_factory(partitions=2)
    g = stack.group()
    url = stack.redis_url(redis_db) + "?no_such_option=1"
    ingestd = run(topic, g, url, "--workers", "2")
    try:
        with ingestd:
            assert ingestd.wait(60) == 3, ingestd.output()[-3000:]
    finally:
        kill_survivors(g)
    lines = supervisor_lines(ingestd)
    assert any(re.fullmatch(r"worker \d could not boot \(exit 3\); stopping", m) for m in lines)
    assert "cannot boot" in ingestd.output() and "no_such_option" in ingestd.output()
    assert not any("restarting" in m for m in lines)


def test_worker_dying_before_it_beats_stops_ingestd_instead_of_looping(
        topic_factory: Callable[..., str], broker_url: str) -> None:
    """A worker that dies before its first beat with no word why (here it ``_exit``s while
    it looks its schema up) is restarted with backoff a few times, then ingestd gives up."""
    topic = topic_factory(partitions=1)
    g = stack.group()
    ingestd = run(topic, g, broker_url, "--schema", "tests.boot_hooks:Crashing")
    try:
        with ingestd:
            assert ingestd.wait(90) == 3, ingestd.output()[-3000:]
    finally:
        kill_survivors(g)
    lines = supervisor_lines(ingestd)
    assert "worker 0 died 5 times in a row before it ran; stopping" in lines, lines
    assert sum("died (exit code 70); restarting" in m for m in lines) == 4, lines


def test_quit_stops_at_once_and_leaves_no_worker_behind(topic_factory: Callable[..., str],
                                                        broker_url: str) -> None:
    topic = topic_factory(partitions=2)
    g = stack.group()
    ingestd = run(topic, g, broker_url, "--workers", "2")
    try:
        with ingestd:
            assert stack.wait_until(lambda: is_partitioned(ownership(ingestd), topic, 2, 2), 60)
            ingestd.signal(signal.SIGQUIT)
            assert ingestd.wait(30) == 0
        left = stack.survivors(g)
    finally:
        kill_survivors(g)
    assert left == []


def test_term_while_workers_boot_is_a_clean_stop(topic_factory: Callable[..., str],
                                                 broker_url: str, tmp_path: Path) -> None:
    topic = topic_factory(partitions=2)
    g = stack.group()
    env = {"INGESTD_TEST_BOOT_MARKS": str(tmp_path), "INGESTD_TEST_BOOT_SLEEP": "5"}
    ingestd = run(topic, g, broker_url, "--workers", "2", "--schema", "tests.boot_hooks:Slow",
                  env=env)
    try:
        with ingestd:
            assert stack.wait_until(lambda: len(list(tmp_path.glob("booting-*"))) == 2, 30)
            ingestd.signal(signal.SIGTERM)
            code = ingestd.wait(60)
    finally:
        kill_survivors(g)
    assert code == 0, ingestd.output()[-3000:]


# --- 9. systemd notify -------------------------------------------------------------


def read_datagrams(sock: socket.socket, into: list[dict[str, str]]) -> None:
    while True:
        try:
            data = sock.recv(4096)
        except (BlockingIOError, TimeoutError):
            return
        into.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


def test_systemd_notify_ready_status_watchdog_stopping(topic_factory: Callable[..., str],
                                                       broker_url: str, tmp_path: Path) -> None:
    topic = topic_factory(partitions=2)
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"}
    got: list[dict[str, str]] = []

    def seen(key: str, value: str | None = None, count: int = 1) -> bool:
        read_datagrams(sock, got)
        return sum(key in m and (value is None or m[key] == value) for m in got) >= count

    try:
        ingestd = run(topic, stack.group(), broker_url, "--workers", "2", env=env)
        ingestd.env.pop("WATCHDOG_PID", None)  # set, it would name the process to ping for
        with ingestd:
            assert stack.wait_until(lambda: seen("READY"), 60), got
            assert stack.wait_until(lambda: seen("STATUS", "2/2 workers ready"), 60), got
            before = sum("WATCHDOG" in m for m in got)
            assert stack.wait_until(lambda: seen("WATCHDOG", count=before + 2), 30), got
            settled(ingestd, topic, 2, 2)
            ingestd.signal(signal.SIGTERM)
            assert ingestd.wait(60) == 0
            read_datagrams(sock, got)
    finally:
        sock.close()
    (ready,) = [m for m in got if "READY" in m]
    assert ingestd.proc is not None
    assert ready["READY"] == "1" and ready["MAINPID"] == str(ingestd.proc.pid)
    assert re.fullmatch(r"\d/2 workers ready.*", ready["STATUS"]), ready
    assert all(m["WATCHDOG"] == "1" for m in got if "WATCHDOG" in m)
    first_ready = got.index(ready)
    stopping = [i for i, m in enumerate(got) if m.get("STOPPING") == "1"]
    assert len(stopping) == 1 and stopping[0] > first_ready
    assert got[stopping[0]].get("STATUS") == "draining"
    statuses = [m["STATUS"] for m in got[first_ready:stopping[0]] if "STATUS" in m]
    assert "2/2 workers ready" in statuses


# --- 10. /readyz ----------------------------------------------------------------------


def test_readyz_is_200_once_every_worker_is_ready(topic_factory: Callable[..., str],
                                                  broker_url: str) -> None:
    topic = topic_factory(partitions=4)
    port = stack.free_port()
    base = f"http://127.0.0.1:{port}"
    with run(topic, stack.group(), broker_url, "--workers", "3",
             "--metrics-addr", f"127.0.0.1:{port}") as ingestd:
        assert stack.wait_until(lambda: stack.http_get(f"{base}/healthz")[0] == 200, 30)
        assert stack.wait_until(lambda: stack.http_get(f"{base}/readyz")[0] == 200, 90), \
            stack.http_get(f"{base}/readyz")
        status, body = stack.http_get(f"{base}/readyz")
        assert status == 200 and orjson.loads(body) == {"ready": True, "workers": {}}
        status, metrics = stack.http_get(f"{base}/metrics")
        assert status == 200 and b"ingestd_workers_alive 3.0" in metrics
        settled(ingestd, topic, 4, 3)
        unready: list[bytes] = []

        def answers_503() -> bool:
            status, body = stack.http_get(f"{base}/readyz")
            if status == 503:
                unready.append(body)
            return status == 503

        os.kill(ingestd.worker_pids()[0], signal.SIGKILL)
        assert stack.wait_until(answers_503, 30)
        doc = orjson.loads(unready[0])
        assert doc["ready"] is False and doc["workers"], doc  # names the worker and why
        assert stack.wait_until(lambda: stack.http_get(f"{base}/readyz")[0] == 200, 90)
        settled(ingestd, topic, 4, 3)
        stop(ingestd)
