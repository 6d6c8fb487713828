"""Kafka over SASL_SSL (SCRAM-SHA-512, a CA of the stack's own): ``--check``, the workers,
their dead-letter producer, the ownership watcher and ``replay`` all go through that
listener only, with the same ``-X`` settings."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests import stack
from tests.harness import private_service

pytestmark = pytest.mark.stack
USER, PASSWORD = "ingestd", "ingestd-secret"  # scripts/stack's defaults


class Secure(NamedTuple):
    plain: str  # for the test's own setup
    bootstrap: str  # SASL_SSL only
    ca: Path


@pytest.fixture(scope="module")
def secure_kafka() -> Iterator[Secure]:
    port = stack.free_port()
    with private_service("kafka", KAFKA_SECURE_PORT=str(port)) as kafka:
        yield Secure(kafka.address, f"127.0.0.1:{port}", kafka.directory / "tls" / "ca.pem")


def _security(k: Secure, password: str = PASSWORD) -> list[str]:
    props = ["security.protocol=SASL_SSL", "sasl.mechanism=SCRAM-SHA-512",
             f"sasl.username={USER}", f"sasl.password={password}", f"ssl.ca.location={k.ca}"]
    return [arg for prop in props for arg in ("-X", prop)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingestd", *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=stack.REPO)


def test_ingestd_and_replay_through_sasl_ssl_only(secure_kafka: Secure,
                                                  broker_url: str) -> None:
    k = secure_kafka
    topic = stack.create_topic(2, bootstrap=k.plain)
    dead = stack.create_topic(1, bootstrap=k.plain, name=f"{topic}.dlq")
    n = 40
    stack.produce(topic, [*(stack.signal_record(i) for i in range(n)), b"not json {"],
                  bootstrap=k.plain)
    common = ["--topic", topic, "--bootstrap-servers", k.bootstrap, *_security(k)]
    wrong = _cli("--check", "--metrics-addr", "", "--broker-url", broker_url,
                 "--topic", topic, "--bootstrap-servers", k.bootstrap,
                 *_security(k, password="wrong"))
    assert wrong.returncode == 1 and "problem: kafka 127.0.0.1" in wrong.stdout, wrong.stdout
    checked = _cli("--check", "--metrics-addr", "", "--broker-url", broker_url, *common)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert PASSWORD not in checked.stdout + checked.stderr
    port = stack.free_port()
    group = stack.group()
    args = [*common, "--group-id", group, "--broker-url", broker_url,
            "--metrics-addr", f"127.0.0.1:{port}", "--workers", "2"]
    with stack.Ingestd(*args) as ingestd:
        def settled() -> bool:
            code, _ = stack.http_get(f"http://127.0.0.1:{port}/readyz")
            return (code == 200 and len(stack.queued_tasks(broker_url)) == n
                    and sum(stack.end_offsets(dead, 1, bootstrap=k.plain).values()) == 1)

        assert stack.wait_until(settled, 120), (stack.http_get(
            f"http://127.0.0.1:{port}/readyz"), ingestd.output()[-3000:])
        _, body = stack.http_get(f"http://127.0.0.1:{port}/readyz?verbose")
        assert json.loads(body)["ready"] is True  # the watcher sees every partition owned
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()[-3000:]
    assert PASSWORD not in ingestd.output()
    replayed = _cli("replay", *common, "--all", "--reason", "decode")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert replayed.stdout.splitlines()[-1] == \
        "replay: selected 1, replayed 1, still invalid 0, skipped 0"
    assert sum(stack.end_offsets(topic, 2, bootstrap=k.plain).values()) == n + 2
