"""Every per-record check is linear in the record's size, whatever its shape.

Hypothesis builds records from the pieces that make text scanners and parsers slow
(quotes, escapes, brackets, commas, long digit runs, white space), each repeated
tens of thousands of times, bare or inside a valid signal, and runs them through a
worker's decode and build in both dispatch modes. The CPU time per byte is bounded
far above what a linear pass costs (about 10 ns a byte here) and far below what a
quadratic one cost before (the item counter took 12 s for 90 KB: 130 µs a byte).
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingestd.celery import dispatch
from ingestd.config import Config
from tests import seams

TOPIC = "hostile"
PER_BYTE = 1e-6  # seconds: 1 s for a megabyte
FIXED = 0.05  # seconds: what a record of any size may cost besides
PIECES = [b'"', b"\\", b'\\"', b"\\\\", b"[", b"]", b"{", b"}", b",", b":", b" ", b"\n",
          b"0", b"7" * 700, b"1e", b"-", b".5", b"\\u00e9", b"\\ud800", b'"a",', b"[]",
          b'{"a":', b"null", b"true", b"\xff", b"\xc3\xa9"]


def _signal(inner: bytes) -> bytes:
    return b'{"name":"n","value":1,"source":"s","timestamp":1,"x":' + inner + b"}"


def _record(parts: list[tuple[bytes, int]], wrap: bool) -> bytes:
    """Each piece repeated to about its share of bytes; inside a valid signal if ``wrap``."""
    text = b"".join(piece * max(1, size // len(piece)) for piece, size in parts)
    return _signal(text) if wrap else text


records = st.builds(_record, st.lists(st.tuples(st.sampled_from(PIECES),
                                                st.one_of(st.just(1),
                                                          st.integers(20_000, 250_000))),
                                      min_size=1, max_size=5), st.booleans())
# The record that stalled a worker past --worker-timeout: an unterminated string of
# escaped quotes after enough commas to be counted.
STALLED = b"[" + b"," * 10_001 + b'"' + b'\\"' * 60_000


@pytest.fixture(scope="module", params=["each", "batch"])
def pipeline(request: pytest.FixtureRequest) -> seams.Seam:
    config = Config(broker_url="redis://127.0.0.1:1/0", dispatch=request.param,
                    max_record_bytes=4 << 20, with_metadata=True)
    return seams.decoder(config, {(TOPIC, 0)}, dispatch.create(config))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(raw=records)
@example(raw=STALLED)
@example(raw=_signal(b"[" + b'"a",' * 9_000 + b'"' + b'\\"' * 60_000 + b"]"))
def test_a_records_check_and_build_cost_is_linear_in_its_size(pipeline: seams.Seam,
                                                               raw: bytes) -> None:
    msg = Message(topic=TOPIC, partition=0, offset=0, value=raw, key=b"k",
                  timestamp=(1, 1732800000000))
    started = time.process_time()
    batch = pipeline.decode([msg])
    pipeline.build(batch)
    spent = time.process_time() - started
    assert len(batch.tasks) + len(batch.letters) == 1
    assert spent < FIXED + PER_BYTE * len(raw), f"{spent:.3f} s for {len(raw)} bytes"

