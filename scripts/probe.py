"""Readiness probes for scripts/stack: exit 0 once a service answers a real request."""

from __future__ import annotations

import sys
from typing import Any


def kafka(bootstrap: str) -> None:
    from confluent_kafka.admin import AdminClient

    AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=2)


def redis(url: str) -> None:
    import redis as redis_py

    redis_py.Redis.from_url(url, socket_connect_timeout=1).ping()


def _sentinel(address: str) -> Any:
    """A client of the Sentinel at ``HOST:PORT``."""
    import redis as redis_py

    host, port = address.rsplit(":", 1)
    return redis_py.Redis(host, int(port), socket_connect_timeout=1, decode_responses=True)


def sentinel(target: str) -> None:
    """``HOST:PORT,MASTER,REPLICAS,SENTINELS``: the Sentinel at HOST:PORT knows the master,
    at least REPLICAS replicas of it and SENTINELS other Sentinels (they find each other
    through the master, within seconds), so that a failover can be agreed."""
    address, name, replicas, others = target.split(",")
    state = _sentinel(address).sentinel_master(name, return_responses=True)
    if (not state["is_master"] or state["num-slaves"] < int(replicas)
            or state["num-other-sentinels"] < int(others)):
        raise RuntimeError(f"{name}: {state['num-slaves']} replicas, "
                           f"{state['num-other-sentinels']} other sentinels")


def sentinel_master(target: str) -> None:
    """``HOST:PORT,MASTER``: print the master's address as the Sentinel names it."""
    address, name = target.split(",")
    master = _sentinel(address).sentinel_get_master_addr_by_name(name, return_responses=True)
    if not master:
        raise RuntimeError(f"{name}: no master known")
    print(*master)


def amqp(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=2) as conn:
        conn.connect()


def http(url: str) -> None:
    """A GET of ``url`` answers 200 (urlopen raises on any other status)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=2):
        pass


if __name__ == "__main__":
    kind, target = sys.argv[1], sys.argv[2]
    try:
        {"kafka": kafka, "redis": redis, "amqp": amqp, "sentinel": sentinel,
         "sentinel-master": sentinel_master, "http": http}[kind](target)
    except Exception as exc:
        print(f"{kind} not ready: {exc}", file=sys.stderr)
        sys.exit(1)
