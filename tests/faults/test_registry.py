"""The schema registry away under load (``--value-format registry-avro``).

The workers know the schemas of the records they have seen. A record naming a schema
id they have not seen, while the registry does not answer, is neither decoded nor
dead-lettered: its worker pauses its partitions and asks again with backoff, as it
waits out a Celery broker. The registry is the test's own Apicurio (in memory, so it
is paused with SIGSTOP, not killed: a restart would forget every schema); a paused
process answers nothing, so each ask runs into ingestd's request timeout.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from tests import registry_formats as formats
from tests import stack
from tests.harness import BATCH, PrivateService, Produced, Run, private_service

pytestmark = pytest.mark.stack

RECORDS = 3_000  # each half, before and during the outage
OUTAGE = 10.0
SECOND = formats.AVRO_SCHEMA.replace(
    '"fields": [', '"fields": [\n    {"name": "region", "type": "string", "default": "eu"},')


@pytest.fixture
def registry() -> Iterator[PrivateService]:
    with private_service("registry") as service:
        yield service


def produce_over(run: Run, values: list[bytes], seconds: float) -> threading.Thread:
    """Produce ``values`` (valid records) in chunks over about ``seconds``, in the
    background."""
    steps = 10

    def go() -> None:
        for step in range(steps):
            chunk = values[len(values) * step // steps:len(values) * (step + 1) // steps]
            run.load.produce_any([Produced(v) for v in chunk])
            time.sleep(seconds / steps)

    thread = threading.Thread(target=go, name="load", daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(600)
def test_registry_paused_while_new_schema_ids_arrive_loses_nothing(
        registry: PrivateService, make_run: Callable[..., Run]) -> None:
    url = f"http://{registry.address}/apis/ccompat/v7"
    run = make_run()
    client = SchemaRegistryClient({"url": url})
    first = formats.serializer("avro", client)
    # A second version of the schema, registered now: its records name an id the workers
    # have not seen when they come, during the outage.
    second = formats.serializer("avro", client, schema=SECOND)
    before = [first(i, run.topic) for i in range(RECORDS)]
    during = [second(i, run.topic) for i in range(RECORDS, 2 * RECORDS)]
    ingestd = run.ingestd("--value-format", "registry-avro", "--schema-registry-url", url,
                          "--retry-max-backoff", "1")
    produce_over(run, before, 3).join()
    assert stack.wait_until(lambda: run.progress() >= RECORDS, 60), run.logs()
    os.kill(registry.pid(), signal.SIGSTOP)
    try:
        load = produce_over(run, during, 3)
        assert stack.wait_until(lambda: "unreachable" in ingestd.output(), 30), run.logs()
        time.sleep(OUTAGE)
        assert run.progress() < 2 * RECORDS, "the records of the new id went through"
    finally:
        os.kill(registry.pid(), signal.SIGCONT)
    load.join()
    settled = run.settle()
    code = run.stop(ingestd)
    report = run.verify(max_duplicates=BATCH)
    assert report.dead_lettered == 0
    assert settled and code == 0, run.logs()
