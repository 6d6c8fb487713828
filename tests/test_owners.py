"""The ownership watcher's bookkeeping, with the cluster's answer faked at its seam
(``owners.unowned``); the end-to-end case (a worker killed in the middle of a rebalance)
is in the fault suite."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ingestd.config import Config
from ingestd.heartbeat import READY
from ingestd.supervisor import owners


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def watcher(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[owners.Watcher, Clock,
                                                               dict[str, list[int]]]]:
    answer: dict[str, list[int]] = {"t": []}
    clock = Clock()
    monkeypatch.setattr(owners, "unowned", lambda *_a: answer)
    monkeypatch.setattr(owners.time, "monotonic", clock)
    monkeypatch.setattr(owners, "AdminClient", lambda _props: None)
    beats: list[str] = []
    yield owners.Watcher(Config(topic=("t",), group_id="g"), beats.append), clock, answer


def gauge(topic: str) -> Any:
    from ingestd import metrics

    return metrics.unowned_partitions.labels(topic)._value.get()


def test_partitions_without_an_owner_are_counted_at_once_and_told_after_the_grace(
        watcher: tuple[owners.Watcher, Clock, dict[str, list[int]]],
        caplog: pytest.LogCaptureFixture) -> None:
    w, clock, answer = watcher
    answer["t"] = [0, 1]
    with caplog.at_level(logging.INFO, logger="ingestd.owners"):
        w.check()
        assert gauge("t") == 2 and w.status == READY  # a rebalance may be moving them
        clock.now += owners.GRACE - 1
        w.check()
        assert w.status == READY and not caplog.records
        clock.now += 1
        w.check()
        assert "2 partitions of group 'g' without an owner for 15s: t[0], t[1]" in w.status
        assert [r.getMessage() for r in caplog.records] == [w.status]
        clock.now += owners.CHECK_INTERVAL
        w.check()  # told once, not on every check
        assert len(caplog.records) == 1
        answer["t"] = []
        w.check()
    assert gauge("t") == 0 and w.status == READY
    assert caplog.records[-1].getMessage() == "every partition has an owner again"


def test_a_partition_that_found_an_owner_starts_its_grace_anew(
        watcher: tuple[owners.Watcher, Clock, dict[str, list[int]]]) -> None:
    w, clock, answer = watcher
    answer["t"] = [3]
    w.check()
    clock.now += owners.GRACE - 1
    answer["t"] = []
    w.check()
    answer["t"] = [3]
    clock.now += 2
    w.check()
    assert w.status == READY


def test_a_cluster_that_does_not_answer_in_time_is_logged_not_fatal(
        watcher: tuple[owners.Watcher, Clock, dict[str, list[int]]],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The admin future's timeout (the group coordinator's node just died) is logged, as
    Kafka's own errors are; the watcher asks again at its next check."""
    import concurrent.futures

    def late(*_a: Any) -> dict[str, list[int]]:
        raise concurrent.futures.TimeoutError()

    from ingestd import metrics

    w, _, _ = watcher
    w.check()
    checked = metrics.owners_checked._value.get()
    assert abs(checked - time.time()) < 60  # the answer's time, for `ingestd status`
    monkeypatch.setattr(owners, "unowned", late)
    with caplog.at_level(logging.WARNING, logger="ingestd.owners"):
        w.check()
    assert w.status == READY
    assert metrics.owners_checked._value.get() == checked  # no answer: the old one's age
    assert "cannot ask the cluster who owns which partition: no answer" in caplog.text
