"""Fixtures for the benchmarks: the local stack, a signal corpus, ingestd's dispatcher,
a Redis db.

Run with ``scripts/bench`` (results file, BENCHMARKS.md), or::

    .venv/bin/pytest benchmarks --benchmark-only

which starts the local stack (``scripts/stack up``) when Kafka or Redis is not
running, and stops what it started. ``--benchmark-disable`` runs every benchmark
body once, as a plain test.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from ingestd.celery import dispatch
from ingestd.config import Config
from tests import stack

N_RECORDS = 1000
TOPIC = "pulse_signals"


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


@pytest.fixture(scope="session", autouse=True)
def local_stack() -> Iterator[None]:
    """Kafka and Redis on loopback: the running ones, or started here and stopped after."""
    if _listening(stack.BOOTSTRAP) and _listening(f"127.0.0.1:{stack.REDIS_PORT}"):
        yield
        return
    command = str(stack.REPO / "scripts" / "stack")
    subprocess.run([command, "up"], check=True)
    try:
        yield
    finally:
        subprocess.run([command, "down"], check=False)

_NAMES = ("cpu.load", "cpu.user", "mem.used", "mem.free", "disk.io.read", "disk.io.write",
          "net.rx.bytes", "net.tx.bytes", "temp.cpu", "http.latency.p99", "queue.depth")
_DCS = ("eu1", "eu2", "us1", "us2", "ap1")
_ENVS = ("prod", "staging")


def make_signal(rng: random.Random, i: int) -> dict[str, Any]:
    """One realistic signal: the required fields, usually an id and tags, sometimes extras."""
    signal: dict[str, Any] = {
        "name": rng.choice(_NAMES),
        "value": (rng.randrange(0, 100_000) if rng.random() < 0.15
                  else round(rng.uniform(0, 1000) * rng.random(), rng.randrange(1, 7))),
        "source": f"host-{rng.randrange(1, 400)}",
        "timestamp": round(1732800000.5 + i * 0.0137 + rng.random(), 3),
    }
    if rng.random() < 0.1:  # RFC 3339 timestamps are allowed too
        ms = rng.randrange(1000)
        signal["timestamp"] = f"2024-11-28T13:{i // 60 % 60:02d}:{i % 60:02d}.{ms:03d}Z"
    if rng.random() < 0.9:
        signal["id"] = f"{rng.getrandbits(32):08x}-{i}"
    if rng.random() < 0.85:
        tags = {"dc": rng.choice(_DCS), "rack": f"r{rng.randrange(1, 40)}"}
        if rng.random() < 0.5:
            tags["env"] = rng.choice(_ENVS)
        if rng.random() < 0.3:
            tags["service"] = f"svc-{rng.randrange(1, 30)}"
        signal["tags"] = tags
    if rng.random() < 0.05:  # unknown fields are allowed and kept
        signal["unit"] = "percent"
    return signal


@pytest.fixture(scope="session")
def corpus() -> list[bytes]:
    """~1000 signal records as a Python producer writes them (``json.dumps(...).encode()``)."""
    rng = random.Random(20241128)
    return [json.dumps(make_signal(rng, i)).encode() for i in range(N_RECORDS)]


@pytest.fixture(scope="session")
def signals(corpus: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in corpus]


@pytest.fixture(scope="session")
def tasks(corpus: list[bytes], signals: list[dict[str, Any]]) -> list[dispatch.Task]:
    """One ``each``-mode task per record, ids as the worker makes them."""
    return [dispatch.Task(f"{TOPIC}-0-{offset}", TOPIC, [raw], [obj])
            for offset, (raw, obj) in enumerate(zip(corpus, signals, strict=True))]


@pytest.fixture(scope="session")
def bench_redis_db() -> int:
    """An empty Redis database, from the top down (tests take theirs from db 1 upwards)."""
    for db in range(stack.REDIS_DATABASES - 1, 0, -1):
        probe = redis.Redis(port=stack.REDIS_PORT, db=db)
        try:
            empty = probe.dbsize() == 0
        except redis.RedisError as exc:
            pytest.fail(f"Redis is not reachable on port {stack.REDIS_PORT} ({exc}); "
                        "run scripts/stack up")
        finally:
            probe.close()
        if empty:
            return db
    pytest.fail("no empty Redis database left for the benchmarks")


@pytest.fixture(scope="session")
def queue() -> str:
    """A queue (Redis list) of the benchmarks' own, so no worker consumes it."""
    return f"ingestd-bench-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def redis_client(bench_redis_db: int, queue: str) -> Iterator[redis.Redis]:
    """A client on the benchmarks' db; deletes every key the benchmarks made (never FLUSHDB)."""
    client = redis.Redis(port=stack.REDIS_PORT, db=bench_redis_db)
    yield client
    keys = list(client.scan_iter(match=f"*{queue}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def config(bench_redis_db: int, queue: str) -> Config:
    return Config(broker_url=stack.redis_url(bench_redis_db), queue=queue)


@pytest.fixture(scope="session")
def dispatcher(config: Config, redis_client: redis.Redis) -> Iterator[dispatch.RedisDispatcher]:
    d = dispatch.create(config)
    assert isinstance(d, dispatch.RedisDispatcher)
    yield d
    d.close()


@pytest.fixture(scope="session")
def envelopes(dispatcher: dispatch.RedisDispatcher, tasks: list[dispatch.Task]) -> list[bytes]:
    """The 1000 Redis envelopes ingestd LPUSHes for the corpus, built once."""
    return dispatcher.encode(tasks)
