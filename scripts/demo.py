"""Driver for scripts/demo: produce signals, run a Celery worker and ingestd, then prove
that nothing was lost.

The proof is the checker the fault tests use (``ingestd.tools.checker``): it compares every
produced record's partition and offset, from the producer's delivery reports, with
the task ids the ``celery worker`` ran and the source coordinates of the dead
letters; ``lost`` is what it finds in neither. The latency is each record's Kafka
timestamp to its execution, as the reference task recorded it.

``--drop N`` is a test hook: it forgets N executed records before the check, so that
a test can see the checker catch them (``tests/test_demo.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import redis
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ingestd.celery import reference_tasks
from ingestd.tools import checker, status

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"
REDIS_PORT = os.environ.get("REDIS_PORT", "6379")
BROKER_URL = f"redis://127.0.0.1:{REDIS_PORT}/15"
PARTITIONS = 4
MALFORMED = [b"not json at all", b'{"name": "cpu", "value": ', b"[1, 2, 3]", b'"a string"', b"",
             b'{"name": "", "value": 1, "source": "s", "timestamp": 1}',
             b'{"name": "cpu", "value": "high", "source": "s", "timestamp": 1}',
             b"\xff\xfe\x00 binary"]
STALL = 30.0  # seconds without progress after which the demo stops waiting and checks
STATUS_AT = 2.0  # seconds into the run at which `ingestd status` is shown, for a few seconds
STATUS_SHOWS = 3


def make_topic(name: str) -> None:
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.delete_topics([name, f"{name}.dlq"], operation_timeout=10)
    time.sleep(1)
    for topic in (name, f"{name}.dlq"):
        for _ in range(30):
            futures = admin.create_topics([NewTopic(topic, PARTITIONS if topic == name else 1, 1)])
            try:
                futures[topic].result(10)
                break
            except Exception:  # deletion still in progress
                time.sleep(0.5)
        else:
            raise SystemExit(f"demo: could not create topic {topic}")


class Load:
    """Produces synthetic signals, about 1% malformed, and keeps each record's coordinates
    and Kafka timestamp from its delivery report."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.rng = random.Random(7)
        self.producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 5,
                                  "enable.idempotence": True})
        self.produced: dict[checker.Record, bool] = {}
        self.timestamps: dict[str, int] = {}  # record id -> Kafka timestamp (ms)
        self.errors: list[str] = []
        self.sent = 0
        self.done = threading.Event()

    def _report(self, valid: bool) -> Any:
        def report(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self.errors.append(err.str())
                return
            record = (self.topic, msg.partition(), msg.offset())
            self.produced[record] = valid  # type: ignore[index]
            self.timestamps[checker.record_id(record)] = msg.timestamp()[1]  # type: ignore[arg-type]
        return report

    def _one(self) -> None:
        rng = self.rng
        valid = rng.random() >= 0.01
        value = orjson.dumps({
            "name": rng.choice(["cpu.load", "mem.used", "disk.io", "net.rx"]),
            "value": round(rng.gauss(50, 15), 3), "source": f"host-{rng.randrange(40)}",
            "timestamp": time.time(), "id": f"sig-{self.sent}",
            "tags": {"dc": rng.choice("ab")}}) if valid else rng.choice(MALFORMED)
        while True:
            try:
                self.producer.produce(self.topic, value, on_delivery=self._report(valid))
                break
            except BufferError:
                self.producer.poll(0.1)
        self.sent += 1

    def preload(self, n: int) -> None:
        for _ in range(n):
            self._one()
            self.producer.poll(0)
        self.finish()

    def steady(self, seconds: float, rate: int) -> None:
        """``rate`` records a second for ``seconds``, in steps of 10 ms."""
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            while self.sent < rate * elapsed:
                self._one()
            self.producer.poll(0)
            time.sleep(0.01)
        self.finish()

    def finish(self) -> None:
        self.producer.flush(60)
        self.done.set()

    @property
    def valid(self) -> int:
        return sum(self.produced.values())


def committed(group: str, topic: str) -> dict[checker.Partition, int]:
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)],
                                 timeout=10)
        return {(topic, tp.partition): tp.offset for tp in tps}
    finally:
        consumer.close()


