"""Readiness probes for scripts/stack: exit 0 once a service answers a real request."""

from __future__ import annotations

import sys


def kafka(bootstrap: str) -> None:
    from confluent_kafka.admin import AdminClient

    AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=2)


def redis(url: str) -> None:
    import redis as redis_py

    redis_py.Redis.from_url(url, socket_connect_timeout=1).ping()


def amqp(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=2) as conn:
        conn.connect()


if __name__ == "__main__":
    kind, target = sys.argv[1], sys.argv[2]
    try:
        {"kafka": kafka, "redis": redis, "amqp": amqp}[kind](target)
    except Exception as exc:
        print(f"{kind} not ready: {exc}", file=sys.stderr)
        sys.exit(1)
