"""Records that anyone can produce never stop ingestion: real Kafka, real Redis.

Each test produces poison among valid records and checks that every record is
accounted for (a task or a dead letter) and that the offsets are committed to
the end. No worker dies on the way, except of the poison that kills it on
purpose (``tests/poison.py``): then the quarantine must end the crash loop.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from benchmarks import measure
from ingestd import dlq
from ingestd.celery import codec
from tests import stack
from tests.test_worker import wait_queue

if TYPE_CHECKING:
    from tests.conftest import PrivateRedis

BIG_TOPIC = {"max.message.bytes": str(2 * 1024 * 1024)}  # a topic that allows 2 MiB
BIG_PRODUCER = {"message.max.bytes": 2_100_000}


def run_until(topic: str, broker_url: str, tasks: int, letters: int,
              *extra: str) -> tuple[list[Any], stack.Ingestd, list[int]]:
    """Run one worker until ``tasks`` tasks are queued and ``letters`` dead letters were
    delivered; return the letters, the stopped ingestd and the worker pids seen."""
    g = stack.group()
    with stack.Ingestd(*stack.ingestd_args(topic, g, broker_url, *extra)) as ingestd:
        wait_queue(broker_url, tasks)
        got = stack.consume_all(f"{topic}.dlq", letters)
        pids = ingestd.worker_pids()
        assert stack.wait_until(
            lambda: sum(stack.committed_offsets(g, topic, 1).values()) ==
            sum(stack.end_offsets(topic, 1).values()), 30)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()[-3000:]
    assert len(got) == letters
    assert len(stack.queued_tasks(broker_url)) == tasks
    return got, ingestd, pids


def headers_of(msg: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in msg.headers()}


@pytest.mark.parametrize("case", ["producer-limit", "broker-limit", "fits"])
def test_a_dead_letter_too_large_for_kafka_is_delivered_without_its_value(
        topic_factory: Callable[..., str], broker_url: str, case: str) -> None:
    """A 999,000-byte non-JSON record and a 1.5 MB record on a topic that allows 2 MB.
    ``producer-limit``: the dead-letter producer's own message.max.bytes (1,000,000)
    refuses the 1.5 MB letter; ``broker-limit``: ``-X message.max.bytes`` lifts it for
    both, and the dead-letter topic (1 MiB, the broker's default) refuses it;
    ``fits``: the dead-letter topic allows 2 MiB too, and the letter is whole."""
    topic = topic_factory(config=BIG_TOPIC)
    dead = f"{topic}.dlq"
    if case == "fits":
        topic_factory(name=dead, config=BIG_TOPIC)
    big_json = b'{"pad": "' + b"x" * 1_500_000 + b'"}'
    values = [stack.signal_record(0), b"x" * 999_000, big_json, stack.signal_record(3)]
    stack.produce(topic, values, partition=0, keys=[b"k0", b"k1", b"k2", b"k3"],
                  headers=[None, [("h", b"1")], [("h", b"2")], None], props=BIG_PRODUCER)
    extra = [] if case == "producer-limit" else ["-X", "message.max.bytes=2000000"]
    try:
        letters, ingestd, pids = run_until(topic, broker_url, 2, 2, *extra)
    finally:
        if case != "fits":
            stack.delete_topic(dead)
    assert len(pids) == 1 and "died" not in ingestd.output()
    for msg, (offset, reason) in zip(letters, [(1, "decode"), (2, "too_large")], strict=True):
        headers = headers_of(msg)
        assert headers[dlq.ERROR] == reason and headers[dlq.OFFSET] == str(offset)
        assert msg.key() == f"k{offset}".encode()
        assert msg.headers()[0] == ("h", str(offset).encode())
        original = values[offset]
        if msg.value() == original:
            assert dlq.VALUE_OMITTED not in headers
        else:
            assert msg.value() == b"" and headers[dlq.VALUE_OMITTED] == str(len(original))
    whole = case == "fits"
    assert (letters[1].value() == big_json) is whole, headers_of(letters[1])


@pytest.mark.parametrize("dispatch", ["each", "batch"])
def test_an_exception_while_validating_one_record_dead_letters_it_as_internal(
        topic_factory: Callable[..., str], broker_url: str, dispatch: str) -> None:
    topic = topic_factory()
    values = [stack.signal_record(0), stack.signal_record(1, name="raise"),
              stack.signal_record(2)]
    stack.produce(topic, values, partition=0)
    tasks = 2 if dispatch == "each" else 1
    letters, ingestd, pids = run_until(topic, broker_url, tasks, 1, "--schema",
                                       "tests.poison:Raising", "--dispatch", dispatch)
    assert len(pids) == 1 and "died" not in ingestd.output()
    headers = headers_of(letters[0])
    assert headers[dlq.ERROR] == "internal" and headers[dlq.OFFSET] == "1"
    assert headers[dlq.DETAIL] == "RuntimeError: the schema's own bug"
    assert letters[0].value() == values[1]
    ids = sorted(i for t in stack.queued_tasks(broker_url)
                 for i in (t.get("ingestd_record_ids") or [t["id"]]))
    assert ids == [f"{topic}-0-0", f"{topic}-0-2"]


def pathological(i: int, size: int = 1_000_000) -> bytes:
    """A valid signal of about ``size`` bytes that decodes to some 20 times as much:
    hundreds of thousands of empty lists."""
    head = stack.signal_record(i)[:-1] + b', "x": ['
    return head + b",".join([b"[]"] * ((size - len(head)) // 3)) + b"]}"


@pytest.mark.parametrize("kind", ["over-the-item-limit", "under-the-item-limit"])
def test_pathological_records_keep_memory_bounded(topic_factory: Callable[..., str],
                                                  broker_url: str, kind: str,
                                                  extra: tuple[str, ...] = ()) -> None:
    """``over``: 100 valid 1 MB records that decode to ~20 MB each, mixed into 20,000
    normal ones, are refused as too_large by --max-record-items. ``under``: 1,000 records
    in a row, of 9,900 items each (15 KB that decode to 330 KB), are dispatched;
    --max-batch-bytes keeps few of them in a batch (a batch of 1,000 would hold 330 MB).
    Either way a worker's peak RSS stays under 250 MB."""
    topic = topic_factory(partitions=2, config=BIG_TOPIC)
    over = kind == "over-the-item-limit"
    n, bad = (20_000, set(range(100, 20_000, 200))) if over else (21_000, set(range(1000, 2000)))
    size = 1_000_000 if over else 14_900
    values = [pathological(i, size) if i in bad else stack.signal_record(i) for i in range(n)]
    stack.produce(topic, values, props=BIG_PRODUCER)
    g = stack.group()
    with stack.Ingestd(*stack.ingestd_args(topic, g, broker_url, *extra)) as ingestd:
        wait_queue(broker_url, n - len(bad) if over else n, timeout=180)
        letters = stack.consume_all(f"{topic}.dlq", len(bad), timeout=120) if over else []
        (pid,) = ingestd.worker_pids()
        peak = measure.peak_rss_mb(pid)
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()[-3000:]
    if over:
        stack.delete_topic(f"{topic}.dlq")
        assert len(letters) == len(bad)
        assert {headers_of(m)[dlq.ERROR] for m in letters} == {"too_large"}
    assert "died" not in ingestd.output()
    print(f"{kind}: peak RSS of the worker {peak:.0f} MB")
    assert peak < 250, peak


@pytest.mark.parametrize(("poison_name", "death", "extra"), [
    ("kill", "signal SIGKILL", ()),
    ("kill", "signal SIGKILL", ("--dispatch", "batch", "--with-metadata")),
    ("spin", "stuck for", ())])
def test_a_record_that_kills_its_worker_twice_is_dead_lettered(
        topic_factory: Callable[..., str], broker_url: str, poison_name: str,
        death: str, extra: tuple[str, ...]) -> None:
    """A record in the middle of a full batch SIGKILLs its worker
    (``tests.poison:Killing``), as the OOM killer would, or makes it spin
    (``tests.poison:Spinning``) until the supervisor kills it as stuck: nothing ingestd
    can catch. The restarted worker takes the batch the dead one held one record at a
    time, and dies again on that record alone; the supervisor quarantines it, the next
    worker dead-letters it as ``internal``, and every other record is dispatched. No
    worker dies after that."""
    topic = topic_factory()
    n, poison = 1000, 500
    values = [stack.signal_record(i, name=poison_name) if i == poison else stack.signal_record(i)
              for i in range(n)]
    stack.produce(topic, values, partition=0)
    g = stack.group()
    schema = "tests.poison:" + ("Killing" if poison_name == "kill" else "Spinning")
    port = stack.free_port()
    args = stack.ingestd_args(topic, g, broker_url, "--schema", schema, "--worker-timeout", "3",
                              "--batch-size", str(n), "--metrics-addr", f"127.0.0.1:{port}",
                              *extra)
    with stack.Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: stack.committed_offsets(g, topic, 1) == {0: n}, 120), \
            ingestd.output()[-3000:]
        metrics = stack.http_get(f"http://127.0.0.1:{port}/metrics")[1].decode()
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()[-3000:]
    out = ingestd.output()
    assert out.count(death) == 2, out[-3000:]
    stuck = 2 if poison_name == "spin" else 0
    assert f"ingestd_worker_stuck_kills_total {stuck}.0" in metrics.splitlines(), metrics
    assert "ingestd_worker_restarts_total 2.0" in metrics.splitlines(), metrics
    assert f"died twice while it held {topic} partition 0 offsets {poison}-{poison}:" in out
    tasks = [rid for t in stack.queued_tasks(broker_url)
             for rid in t.get(codec.RECORD_IDS) or [t["id"]]]
    assert set(tasks) == {f"{topic}-0-{i}" for i in range(n) if i != poison}
    # The killed worker's last batch may have gone out uncommitted: one record, taken alone.
    assert len(tasks) - len(set(tasks)) <= 1
    (letter,) = stack.consume_all(f"{topic}.dlq", 1, timeout=30)
    stack.delete_topic(f"{topic}.dlq")
    assert headers_of(letter)[dlq.OFFSET] == str(poison)
    assert headers_of(letter)[dlq.ERROR] == "internal"
    assert headers_of(letter)[dlq.DETAIL].startswith("skipped: a worker died twice")


