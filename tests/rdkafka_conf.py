"""librdkafka's own view of its configuration properties, read from the library that
confluent-kafka bundles, so that tests keep ingestd's lists in step with it."""

from __future__ import annotations

import ctypes
import functools
import io
import logging
import os
import re
import tempfile
from pathlib import Path

import confluent_kafka
from confluent_kafka import KafkaException, Producer

MARK = "ingestd-marker"


def _library() -> ctypes.CDLL:
    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    found = sorted(libs.glob("librdkafka*.so*"))
    assert found, f"no librdkafka in {libs}"
    return ctypes.CDLL(str(found[0]))


@functools.cache
def properties() -> dict[str, str]:
    """Every property librdkafka knows: name -> its description cell (which ends in
    ``*Type: ...*``), from ``rd_kafka_conf_properties_show``."""
    rd, libc = _library(), ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    rd.rd_kafka_conf_properties_show.argtypes = [ctypes.c_void_p]
    fd, path = tempfile.mkstemp()
    os.close(fd)
    try:
        fh = libc.fopen(path.encode(), b"w")
        rd.rd_kafka_conf_properties_show(fh)
        libc.fclose(fh)
        rows = [line.split("|") for line in Path(path).read_text().splitlines() if "|" in line]
    finally:
        os.unlink(path)
    return {cells[0].strip(): cells[-1] for cells in rows[2:]}


@functools.cache
def sensitive_properties() -> frozenset[str]:
    """The string properties librdkafka prints as ``[redacted]`` in its configuration
    dump (``debug=conf``): set one at a time, with a marker value, on a producer."""
    found = set()
    for name, doc in properties().items():
        if "*Type: string*" not in doc:
            continue
        logger = logging.getLogger(f"rdkafka-conf.{name}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        logger.addHandler(handler)
        try:
            Producer({"debug": "conf", "logger": logger, name: MARK}).poll(0)
        except KafkaException:
            continue  # the value must be a file, a plugin, an enum: not a secret's shape
        finally:
            logger.removeHandler(handler)
        if re.search(rf"\s{re.escape(name)} = \[redacted\]", out.getvalue()):
            found.add(name)
    return frozenset(found)