def latency_line(values: list[float]) -> str:
    if not values:
        return "no records executed"
    p50, p90, p99 = checker.percentiles(values, 50, 90, 99)
    return (f"p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms, max {max(values):.1f} ms "
            f"({len(values)} records)")


def show_status(url: str) -> None:
    """`ingestd status`, in-process: the same reading, rates and table."""
    try:
        before = status.read(url)
        time.sleep(status.INTERVAL)
        text = status.render(status.snapshot(status.read(url), before), url)
    except status.Unreachable as exc:
        text = f"ingestd status: {exc}"
    print("\n$ ingestd status\n" + text + "\n", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo")
    parser.add_argument("--records", type=int, default=20_000,
                        help="preload this many signals before ingestd starts (default 20000)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="instead, produce at --rate signals a second for this long while "
                             "ingestd runs")
    parser.add_argument("--rate", type=int, default=500, help="with --seconds (default 500)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--topic", default="demo_signals")
    parser.add_argument("--metrics-addr", default="127.0.0.1:9102")
    parser.add_argument("--broker-url", default=BROKER_URL,
                        help="a Redis database of the demo's own: it is emptied first")
    parser.add_argument("--drop", type=int, default=0,
                        help="test hook: forget this many executed records before the check")
    opts = parser.parse_args()
    topic, url = opts.topic, f"http://{opts.metrics_addr}"
    results = redis.Redis.from_url(opts.broker_url, decode_responses=True)
    results.flushdb()
    make_topic(topic)
    load = Load(topic)
    if opts.seconds is None:
        print(f"demo: producing {opts.records} signals into {topic} ({PARTITIONS} partitions)")
        load.preload(opts.records)
        print(f"demo: produced {len(load.produced)} records, {len(load.produced) - load.valid} "
              "of them malformed")
    else:
        print(f"demo: producing {opts.rate} signals a second into {topic} for "
              f"{opts.seconds:.0f} s")

    logs = REPO / ".stack" / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CELERY_BROKER_URL": opts.broker_url}
    group = f"demo-{int(time.time())}"
    celery = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "ingestd.celery.reference_tasks", "worker",
         "-c", "2", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
        stdout=(logs / "celery.log").open("wb"), stderr=subprocess.STDOUT, env=env)
    ingestd = subprocess.Popen(
        [sys.executable, "-m", "ingestd", "--workers", str(opts.workers), "--topic", topic,
         "--bootstrap-servers", BOOTSTRAP, "--broker-url", opts.broker_url, "--group-id", group,
         "--metrics-addr", opts.metrics_addr, "--log-level", "WARNING"],
        stdout=(logs / "ingestd.log").open("wb"), stderr=subprocess.STDOUT)
    print(f"demo: ingestd (pid {ingestd.pid}) and a celery worker (pid {celery.pid}) are "
          f"running; metrics on {url}/metrics; logs in {logs}")
    producer = None
    if opts.seconds is not None and not ready(celery, logs / "celery.log", url, opts.workers):
        print(f"demo: the celery worker or ingestd did not start; see {logs}")
        ingestd.send_signal(signal.SIGTERM)
        celery.terminate()
        ingestd.wait(60)
        celery.wait(30)
        return 1
    if opts.seconds is not None:
        producer = threading.Thread(target=load.steady, args=(opts.seconds, opts.rate))
        producer.start()
    code = 1
    try:
        code = watch(ingestd, results, load, url, logs)
    finally:
        load.done.wait()
        if producer is not None:
            producer.join()
        ingestd.send_signal(signal.SIGTERM)
        ingestd.wait(60)
        celery.terminate()
        celery.wait(30)
    if code:
        return code
    return verdict(load, results, group, opts.drop, opts.seconds is not None)


