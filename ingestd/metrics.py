"""Prometheus metrics (prefix ``ingestd_``), shared by all processes in multiprocess mode.

``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is imported: the
supervisor sets it (and wipes the folder) before the first fork.
"""

from __future__ import annotations

import os
import struct
import threading

from prometheus_client import Counter, Gauge, Histogram, multiprocess
from prometheus_client.mmap_dict import MmapedDict

consumed = Counter("ingestd_messages_consumed_total", "Records consumed from Kafka", ["topic"])
dispatched = Counter("ingestd_messages_dispatched_total",
                     "Signals accepted by the Celery broker", ["topic", "task"])
invalid = Counter("ingestd_messages_invalid_total", "Invalid records", ["topic", "reason"])
dlq_produced = Counter("ingestd_dlq_produced_total", "Records delivered to the dead-letter topic",
                       ["topic"])
batch_size = Histogram("ingestd_batch_size", "Records per consumed batch",
                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
dispatch_seconds = Histogram("ingestd_dispatch_seconds", "Time to publish one batch",
                             buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1, 2.5, 5))
commit_failures = Counter("ingestd_commit_failures_total", "Offset commits that failed")
commits = Counter("ingestd_commits_total",
                  "Offset commits the workers sent (librdkafka's own periodic ones aside)")
kafka_requests = Counter("ingestd_kafka_requests_total",
                         "Requests the workers' consumers sent to the Kafka brokers, by type, "
                         "from librdkafka's statistics", ["request"])
consumer_lag = Gauge("ingestd_consumer_lag", "Records behind the partition's high watermark",
                     ["topic", "partition"], multiprocess_mode="livemax")
end_to_end_latency = Histogram(
    "ingestd_end_to_end_latency_seconds",
    "Kafka record timestamp to publish, for the oldest first record of a partition in each "
    "batch",
    # Milliseconds resolved: natural batching publishes within a few of them.
    buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25,
             0.5, 1, 2.5, 5, 10, 30, 60, 300))
dlq_refused = Gauge("ingestd_dlq_refused",
                    "1 while a worker retries letters the dead-letter topic refused "
                    "(partitions paused)", multiprocess_mode="livesum")
fetch_too_large = Gauge("ingestd_fetch_too_large",
                        "1 while a worker cannot fetch a record larger than "
                        "receive.message.max.bytes", multiprocess_mode="livesum")
broker_unreachable = Gauge("ingestd_broker_unreachable",
                           "Workers that cannot reach the broker now: celery (a refused "
                           "batch or a failed queue probe), kafka (no broker connection up "
                           "in librdkafka's statistics) or schema_registry (a batch waits "
                           "for a schema)", ["broker"],
                           multiprocess_mode="livesum")
celery_queue_depth = Gauge("ingestd_celery_queue_depth",
                           "Tasks waiting in the Celery queue, as a worker's probe last saw "
                           "them (every few seconds)", ["queue"], multiprocess_mode="livemax")
backpressure_paused = Gauge("ingestd_backpressure_paused",
                            "1 while a worker is paused because the Celery queue is full",
                            multiprocess_mode="livesum")
workers_alive = Gauge("ingestd_workers_alive", "Worker processes alive",
                      multiprocess_mode="livemax")
worker_restarts = Counter("ingestd_worker_restarts_total", "Workers replaced after they died")
stuck_kills = Counter("ingestd_worker_stuck_kills_total",
                      "Workers the supervisor killed because their loop stopped beating")
# Per worker, for `ingestd status`: which slot owns which partition, and what each dispatched.
worker_dispatched = Counter("ingestd_worker_dispatched_total",
                            "Signals accepted by the Celery broker, by worker slot", ["slot"])
assigned_partitions = Gauge("ingestd_assigned_partitions",
                            "1 for each partition a live worker owns",
                            ["slot", "topic", "partition"], multiprocess_mode="livesum")
# --max-rate: the limit (set by the supervisor), and how many workers it pauses now.
max_rate = Gauge("ingestd_max_rate", "The host's dispatch limit in signals a second (0: none)",
                 multiprocess_mode="livemax")
rate_limited = Gauge("ingestd_rate_limited",
                     "1 while a worker is paused because the host is over --max-rate",
                     multiprocess_mode="livesum")
unowned_partitions = Gauge("ingestd_unowned_partitions",
                           "Partitions of a subscribed topic that no member of the group owns",
                           ["topic"], multiprocess_mode="livemax")
owners_checked = Gauge("ingestd_owners_checked_timestamp_seconds",
                       "When the ownership watcher last had the cluster's answer behind "
                       "ingestd_unowned_partitions (Unix time)", multiprocess_mode="livemax")


# --- dead processes ------------------------------------------------------------

# Held while a scrape reads the files and while a dead process's files are
# folded into the archive, so that no scrape sees them twice or half-gone.
files_lock = threading.Lock()
ARCHIVE_ID = "archive"


def archive_dead_process(pid: int) -> None:
    """Fold a reaped worker's counters and histograms into one archive file per type.

    Without this every restart leaves files behind that every scrape reads
    again; with it the folder holds one file per live process plus the
    archive, and no count is lost. Live gauges of the dead process go away
    (``mark_process_dead``).
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    with files_lock:
        multiprocess.mark_process_dead(pid, directory)
        for kind in ("counter", "histogram"):
            dead = os.path.join(directory, f"{kind}_{pid}.db")
            if not os.path.exists(dead):
                continue
            if os.path.getsize(dead) == 0:  # died before its first write: nothing to fold
                os.remove(dead)
                continue
            archive = MmapedDict(os.path.join(directory, f"{kind}_{ARCHIVE_ID}.db"))
            try:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(dead):
                    current = archive.read_value(key)  # (value, timestamp) in 0.20 and later
                    current = current[0] if isinstance(current, tuple) else current
                    archive.write_value(key, current + value, timestamp)
            except (struct.error, ValueError):
                pass  # a file cut short by the death: what it held cannot be read
            finally:
                archive.close()
            os.remove(dead)
