"""What dead workers held, and what two deaths quarantine."""

from __future__ import annotations

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