def ready(celery: subprocess.Popen[bytes], log: Path, url: str, workers: int,
          timeout: float = 60) -> bool:
    """Wait until the celery worker takes tasks and every ingestd worker has partitions, so
    that the latency measured is ingestd's and Celery's, not their start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and celery.poll() is None:
        try:
            now = status.snapshot(status.read(url), None)
        except status.Unreachable:
            now = {"ready": False}
        # As many workers own partitions as can: the group's first rebalance is over.
        owners = sum(1 for w in now.get("workers", ()) if w["partitions"])
        if now["ready"] and owners >= min(workers, PARTITIONS) and \
                b"ready." in log.read_bytes():
            return True
        time.sleep(0.2)
    return False


def watch(ingestd: subprocess.Popen[bytes], results: redis.Redis, load: Load, url: str,
          logs: Path) -> int:
    """Print progress every second until Celery ran every valid record (or nothing moved
    for STALL seconds); show `ingestd status` a few times on the way."""
    print(f"{'seconds':>8} {'produced':>10} {'consumed':>10} {'dispatched':>11} "
          f"{'dead-lettered':>14} {'executed':>9} {'rate/s':>9}")
    started = time.monotonic()
    last, last_t, moved = 0.0, started, started
    shown = executed = last_executed = 0
    while True:
        time.sleep(1)
        now = time.monotonic()
        if shown < STATUS_SHOWS and now - started >= STATUS_AT:
            show_status(url)
            shown += 1
            continue
        try:
            reading = status.read(url)
        except status.Unreachable:
            reading = None
        consumed = reading.total("ingestd_messages_consumed_total") if reading else 0.0
        with contextlib.suppress(redis.RedisError):  # Redis away (scripts/dashboard)
            executed = int(results.get(reference_tasks.EXECUTED_KEY) or 0)
        rate = (consumed - last) / (now - last_t)
        if consumed != last or executed != last_executed:  # Celery may run a backlog still
            moved = now
        last, last_t, last_executed = consumed, now, executed
        print(f"{now - started:8.0f} {load.sent:10d} {consumed:10.0f} "
              f"{reading.total('ingestd_messages_dispatched_total') if reading else 0:11.0f} "
              f"{reading.total('ingestd_dlq_produced_total') if reading else 0:14.0f} "
              f"{executed:9d} {rate:9.0f}", flush=True)
        if ingestd.poll() is not None:
            print(f"demo: ingestd exited early with {ingestd.returncode}; see {logs}")
            return 1
        if load.done.is_set() and consumed >= len(load.produced) and executed >= load.valid:
            if shown == 0:
                show_status(url)
            return 0
        if now - moved > STALL and load.done.is_set():
            print(f"demo: nothing moved for {STALL:.0f} s; checking what arrived")
            return 0


def verdict(load: Load, results: redis.Redis, group: str, drop: int, steady: bool) -> int:
    """The checker's verdict, the latency percentiles, and the summary line last."""
    runs = {str(k): int(v) for k, v in results.hgetall(reference_tasks.RUNS_KEY).items()}
    for task_id in sorted(runs)[:drop]:  # the test hook
        del runs[task_id]
    letters = checker.read_dead_letters(BOOTSTRAP, f"{load.topic}.dlq")
    report = checker.check(load.produced, runs, letters, committed(group, load.topic))
    done = {str(k): float(v) for k, v in results.hgetall(reference_tasks.DONE_KEY).items()}
    latency = [(done[rid] * 1000 - ts) for rid, ts in load.timestamps.items() if rid in done
               and rid in runs]
    print(f"demo: latency from Kafka timestamp to Celery execution: {latency_line(latency)}")
    if not steady:
        print("demo: the records were produced before ingestd started, so this includes their "
              "wait in the backlog; --seconds N measures it at a steady rate")
    for failure in report.failures(max_duplicates=None):
        print(f"demo: {failure}")
    if load.errors:
        print(f"demo: the producer failed {len(load.errors)} times: {load.errors[0]}")
    print(f"demo: produced {report.produced}, executed by Celery {report.executed}, "
          f"dead-lettered {report.dead_lettered}, lost {len(report.lost)}, duplicates "
          f"{report.extra_executions}")
    return 0 if report.produced and not report.failures(max_duplicates=None) else 1


if __name__ == "__main__":
    sys.exit(main())
