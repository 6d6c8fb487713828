"""``ingestd --version``: ingestd's version, the libraries it runs on, and its hot path.

``--check`` prints the same lines. The imports happen here, when asked: the
supervisor itself never imports confluent_kafka before it forks.
"""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("confluent-kafka", "celery", "kombu", "msgspec", "orjson", "prometheus-client")


def lines() -> list[str]:
    import confluent_kafka

    from ingestd.celery import codec

    return [
        f"ingestd {_version('ingestd')}",
        *(f"{name} {_version(name)}" for name in PACKAGES),
        f"librdkafka {confluent_kafka.libversion()[0]}",
        f"python {platform.python_version()}",
        "hot path: " + ("C (ingestd._native)" if codec.native is not None else
                        "Python (ingestd._native was not built: pip found no C compiler)"),
    ]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree not installed
        return "unknown (not installed)"