def test_a_worker_killed_twice_while_it_waits_for_the_broker_quarantines_nothing(
        topic_factory: Callable[..., str],
        private_redis_factory: Callable[..., PrivateRedis]) -> None:
    """An operator's ``kill -9`` during a broker outage is no evidence against the records:
    a worker holds its batch's offsets for the supervisor only while it decodes and
    builds, not while it waits to publish."""
    topic = topic_factory()
    redis_server = private_redis_factory()
    redis_server.stop()
    n = 100
    stack.produce(topic, [stack.signal_record(i) for i in range(n)], partition=0)
    g = stack.group()
    with stack.Ingestd(*stack.ingestd_args(topic, g, redis_server.url)) as ingestd:
        def kill_while_it_retries(kills: int) -> None:
            assert stack.wait_until(lambda: ingestd.output().count("retrying in") >= kills, 60)
            (pid,) = ingestd.worker_pids()
            os.kill(pid, signal.SIGKILL)
            assert stack.wait_until(lambda: ingestd.worker_pids() not in ([], [pid]), 30)

        kill_while_it_retries(1)
        kill_while_it_retries(2)
        redis_server.start()
        assert stack.wait_until(lambda: stack.committed_offsets(g, topic, 1) == {0: n}, 90), \
            ingestd.output()[-3000:]
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()[-3000:]
    assert ingestd.output().count("died (signal SIGKILL)") == 2
    assert "died twice" not in ingestd.output()
    assert {t["id"] for t in stack.queued_tasks(redis_server.url)} == \
        {f"{topic}-0-{i}" for i in range(n)}
