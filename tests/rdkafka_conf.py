"""librdkafka's own view of its configuration properties, read from the library that
confluent-kafka bundles, so that tests keep ingestd's lists in step with it."""

from __future__ import annotations

import functools
import io
import logging
import re

from confluent_kafka import KafkaException, Producer

from ingestd import rdkafka

MARK = "ingestd-marker"


def properties() -> dict[str, str]:
    """Every property librdkafka knows: name -> its description cell (which ends in
    ``*Type: ...*``)."""
    return {name: p.doc for name, p in rdkafka.properties().items()}


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
