"""The fault checker on hand-made inputs: no stack needed."""

from __future__ import annotations

from collections.abc import Collection

from ingestd.tools.checker import Record, by_partition, check, parse_id, ranges, record_id

T = "t-abc"


def produced(ends: dict[int, int], poison: frozenset[Record] = frozenset()) -> dict[Record, bool]:
    return {(T, p, o): (T, p, o) not in poison for p, end in ends.items() for o in range(end)}


def ran(records: dict[Record, bool], skip: Collection[Record] = (),
        twice: Collection[Record] = ()) -> dict[str, int]:
    """What a celery worker that ran every valid record (but ``skip``) records."""
    return {record_id(r): 2 if r in twice else 1 for r, valid in records.items()
            if valid and r not in skip}


def letters(records: dict[Record, bool]) -> list[Record]:
    return [r for r, valid in records.items() if not valid]


POISON = frozenset({(T, 0, 3), (T, 1, 0)})


def test_a_clean_run_passes() -> None:
    records = produced({0: 10, 1: 5}, POISON)
    report = check(records, ran(records), letters(records), {(T, 0): 10, (T, 1): 5})
    assert report.failures() == []
    assert (report.produced, report.valid, report.executed, report.dead_lettered) == \
        (15, 13, 13, 2)
    assert report.summary() == ("produced 15 (13 valid, 2 poison); executed 13, "
                                "dead-lettered 2; lost 0; duplicates 0 (dead letters 0)")


def test_lost_records_are_shown_as_ranges_per_partition() -> None:
    records = produced({0: 3000, 1: 10}, POISON)
    missing = {(T, 0, o) for o in (*range(1200, 1500), 2999)} | {(T, 1, 7)}
    report = check(records, ran(records, skip=missing), letters(records),
                   {(T, 0): 1200, (T, 1): 7})
    assert report.failures() == ["lost 302: p0: 1200-1499, 2999; p1: 7"]


def test_a_lost_dead_letter_is_lost_too() -> None:
    records = produced({0: 5}, POISON)
    report = check(records, ran(records), [], {(T, 0): 3})
    assert report.lost == [(T, 0, 3)]
    assert report.over_committed == {}


def test_a_commit_past_an_undelivered_record_is_over_committed() -> None:
    records = produced({0: 100, 1: 100})
    missing = {(T, 0, o) for o in range(40, 60)}
    report = check(records, ran(records, skip=missing), [], {(T, 0): 100, (T, 1): 100})
    assert report.over_committed == {(T, 0): (100, 40)}
    assert "over-committed: p0 committed 100 past undelivered offset 40" in report.failures()


def test_a_commit_beyond_the_end_is_over_committed() -> None:
    records = produced({0: 10})
    report = check(records, ran(records), [], {(T, 0): 11, (T, 1): -1001})
    assert report.over_committed == {(T, 0): (11, 10)}


def test_a_commit_short_of_the_end_is_allowed() -> None:
    records = produced({0: 10})
    assert check(records, ran(records), [], {(T, 0): 4}).failures() == []


def test_duplicates_fail_beyond_the_bound_only() -> None:
    records = produced({0: 10, 1: 10}, POISON)
    twice = {(T, 0, o) for o in range(4, 8)}
    report = check(records, ran(records, twice=twice), [*letters(records), (T, 1, 0)],
                   {(T, 0): 10, (T, 1): 10})
    assert report.extra_executions == 4 and report.extra_dead_letters == 1
    assert report.failures() == ["duplicate executions 4 > 0: p0: 4-7",
                                 "duplicate dead letters 1 > 0: p1: 0"]
    assert report.failures(max_duplicates=4) == []
    assert report.failures(max_duplicates=None) == []
    assert "duplicates (allowed): p0: 4-7" in report.explain(max_duplicates=None)


def test_valid_dead_lettered_and_poison_executed_are_misrouted() -> None:
    records = produced({0: 6}, frozenset({(T, 0, 5)}))
    executed = {**ran(records, skip={(T, 0, 2)}), record_id((T, 0, 5)): 1}
    report = check(records, executed, [(T, 0, 2)], {(T, 0): 6})
    assert report.lost == []
    assert report.failures() == ["valid but dead-lettered 1: p0: 2",
                                 "poison but executed 1: p0: 5"]


def test_executions_never_produced_are_unexpected() -> None:
    records = produced({0: 2})
    executed = {**ran(records), f"{T}-0-9": 1, "stack-test-1": 1}
    report = check(records, executed, [("other", 0, 0)], {(T, 0): 2})
    assert report.unexpected == ["other-0-0", "stack-test-1", f"{T}-0-9"]
    assert report.failures()[0].startswith("unexpected 3: ")


def test_ids_and_ranges() -> None:
    assert parse_id("t-a-b-12-345") == ("t-a-b", 12, 345)
    assert parse_id("t-0-10-19") == ("t-0", 10, 19)  # a batch task's id reads as another topic
    assert parse_id("stack-batch") is None
    assert parse_id("-1-2") is None
    assert record_id(("t-x", 3, 7)) == "t-x-3-7"
    assert ranges([7, 3, 1, 2, 2]) == "1-3, 7"
    assert ranges(range(0, 40, 2), limit=3) == "0, 2, 4, ... (17 more ranges)"
    assert by_partition([("a", 1, 5), ("a", 0, 1), ("a", 0, 2)]) == "p0: 1-2; p1: 5"
    assert by_partition([("a", 0, 1), ("b", 0, 1)]) == "a p0: 1; b p0: 1"
