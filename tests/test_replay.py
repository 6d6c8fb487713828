"""``ingestd replay`` on the real stack: dead letters written by a real ingestd go back.

Poison of every class is dead-lettered by ``ingestd``, then replayed: a dry run
counts by reason; with ``--schema object`` the schema letters replay and a running
ingestd dispatches them to a real ``celery worker``; a replay stopped by SIGTERM
resumes and produces nothing twice; a letter at the replay limit is skipped.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import pytest
import redis

from ingestd import dlq
from ingestd.celery import reference_tasks
from ingestd.tools.replay import Counts, Options, group_of
from tests import stack
from tests.test_cli import INVALID, MAX_RECORD_BYTES, Ingestd, clean_env, run_cli

pytestmark = pytest.mark.stack
BY_REASON = collections.Counter(INVALID.values())  # decode 2, not_object 2, schema 2, too_large 1
# A schema break that was replayed three times already: the default limit.
AT_LIMIT = (b'{"name": "n", "value": 1, "source": "s", "id": "at-limit"}',
            [(dlq.REPLAY_COUNT, b"3"), ("trace", b"t-1")])


@dataclass
class Poisoned:
    topic: str
    dlq: str
    group: str
    broker_url: str
    valid: int = 0
    dlq_partitions: int = 1

    def replay(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli("replay", "--topic", self.topic, "--bootstrap-servers", stack.BOOTSTRAP,
                       "--max-record-bytes", MAX_RECORD_BYTES, *args, timeout=timeout)

    def ingestd(self, *extra: str) -> Ingestd:
        return Ingestd(*stack.ingestd_args(self.topic, self.group, self.broker_url,
                                           "--max-record-bytes", MAX_RECORD_BYTES, *extra))


def summary(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout.splitlines()[-1]


def dead_letter(p: Poisoned, records: list[bytes], letters: int,
                headers: list[list[tuple[str, bytes]] | None] | None = None) -> None:
    """Produce ``records`` to the source topic and let a real ingestd dead-letter the
    ``letters`` of them that are poison."""
    before = sum(stack.end_offsets(p.dlq, p.dlq_partitions).values())
    stack.produce(p.topic, records, headers=headers)
    with p.ingestd() as ingestd:
        assert stack.wait_until(lambda: sum(stack.end_offsets(p.dlq, p.dlq_partitions).values())
                                >= before + letters, 90), ingestd.output()[-3000:]
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0


@pytest.fixture
def poisoned(topic_factory: Callable[..., str], broker_url: str) -> Poisoned:
    """Every class of poison, and one letter at the replay limit, in the topic's DLQ."""
    topic = topic_factory(partitions=2)
    p = Poisoned(topic, topic_factory(partitions=1, name=f"{topic}.dlq"), stack.group(),
                 broker_url)
    records = [stack.signal_record(i) for i in range(20)]
    dead_letter(p, [*records, *INVALID, AT_LIMIT[0]], len(INVALID) + 1,
                [*(None for _ in records), *(None for _ in INVALID), AT_LIMIT[1]])
    p.valid = len(records)
    return p


def test_dry_run_counts_by_reason_and_commits_nothing(poisoned: Poisoned) -> None:
    for _ in range(2):  # the same counts twice: nothing was committed
        result = poisoned.replay("--dry-run")
        assert summary(result) == (
            "replay: selected 8, replayed 0, still invalid 7 (decode 2, not_object 2, "
            "schema 2, too_large 1), skipped 1")
        assert "dry run: nothing produced, no offsets committed; 0 would be replayed" \
            in result.stdout
        assert "1 at the replay limit (--max-replays 3)" in result.stdout
    assert stack.committed_offsets(group_of(poisoned.dlq), poisoned.dlq, 1) == {0: -1001}
    selected = poisoned.replay("--dry-run", "--reason", "schema", "--reason", "decode",
                               "--schema", "object")
    assert summary(selected) == ("replay: selected 5, replayed 2, still invalid 2 (decode 2), "
                                 "skipped 1")
    assert "2 would be replayed" in selected.stdout
    by_partition = [summary(poisoned.replay("--dry-run", "--partition", p)) for p in "01"]
    assert sum(int(line.split("selected ")[1].split(",")[0]) for line in by_partition) == 8


