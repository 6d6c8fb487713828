"""``scripts/demo`` proves its result: its checker finds a record that a test hook drops."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid

import pytest

from tests import stack

pytestmark = pytest.mark.stack
SUMMARY = re.compile(r"demo: produced (\d+), executed by Celery (\d+), dead-lettered (\d+), "
                     r"lost (\d+), duplicates (\d+)")


def demo(broker_url: str, *args: str) -> tuple[int, list[str]]:
    topic = f"demo-{uuid.uuid4().hex[:8]}"
    try:
        result = subprocess.run(
            [sys.executable, str(stack.REPO / "scripts" / "demo.py"), "--topic", topic,
             "--broker-url", broker_url, "--metrics-addr", f"127.0.0.1:{stack.free_port()}",
             *args], capture_output=True, text=True, timeout=300, cwd=stack.REPO)
    finally:
        for name in (topic, f"{topic}.dlq"):
            stack.delete_topic(name)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout.splitlines()


def test_demo_proves_nothing_was_lost_and_its_checker_catches_a_dropped_record(
        broker_url: str) -> None:
    code, lines = demo(broker_url, "--records", "2000")
    match = SUMMARY.fullmatch(lines[-1])
    assert match, lines[-20:]
    produced, executed, dead, lost, duplicates = map(int, match.groups())
    assert code == 0, lines[-20:]
    assert produced == 2000 and executed + dead == 2000 and dead > 0
    assert lost == 0 and duplicates == 0
    assert any(line.startswith("demo: latency from Kafka timestamp to Celery execution: p50 ")
               for line in lines), lines
    assert "$ ingestd status" in lines
    assert any(re.match(r"\s+0\s+\d+\s+\S+", line) for line in lines), lines  # a worker's row

    code, lines = demo(broker_url, "--records", "500", "--drop", "3")
    match = SUMMARY.fullmatch(lines[-1])
    assert match, lines[-20:]
    assert int(match.group(4)) == 3, lines[-5:]
    assert code == 1
    assert any(line.startswith("demo: lost 3: ") for line in lines), lines


def test_demo_at_a_steady_rate(broker_url: str) -> None:
    code, lines = demo(broker_url, "--seconds", "4", "--rate", "200")
    match = SUMMARY.fullmatch(lines[-1])
    assert match and code == 0, lines[-20:]
    produced, executed, dead, lost, _ = map(int, match.groups())
    assert 700 <= produced <= 800 and executed + dead == produced and lost == 0
