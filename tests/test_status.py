"""``ingestd status`` against a real ingestd with two workers: what it prints agrees with
``/metrics`` and ``/readyz``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import orjson
import pytest

from ingestd.tools.status import Reading, render, snapshot
from tests import stack
from tests.test_cli import INVALID, MAX_RECORD_BYTES, Ingestd, Samples, run_cli, sample, scrape

pytestmark = pytest.mark.stack


def test_status_agrees_with_metrics_while_two_workers_run(
        topic_factory: Callable[..., str], broker_url: str) -> None:
    topic = topic_factory(partitions=4)
    topic_factory(partitions=1, name=f"{topic}.dlq")
    port = stack.free_port()
    base = f"http://127.0.0.1:{port}"
    args = stack.ingestd_args(topic, stack.group(), broker_url, "--workers", "2",
                              "--metrics-addr", f"127.0.0.1:{port}",
                              "--max-record-bytes", MAX_RECORD_BYTES)
    with Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: stack.http_get(f"{base}/readyz")[0] == 200, 90), \
            ingestd.output()[-3000:]
        # While records flow, the workers report a rate.
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                stack.produce(topic, [stack.signal_record(j) for j in range(i, i + 500)])
                i += 500
                time.sleep(0.05)

        producer = threading.Thread(target=load)
        producer.start()
        try:
            time.sleep(3)
            flowing = orjson.loads(run_cli("status", "--url", base, "--json").stdout)
        finally:
            stop.set()
            producer.join()
        assert sum(w["signals_per_second"] for w in flowing["workers"]) > 0, flowing
        assert flowing["totals"]["consumed"]["per_second"] > 0, flowing

        stack.produce(topic, list(INVALID))
        produced = sum(stack.end_offsets(topic, 4).values())
        assert stack.wait_until(lambda: sample(scrape(base), "ingestd_messages_consumed_total",
                                               topic=topic) == produced, 60)
        # The ownership watcher looks every 5 s: it may have seen the group's first rebalance.
        assert stack.wait_until(lambda: sample(scrape(base), "ingestd_unowned_partitions",
                                               topic=topic) == 0, 30)
        # The lag comes with librdkafka's statistics, every 5 s: the last may predate the
        # last commit.
        assert stack.wait_until(lambda: lag(scrape(base), topic) == 0, 30)
        metrics = scrape(base)
        result = run_cli("status", "--url", base, "--json")
        assert result.returncode == 0, result.stderr
        status = orjson.loads(result.stdout)
        assert status["ready"] is True and status["problems"] == {}
        totals = status["totals"]
        assert totals["consumed"]["count"] == produced
        assert totals["dispatched"]["count"] == sample(
            metrics, "ingestd_messages_dispatched_total", topic=topic,
            task="ingest_and_score_signal") == produced - len(INVALID)
        assert totals["dead_lettered"]["count"] == sample(
            metrics, "ingestd_dlq_produced_total", topic=topic) == len(INVALID)
        assert totals["consumed"]["per_second"] == 0.0  # nothing came during the second
        assert status["unowned_partitions"] == 0 and status["backpressure_paused_workers"] == 0
        assert 0 <= status["unowned_partitions_age_seconds"] < 30  # the watcher asks every 5 s
        assert status["lag"] == 0
        workers = status["workers"]
        assert [w["slot"] for w in workers] == [0, 1]
        assert sorted(w["pid"] for w in workers) == sorted(ingestd.worker_pids())
        owned = sorted(p for w in workers for p in w["partitions"].get(topic, []))
        assert owned == [0, 1, 2, 3]  # every partition, each once
        assert all(w["partitions"] for w in workers)
        assert {w["state"] for w in workers} == {"ready"}
        assert {w["restarts"] for w in workers} == {0}
        per_worker = {(n, dict(labels)["slot"]): v for (n, labels), v in metrics.items()
                      if n == "ingestd_worker_dispatched_total"}
        assert sum(per_worker.values()) == produced - len(INVALID)

        text = run_cli("status", "--url", base)
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0] == f"ingestd at {base}: ready"
        for w in workers:
            assert any(line.split()[:2] == [str(w["slot"]), str(w["pid"])] for line in lines)
        assert any(line.split()[:2] == ["consumed", f"{produced:,}"] for line in lines), lines


def test_status_of_an_unreachable_url_is_one_line_and_exit_1() -> None:
    port = stack.free_port()
    result = run_cli("status", "--url", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"ingestd status: cannot reach http://127.0.0.1:{port}/metrics"), line


def test_status_bad_flag_exits_2_with_one_line() -> None:
    result = run_cli("status", "--bogus")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("ingestd status: error: unrecognized arguments: --bogus"), line


# --- at the seam --------------------------------------------------------------


def reading(at: float, dispatched: float, ready: bool = True) -> Reading:
    return Reading(at, 1_000_000 + at, {
        "ingestd_messages_consumed_total": [({"topic": "t"}, dispatched + 1)],
        "ingestd_messages_dispatched_total": [({"topic": "t", "task": "x"}, dispatched)],
        "ingestd_worker_dispatched_total": [({"slot": "0"}, dispatched)],
        "ingestd_assigned_partitions": [({"slot": "0", "topic": "t", "partition": "1"}, 1.0),
                                        ({"slot": "0", "topic": "t", "partition": "0"}, 0.0)],
        "ingestd_consumer_lag": [({"topic": "t", "partition": "1"}, 7.0)],
        "ingestd_unowned_partitions": [({"topic": "t"}, 2.0)],
        "ingestd_owners_checked_timestamp_seconds": [({}, 1_000_000 + at - 4.0)],
    }, {"ready": ready, "workers": {} if ready else {"1": "not running"},
        "detail": {"workers": [{"slot": 0, "pid": 10, "state": "ready", "restarts": 2},
                               {"slot": 1, "pid": None, "state": "not running", "restarts": 0}]}})


def test_snapshot_rates_partitions_and_lag_per_worker() -> None:
    status = snapshot(reading(12.0, 300.0, ready=False), reading(10.0, 100.0))
    zero, one = status["workers"]
    assert zero == {"slot": 0, "pid": 10, "partitions": {"t": [1]}, "signals_per_second": 100.0,
                    "lag": 7, "restarts": 2, "state": "ready"}
    assert one["partitions"] == {} and one["lag"] == 0 and one["pid"] is None
    assert status["totals"]["dispatched"] == {"count": 300, "per_second": 100.0}
    assert status["ready"] is False and status["problems"] == {"1": "not running"}
    text = render(status, "http://h:1")
    assert text.splitlines()[0] == "ingestd at http://h:1: NOT READY (1: not running)"
    assert "t[1]" in text
    # The watcher's count is not from the rows' snapshot: the line says how old it is.
    assert status["unowned_partitions"] == 2 and status["unowned_partitions_age_seconds"] == 4.0
    assert "partitions without an owner 2 (as the cluster said 4s ago)" in text


def test_snapshot_without_an_ownership_watcher_gives_no_age() -> None:
    before = reading(10.0, 100.0)
    now = reading(12.0, 300.0)
    del now.samples["ingestd_owners_checked_timestamp_seconds"]  # --assignment static
    status = snapshot(now, before)
    assert status["unowned_partitions_age_seconds"] is None
    assert "partitions without an owner 2; restarts" in render(status, "http://h:1")


def lag(samples: Samples, topic: str) -> float:
    """The lag the workers report, over the topic's partitions."""
    return sum(value for (name, labels), value in samples.items()
               if name == "ingestd_consumer_lag" and ("topic", topic) in labels)


def test_snapshot_of_a_share_group_shows_no_partitions_or_lag() -> None:
    """--group-type share: every worker takes records of every partition; the rows and
    the totals say there is no lag or ownership to show, rather than zeros."""
    before, now = reading(10.0, 100.0), reading(12.0, 300.0)
    del now.samples["ingestd_owners_checked_timestamp_seconds"]  # no ownership watcher
    now.readyz["detail"]["group_type"] = "share"
    status = snapshot(now, before)
    assert status["group_type"] == "share"
    assert (status["lag"], status["unowned_partitions"]) == (None, None)
    assert [(w["partitions"], w["lag"]) for w in status["workers"]] == [(None, None)] * 2
    text = render(status, "http://h:1")
    row = next(line for line in text.splitlines() if line.split()[:2] == ["0", "10"])
    assert row.split()[2:5] == ["shared", "100", "-"], row
    assert "share group (every worker takes records of every partition" in text
