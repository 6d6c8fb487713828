"""What dead workers held, and what two deaths quarantine."""

from __future__ import annotations

import os

from confluent_kafka import Message

from ingestd.quarantine import Holding, Quarantine, Range, Suspects, ranges_of


def _msgs(*spec: tuple[str, int, int]) -> list[Message]:
    return [Message(topic=t, partition=p, offset=o, value=b"v", timestamp=(1, 1))
            for t, p, o in spec]


def test_ranges_of_a_batch_follow_runs_of_a_partition() -> None:
    msgs = _msgs(("a", 0, 5), ("a", 0, 6), ("b", 0, 9), ("a", 1, 2), ("a", 0, 7), ("b", 0, 10))
    assert sorted(ranges_of(msgs)) == [Range("a", 0, 5, 7), Range("a", 1, 2, 2),
                                       Range("b", 0, 9, 10)]
    assert ranges_of([]) == []


def test_holding_is_read_back_as_written() -> None:
    holding = Holding()
    try:
        assert holding.held() == []
        held = [Range("t-1.x", 3, 10, 20), Range("u", 0, 0, 0)]
        holding.hold(held)
        assert holding.held() == held
        holding.hold([])
        assert holding.held() == []
    finally:
        holding.close()


def test_two_deaths_quarantine_what_both_held() -> None:
    suspects = Suspects()
    assert suspects.died_holding([Range("t", 0, 100, 199), Range("t", 1, 0, 50)]) == []
    # Held again, cut differently: only what both held is quarantined.
    assert suspects.died_holding([Range("t", 0, 150, 299)]) == [Range("t", 0, 150, 199)]
    # A third death on the same records adds nothing new.
    assert suspects.died_holding([Range("t", 0, 160, 170)]) == []
    assert suspects.died_holding([Range("u", 0, 150, 199)]) == []  # another topic
    assert suspects.quarantined == [Range("t", 0, 150, 199)]
    quarantine = Quarantine(suspects.quarantined)
    assert quarantine and not Quarantine([])
    assert [o for o in range(140, 210) if quarantine.holds("t", 0, o)] == list(range(150, 200))
    assert not quarantine.holds("t", 1, 160) and not quarantine.holds("u", 0, 160)


def test_a_torn_holding_file_reads_as_written_or_as_nothing() -> None:
    """A worker killed between the write and the truncation leaves the old file's tail;
    one killed mid-write, or a file of something else, holds nothing: no exception
    reaches the supervisor."""
    holding = Holding()
    try:
        holding.hold([Range("t", 0, 100, 199), Range("t", 1, 5, 9), Range("u", 2, 0, 0)])
        os.pwrite(holding.fd, b"12\nt 0 300 399\n", 0)  # written, not yet truncated
        assert holding.held() == [Range("t", 0, 300, 399)]
        for junk in (b"40\nt 0 1", b"x\n", b"3\n\xff\xfe\n", b"9\nt 0 a b\n"):
            os.pwrite(holding.fd, junk, 0)
            os.ftruncate(holding.fd, len(junk))
            assert holding.held() == []
    finally:
        holding.close()


def test_what_one_death_held_is_suspected_and_taken_one_record_at_a_time() -> None:
    from ingestd.config import Config
    from ingestd.worker.feed import Feed

    suspects = Suspects()
    suspects.died_holding([Range("t", 0, 10, 19)])
    quarantine = suspects.quarantine()
    assert not quarantine
    assert quarantine.suspects("t", 0, 15) and not quarantine.suspects("t", 0, 20)
    feed = Feed(None, Config(), 1000, quarantine,  # type: ignore[arg-type]
                lambda: False, lambda: False)

    def next_batch(consumed: list[Message]) -> list[int]:  # as next() hands the carry on
        feed.carry, feed.suspect = [], False
        return [m.offset() for m in feed._alone(consumed)]

    assert next_batch(_msgs(*(("t", 0, o) for o in range(5, 25)))) == list(range(5, 10))
    assert not feed.suspect
    assert next_batch(feed.carry) == [10] and feed.suspect  # published once 5-9 are committed
    assert next_batch(feed.carry) == [11] and feed.suspect
    assert [m.offset() for m in feed.carry] == list(range(12, 25))
    assert next_batch(_msgs(("t", 0, 20), ("t", 1, 12))) == [20, 12]
    assert not feed.suspect
    # The second death, on one record alone: that record is quarantined, and only it.
    assert suspects.died_holding([Range("t", 0, 15, 15)]) == [Range("t", 0, 15, 15)]
    quarantine = suspects.quarantine()
    assert [o for o in range(30) if quarantine.holds("t", 0, o)] == [15]