def test_schema_letters_replay_and_a_running_ingestd_dispatches_them(
        poisoned: Poisoned) -> None:
    ends = stack.end_offsets(poisoned.topic, 2)
    assert summary(poisoned.replay("--schema", "object")) == (
        "replay: selected 8, replayed 2, still invalid 5 (decode 2, not_object 2, "
        "too_large 1), skipped 1")
    # The group moved to the end: a second run finds nothing to do.
    assert summary(poisoned.replay("--schema", "object")) == (
        "replay: selected 0, replayed 0, still invalid 0, skipped 0")
    after = stack.end_offsets(poisoned.topic, 2)
    replayed = {f"{poisoned.topic}-{p}-{o}" for p in after for o in range(ends[p], after[p])}
    assert len(replayed) == 2
    back = [m for m in stack.consume_all(poisoned.topic, poisoned.valid + 10)
            if m.offset() >= ends[m.partition()]]
    assert sorted(m.value() for m in back) == sorted(
        raw for raw, reason in INVALID.items() if reason == "schema")
    for msg in back:
        assert msg.headers() == [(dlq.REPLAY_COUNT, b"1")]
    with stack.celery_worker(poisoned.broker_url), poisoned.ingestd("--schema", "object") as ing:
        runs = redis.Redis.from_url(poisoned.broker_url)

        def executed() -> set[str]:
            return {k.decode() for k in runs.hkeys(reference_tasks.RUNS_KEY)}

        # The valid records dead_letter() left in the queue run too.
        assert stack.wait_until(lambda: replayed <= executed(), 90), (executed(), ing.output())
        assert len(executed()) == poisoned.valid + 2
        ing.signal(signal.SIGTERM)
        assert ing.wait(60) == 0


def test_a_letter_at_the_limit_is_skipped_and_one_below_replays_with_its_headers(
        poisoned: Poisoned, topic_factory: Callable[..., str]) -> None:
    target = topic_factory(partitions=1)
    result = poisoned.replay("--all", "--reason", "schema", "--to", target)
    assert summary(result) == "replay: selected 3, replayed 2, still invalid 0, skipped 1"
    again = poisoned.replay("--from-beginning", "--all", "--reason", "schema",
                            "--max-replays", "4", "--to", target)
    assert summary(again) == "replay: selected 3, replayed 3, still invalid 0, skipped 0"
    got = stack.consume_all(target, 5)
    assert len(got) == 5
    at_limit = [m for m in got if m.value() == AT_LIMIT[0]]
    assert len(at_limit) == 1
    assert at_limit[0].headers() == [("trace", b"t-1"), (dlq.REPLAY_COUNT, b"4")]


