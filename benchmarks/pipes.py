"""The pipelines ingestd is measured against, and a paced producer: each runs as a
process of its own, so that its CPU is read from ``/proc`` as ingestd's is.

    python -m benchmarks.pipes raw TOPIC BROKER_URL [--records N]
    python -m benchmarks.pipes old TOPIC BROKER_URL [--records N]
    python -m benchmarks.pipes produce TOPIC --rate R --seconds S [--linger-ms L]
                                            [--acks-to PATH]

- ``raw``: the raw pipe. ingestd's own consumer settings, natural batching (what
  librdkafka has fetched, else block for the first record), and one multi-value
  LPUSH of the records' bytes per batch: no decoding, no Celery format.
- ``old``: the old script's loop: one ``send_task`` per message after ``json.loads``.
- ``produce``: signals at a fixed rate, with ``linger.ms`` ``--linger-ms`` (1); each
  carries its send time (``sent``, epoch seconds) for the latency benchmark. With 0,
  each record goes as a request of its own, as low-latency producers send them. With
  ``--acks-to``, when the broker acknowledged a sample of them (see :func:`produce`).

``raw`` and ``old`` consume from a group of their own and stop after ``--records``
(0: run until killed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import redis
from confluent_kafka import Consumer, Producer

from ingestd import kafka
from ingestd.config import Config

BATCH = 1000
WAIT_FIRST = 0.05  # as ingestd's --batch-timeout-ms
# At 10,000 records/s a linger of 0 sends a request per record, and on a 2-core
# machine that also runs the broker the broker then falls a second behind, for
# every pipeline alike; 1 ms sends about ten records a request.
LINGER_MS = 1
ACK_SAMPLE = 10  # with --acks-to, every 10th signal's acknowledgement is noted


def consumer(topic: str, bootstrap: str) -> Consumer:
    """The consumer ingestd itself would build, in a group of its own. With
    ``INGESTD_BENCH_REQUESTS`` set to a path, the requests it has sent to the brokers
    (librdkafka's statistics, every second) are written there."""
    config = Config(topic=(topic,), bootstrap_servers=bootstrap,
                    group_id=f"bench-{uuid.uuid4().hex[:8]}")
    props = kafka.consumer_config(config, 0)
    path = os.environ.get("INGESTD_BENCH_REQUESTS")
    if path:
        props.update({"statistics.interval.ms": 1000,
                      "stats_cb": lambda stats: Path(path).write_text(str(requests(stats)))})
    c = Consumer(props)
    c.subscribe([topic])
    return c


def requests(stats_json: str) -> int:
    """Requests sent to every broker, from librdkafka's statistics."""
    brokers = orjson.loads(stats_json).get("brokers", {}).values()
    return sum(sum(b.get("req", {}).values()) for b in brokers)


def natural_batch(c: Consumer) -> list[bytes]:
    got = c.consume(BATCH, 0)
    if not got:
        got = c.consume(1, WAIT_FIRST)
        if got:
            got += c.consume(BATCH - 1, 0)
    return [m.value() or b"" for m in got if m.error() is None]


def raw(topic: str, url: str, records: int, bootstrap: str) -> None:
    c, client = consumer(topic, bootstrap), redis.Redis.from_url(url)
    done = 0
    while not records or done < records:
        values = natural_batch(c)
        if values:
            client.lpush("celery", *values)
            done += len(values)
    c.close()


def old(topic: str, url: str, records: int, bootstrap: str) -> None:
    from celery import Celery

    app = Celery("old_script", broker=url)
    c = consumer(topic, bootstrap)
    done = 0
    while not records or done < records:
        msg = c.poll(1.0)
        if msg is None or msg.error() is not None:
            continue
        app.send_task("ingest_and_score_signal", args=[json.loads(msg.value() or b"")])
        done += 1
    c.close()


def signal(i: int, sent: float | None = None) -> bytes:
    """A signal of about 200 bytes with tags, as a Python producer writes it."""
    record = {"name": "cpu.load", "value": round(i * 0.37 % 1000, 3),
              "source": f"host-{i % 400}.eu1.example.net",
              "timestamp": round(1732800000.5 + i * 0.0137, 3), "id": f"{i:08x}-sig",
              "tags": {"dc": "eu1", "rack": f"r{i % 40}", "env": "prod",
                       "service": f"svc-{i % 30}"}}
    if sent is not None:
        record["sent"] = sent
    return json.dumps(record).encode()


def sent_of(value: bytes) -> float:
    return float(orjson.loads(value)["sent"])


def produce(topic: str, rate: int, seconds: float, bootstrap: str,
            linger_ms: float = LINGER_MS, acks_to: str = "") -> None:
    """With ``acks_to``, the send time of every :data:`ACK_SAMPLE`-th signal and when the
    broker's acknowledgement (the leader appended it) came back are written there, a
    JSON list of pairs: the producer's own leg of the latency, which says how loaded the
    broker is. A sample: a callback for every signal slowed the producer below its pace
    at 50,000 a second."""
    acks: list[tuple[float, float]] = []

    def delivered(err: Any, msg: Any) -> None:  # cheap: the producer must keep its pace
        latency = msg.latency()  # seconds since produce(), by librdkafka's clock
        if err is None and latency is not None:
            now = time.time()
            acks.append((now - latency, now))

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms, "acks": 1})
    sample = ACK_SAMPLE if acks_to else 0
    p.list_topics(topic, timeout=10)  # connected, with the topic's leaders, before the clock
    start, i, n = time.time(), 0, int(rate * seconds)
    while i < n:
        due = start + i / rate
        now = time.time()
        if now < due:  # waits in poll(): an acknowledgement is noted when it comes
            p.poll(min(due - now, 0.001))
            continue
        while i < n and start + i / rate <= now:
            if sample and i % sample == 0:
                p.produce(topic, signal(i, time.time()), on_delivery=delivered)
            else:
                p.produce(topic, signal(i, time.time()))
            i += 1
        p.poll(0)
    p.flush(30)
    if acks_to:
        Path(acks_to).write_bytes(orjson.dumps(acks))


def spawn(*args: str, bootstrap: str) -> subprocess.Popen[bytes]:
    """``python -m benchmarks.pipes ARGS`` as a process of its own."""
    return subprocess.Popen([sys.executable, "-m", "benchmarks.pipes", *args,
                             "--bootstrap-servers", bootstrap],
                            cwd=Path(__file__).resolve().parent.parent)


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.pipes")
    parser.add_argument("pipe", choices=("raw", "old", "produce"))
    parser.add_argument("topic")
    parser.add_argument("broker_url", nargs="?", default="")
    parser.add_argument("--records", type=int, default=0)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--linger-ms", type=float, default=LINGER_MS)
    parser.add_argument("--acks-to", default="")
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    a = parser.parse_args()
    if a.pipe == "produce":
        produce(a.topic, a.rate, a.seconds, a.bootstrap_servers, a.linger_ms, a.acks_to)
    else:
        {"raw": raw, "old": old}[a.pipe](a.topic, a.broker_url, a.records, a.bootstrap_servers)


if __name__ == "__main__":
    main()
