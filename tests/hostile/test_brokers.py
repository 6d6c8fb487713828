"""Broker states that used to crash-loop a worker or stall a partition without a word: a
dead-letter topic the broker refuses, and a record too large for the consumer to fetch.

Each runs on a broker of the module's own that creates no topic on its own
(``auto.create.topics.enable=false``), with a real ``celery worker``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from ingestd.worker.status import TOO_LARGE_TO_FETCH
from tests import stack
from tests.harness import PrivateService, Produced, Run, private_service

pytestmark = pytest.mark.stack
MODES = pytest.mark.parametrize("mode", [("each",), ("each", "--with-metadata"), ("batch",),
                                         ("batch", "--with-metadata")], ids=" ".join)


@pytest.fixture(scope="module")
def strict_kafka() -> Iterator[PrivateService]:
    with private_service("kafka", KAFKA_AUTO_CREATE_TOPICS="false") as kafka:
        yield kafka


def _readyz(port: int) -> tuple[int, dict[str, str]]:
    code, body = stack.http_get(f"http://127.0.0.1:{port}/readyz")
    return code, json.loads(body).get("workers", {}) if body else {}


def _metric(port: int, name: str) -> float:
    _, body = stack.http_get(f"http://127.0.0.1:{port}/metrics")
    found = re.search(rf"^ingestd_{name} (\S+)$", body.decode(), re.M)
    return float(found.group(1)) if found else -1.0


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingestd", "--check", "--metrics-addr", "",
                           *args], capture_output=True, text=True, timeout=60, check=False,
                          cwd=stack.REPO)


@pytest.mark.timeout(600)
@MODES
def test_a_refused_dead_letter_topic_is_an_outage_not_a_crash(
        strict_kafka: PrivateService, make_run: Callable[..., Run], mode: tuple[str, ...]) -> None:
    """The dead-letter topic does not exist, and the broker will not create it: --check
    says so and fails; the workers pause, say why on /readyz and in a metric, and keep
    retrying without dying; once the topic exists, everything goes through."""
    run = make_run(bootstrap=strict_kafka.address, create_dlq=False)
    checked = _check("--topic", run.topic, "--bootstrap-servers", run.bootstrap,
                     "--dlq-topic", run.dlq, "--broker-url", run.broker_url)
    assert checked.returncode == 1, checked.stdout
    assert f"dead-letter topic '{run.dlq}' is missing, and broker 1 does not create topics " \
           "(auto.create.topics.enable=false)" in checked.stdout
    run.load.produce(2000)
    port = stack.free_port()
    ingestd = run.ingestd("--metrics-addr", f"127.0.0.1:{port}", "--dispatch", *mode,
                          "-X", "topic.metadata.propagation.max.ms=1000",
                          "--retry-max-backoff", "2", workers=2)

    def refused() -> bool:
        code, workers = _readyz(port)
        return code == 503 and any("refused" in why and run.dlq in why
                                   for why in workers.values())

    assert stack.wait_until(refused, 120), (_readyz(port), run.logs())
    assert _metric(port, "dlq_refused") >= 1
    stack.create_topic(1, bootstrap=run.bootstrap, name=run.dlq)
    settled = run.settle(timeout=240)
    assert _metric(port, "dlq_refused") == 0
    code = run.stop(ingestd)
    run.verify()
    assert settled and code == 0, run.logs()
    assert "died" not in ingestd.output(), run.logs()


@pytest.mark.timeout(600)
@MODES
def test_a_record_too_large_to_fetch_is_named_and_the_setting_to_raise(
        strict_kafka: PrivateService, make_run: Callable[..., Run], mode: tuple[str, ...]) -> None:
    """A 2 MB record on a topic that takes 3 MB, a consumer that takes 1.1 MB: no fetch from
    the broker succeeds. /readyz and ingestd_fetch_too_large say so and name
    receive.message.max.bytes; with it raised, the record is dead-lettered as too large
    and the rest goes through."""
    run = make_run(bootstrap=strict_kafka.address, topic_config={"max.message.bytes": "3000000"})
    records = [Produced(stack.signal_record(i)) for i in range(200)]
    records.insert(100, Produced(b"x" * 2_000_000, valid=False))
    run.load.produce_any(records, props={"message.max.bytes": 3_100_000})
    port = stack.free_port()
    small = run.ingestd("--metrics-addr", f"127.0.0.1:{port}", "-X", "fetch.max.bytes=1000000",
                        "-X", "receive.message.max.bytes=1100000", workers=1)

    def stuck() -> bool:
        code, workers = _readyz(port)
        return code == 503 and any("receive.message.max.bytes" in why
                                   for why in workers.values())

    assert stack.wait_until(stuck, 90), (_readyz(port), run.logs())
    assert TOO_LARGE_TO_FETCH in small.output()
    assert _metric(port, "fetch_too_large") == 1
    assert run.stop(small) == 0
    again = run.ingestd("-X", "fetch.max.bytes=4000000", "-X", "receive.message.max.bytes=5000000",
                        "--dispatch", *mode, workers=1)
    settled = run.settle(timeout=180)
    code = run.stop(again)
    run.verify()
    assert settled and code == 0, run.logs()