def test_a_replay_stopped_by_sigterm_resumes_and_produces_nothing_twice(
        topic_factory: Callable[..., str], broker_url: str) -> None:
    topic = topic_factory(partitions=2)
    p = Poisoned(topic, topic_factory(partitions=2, name=f"{topic}.dlq"), stack.group(),
                 broker_url, dlq_partitions=2)
    n = 4000
    dead_letter(p, [orjson.dumps({"name": "n", "value": i, "source": "s"}) for i in range(n)], n)
    target = topic_factory(partitions=2)
    args = ["replay", "--topic", topic, "--bootstrap-servers", stack.BOOTSTRAP, "--all",
            "--to", target, "--batch-size", "5"]
    first = subprocess.Popen([sys.executable, "-m", "ingestd", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=stack.REPO)
    assert stack.wait_until(lambda: sum(max(0, o) for o in stack.committed_offsets(
        group_of(p.dlq), p.dlq, 2).values()) > 0, 60, interval=0.02)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, (out, err)
    assert "stopped by SIGTERM" in out
    replayed = int(out.splitlines()[-1].split("replayed ")[1].split(",")[0])
    assert 0 < replayed < n, out
    rest = run_cli(*args, timeout=300)
    assert summary(rest) == f"replay: selected {n - replayed}, replayed {n - replayed}, " \
                            "still invalid 0, skipped 0"
    values = [m.value() for m in stack.consume_all(target, n + 10, timeout=30)]
    assert len(values) == n and len(set(values)) == n


def test_a_record_kafka_refuses_stops_the_run_before_its_letter(
        poisoned: Poisoned, topic_factory: Callable[..., str]) -> None:
    small = topic_factory(partitions=1, config={"max.message.bytes": "20000"})
    refused = poisoned.replay("--all", "--to", small)
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert "replay: " in refused.stderr and "too large" in refused.stderr.lower(), \
        refused.stderr
    letters = stack.consume_all(poisoned.dlq, len(INVALID) + 1)
    too_large = next(m.offset() for m in letters if dict(m.headers())[dlq.ERROR] == b"too_large")
    committed = stack.committed_offsets(group_of(poisoned.dlq), poisoned.dlq, 1)[0]
    assert committed <= too_large, (committed, too_large)
    again = poisoned.replay("--all", "--to", small)  # the same letter stops it again
    assert again.returncode == 1
    assert stack.committed_offsets(group_of(poisoned.dlq), poisoned.dlq, 1)[0] == committed
    # Passed over by selection, it no longer stops the run; a record that went out in the
    # refused request is produced now, once.
    rest = poisoned.replay("--all", "--to", small, "--reason", "schema")
    assert summary(rest).endswith(", still invalid 0, skipped 1")
    schema = sorted(raw for raw, reason in INVALID.items() if reason == "schema")
    got = [m.value() for m in stack.consume_all(small, len(INVALID), timeout=10)]
    assert sorted(v for v in got if v in schema) == schema


@pytest.mark.parametrize(("args", "words"), [
    (["--reason", "bogus"], ["--reason", "invalid choice: 'bogus'"]),
    (["--offset-range", "9-2"], ["--offset-range", "'9-2'", "FROM-TO"]),
    (["--partition", "x"], ["--partition", "'x'", "0-5,8"]),
    (["--max-replays", "0"], ["--max-replays", ">= 1"]),
    (["--to", "no/such"], ["--to", "'no/such'", "Kafka topic name"]),
    (["--workers", "2"], ["unrecognized arguments: --workers"]),
    (["--dlq-topic", ""], ["dlq-topic", "nothing to replay"]),
    (["--topic", "src", "--to", "src.dlq"], ["to", "'src.dlq'", "the dead-letter topic"]),
])
def test_bad_replay_flags_exit_2_with_one_line(args: list[str], words: list[str]) -> None:
    result = run_cli("replay", "--bootstrap-servers", "127.0.0.1:1", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    (line,) = result.stderr.splitlines()
    assert line.startswith("ingestd replay: error: "), line
    for word in words:
        assert word in line, (word, line)


def test_a_missing_dead_letter_topic_is_one_line_and_exit_1() -> None:
    result = run_cli("replay", "--bootstrap-servers", stack.BOOTSTRAP, "--topic",
                     "no-such-topic-for-replay")
    assert result.returncode == 1, (result.stdout, result.stderr)
    (line,) = result.stderr.splitlines()
    assert line.startswith("replay: dead-letter topic no-such-topic-for-replay.dlq: "), line
    assert result.stdout.splitlines()[-1] == \
        "replay: selected 0, replayed 0, still invalid 0, skipped 0"


# --- at the seam ------------------------------------------------------------


def test_selection_by_reason_partition_and_offsets() -> None:
    options = Options(frozenset({"schema"}), frozenset({1}), (10, 20), False, None, 3, False,
                      False)

    def letter(reason: str, partition: int, offset: int) -> dict[str, str]:
        return {dlq.ERROR: reason, dlq.PARTITION: str(partition), dlq.OFFSET: str(offset)}

    assert options.selects(letter("schema", 1, 10))
    assert options.selects(letter("schema", 1, 20))
    assert not options.selects(letter("schema", 1, 21))
    assert not options.selects(letter("schema", 0, 15))
    assert not options.selects(letter("decode", 1, 15))
    assert not options.selects({})
    everything = Options(frozenset(), None, (5, None), False, None, 3, False, False)
    assert everything.selects(letter("decode", 0, 10 ** 9))
    # Quarantined records are internal: replayed only when named.
    assert not everything.selects(letter("internal", 0, 10))
    assert Options(frozenset({"internal"}), None, None, False, None, 3, False, False).selects(
        letter("internal", 0, 10))


def test_summary_line() -> None:
    counts = Counts(selected=9, replayed=4)
    counts.invalid.update({"schema": 2, "decode": 1})
    counts.skipped.update({"at the replay limit": 2})
    assert counts.summary() == ("replay: selected 9, replayed 4, still invalid 3 (decode 1, "
                                "schema 2), skipped 2")


def test_a_letter_naming_a_topic_that_is_not_a_source_is_not_replayed_there(
        topic_factory: Callable[..., str]) -> None:
    """Anyone who can write to the dead-letter topic can forge a letter naming any topic:
    replay sends a record back only to a --topic, unless --to names where."""
    topic, victim, elsewhere = (topic_factory(partitions=1) for _ in range(3))
    dead = topic_factory(partitions=1, name=f"{topic}.dlq")
    forged = dlq.DeadLetter(victim, 0, 7, 0, b"k", stack.signal_record(1), "schema", "forged")
    key, value, headers = forged.record("someone")
    stack.produce(dead, [value], keys=[key], headers=[headers])  # type: ignore[list-item]
    p = Poisoned(topic, dead, stack.group(), "redis://unused:6379/0")
    result = p.replay("--all")
    assert summary(result) == "replay: selected 1, replayed 0, still invalid 0, skipped 1"
    assert "naming a topic that is not a --topic" in result.stdout
    assert sum(stack.end_offsets(victim, 1).values()) == 0
    again = p.replay("--all", "--from-beginning", "--to", elsewhere)
    assert summary(again) == "replay: selected 1, replayed 1, still invalid 0, skipped 0"
    assert sum(stack.end_offsets(victim, 1).values()) == 0
