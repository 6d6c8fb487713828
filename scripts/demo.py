"""Driver for scripts/demo: produce a corpus, run a Celery worker and ingestd, show progress."""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"
REDIS_PORT = os.environ.get("REDIS_PORT", "6379")
BROKER_URL = f"redis://127.0.0.1:{REDIS_PORT}/15"
METRICS = "127.0.0.1:9102"
MALFORMED = [b"not json at all", b'{"name": "cpu", "value": ', b"[1, 2, 3]", b'"a string"', b"",
             b'{"name": "", "value": 1, "source": "s", "timestamp": 1}',
             b'{"name": "cpu", "value": "high", "source": "s", "timestamp": 1}',
             b"\xff\xfe\x00 binary"]


def make_topic(name: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.delete_topics([name, f"{name}.dlq"], operation_timeout=10)
    time.sleep(1)
    for _ in range(30):
        futures = admin.create_topics([NewTopic(name, partitions, 1)])
        try:
            futures[name].result(10)
            return
        except Exception:  # deletion still in progress
            time.sleep(0.5)
    raise SystemExit(f"demo: could not create topic {name}")


def produce(topic: str, n: int) -> tuple[int, int]:
    rng = random.Random(7)
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 20})
    valid = invalid = 0
    for i in range(n):
        if rng.random() < 0.01:
            value = rng.choice(MALFORMED)
            invalid += 1
        else:
            value = orjson.dumps({
                "name": rng.choice(["cpu.load", "mem.used", "disk.io", "net.rx"]),
                "value": round(rng.gauss(50, 15), 3), "source": f"host-{rng.randrange(40)}",
                "timestamp": time.time(), "id": f"sig-{i}", "tags": {"dc": rng.choice("ab")}})
            valid += 1
        while True:
            try:
                producer.produce(topic, value)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    producer.flush(60)
    return valid, invalid


def scrape() -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(ingestd_\w+?)(?:\{.*\})? ([0-9.e+-]+)$", line)
        if m:
            totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(2))
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    opts = parser.parse_args()
    topic = "demo_signals"
    results = redis.Redis.from_url(BROKER_URL)
    results.flushdb()
    print(f"demo: creating topic {topic} (4 partitions) and producing {opts.records} signals")
    make_topic(topic, 4)
    valid, invalid = produce(topic, opts.records)
    print(f"demo: produced {valid} valid and {invalid} malformed records")

    logs = REPO / ".stack" / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CELERY_BROKER_URL": BROKER_URL}
    celery = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "ingestd.reference_tasks", "worker", "-c", "2",
         "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
        stdout=(logs / "celery.log").open("wb"), stderr=subprocess.STDOUT, env=env)
    ingestd = subprocess.Popen(
        [sys.executable, "-m", "ingestd", "--workers", str(opts.workers), "--topic", topic,
         "--bootstrap-servers", BOOTSTRAP, "--broker-url", BROKER_URL, "--group-id",
         f"demo-{int(time.time())}", "--metrics-addr", METRICS, "--log-level", "WARNING"],
        stdout=(logs / "ingestd.log").open("wb"), stderr=subprocess.STDOUT)
    print(f"demo: ingestd (pid {ingestd.pid}) and a celery worker (pid {celery.pid}) are "
          f"running; metrics on http://{METRICS}/metrics; logs in {logs}")
    print(f"{'seconds':>8} {'consumed':>10} {'dispatched':>11} {'dead-lettered':>14} "
          f"{'executed':>9} {'rate/s':>9}")
    started = time.monotonic()
    last, last_t = 0.0, started
    code = 1
    try:
        while time.monotonic() - started < 600:
            time.sleep(1)
            m = scrape()
            executed = int(results.get("ingestd:ref:executed") or 0)
            now = time.monotonic()
            consumed = m.get("ingestd_messages_consumed_total", 0.0)
            rate = (consumed - last) / (now - last_t)
            last, last_t = consumed, now
            print(f"{now - started:8.0f} {consumed:10.0f} "
                  f"{m.get('ingestd_messages_dispatched_total', 0):11.0f} "
                  f"{m.get('ingestd_dlq_produced_total', 0):14.0f} {executed:9d} {rate:9.0f}")
            if ingestd.poll() is not None:
                print(f"demo: ingestd exited early with {ingestd.returncode}; see {logs}")
                break
            if consumed >= valid + invalid and executed >= valid:
                code = 0
                break
    finally:
        ingestd.send_signal(signal.SIGTERM)
        ingestd.wait(60)
        celery.terminate()
        celery.wait(30)
    if code == 0:
        print(f"demo: done: {valid} signals dispatched and executed by Celery, {invalid} "
              f"malformed records in {topic}.dlq with headers saying why")
    return code


if __name__ == "__main__":
    sys.exit(main())
