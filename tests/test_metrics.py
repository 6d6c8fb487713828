"""Counts survive worker deaths, and dead workers' files do not pile up."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    from ingestd import metrics

    def total(name, **labels):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry.get_sample_value(name, labels) or 0.0

    for generation in range(5):  # five workers, each dying after it counted
        pid = os.fork()
        if pid == 0:
            metrics.consumed.labels("t").inc(10)
            metrics.batch_size.observe(10)
            metrics.backpressure_paused.set(1)
            os._exit(0)
        os.waitpid(pid, 0)
        metrics.archive_dead_process(pid)
    owners = {f.rsplit("_", 1)[1].removesuffix(".db") for f in os.listdir(sys.argv[1])}
    print(total("ingestd_messages_consumed_total", topic="t"),
          total("ingestd_batch_size_count"), total("ingestd_backpressure_paused"),
          sorted(owners - {str(os.getpid())}))
""")


def test_dead_workers_counts_are_kept_in_one_archive(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], check=True,
                         capture_output=True, text=True).stdout.split(" ", 3)
    assert float(out[0]) == 50.0
    assert float(out[1]) == 5.0
    assert float(out[2]) == 0.0  # live gauges of dead processes are gone
    assert out[3].strip() == "['archive']"  # files of the living process, plus the archive
