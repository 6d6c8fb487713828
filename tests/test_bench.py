"""The benchmark harness on a small corpus: it counts every signal and writes a results
file that the report reads. Real stack; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from tests import stack

pytestmark = pytest.mark.stack


def test_the_harness_counts_every_signal_and_writes_a_results_file(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    env = {**os.environ, "INGESTD_BENCH_RECORDS": "2000", "INGESTD_BENCH_BASELINE_RECORDS": "300",
           "INGESTD_BENCH_RATES": "500", "INGESTD_BENCH_LINGERS": "0",
           "INGESTD_BENCH_SECONDS": "2"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_end_to_end.py",
         "benchmarks/test_latency.py", "-p", "no:cacheprovider", "-q", "--benchmark-enable",
         f"--benchmark-json={results}"],
        cwd=stack.REPO, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    data = json.loads(results.read_text())
    info = {b["name"]: b["extra_info"] for b in data["benchmarks"]}
    assert set(info) == {"test_ingestd[each-1]", "test_ingestd[each-2]", "test_ingestd[batch-1]",
                         "test_ingestd[each-8]", "test_ingestd[share-each-8]",
                         "test_alternative[old-300]", "test_alternative[raw-2000]",
                         "test_latency_ingestd[500-0-1]", "test_latency_ingestd[500-0-2]",
                         "test_latency_raw_pipe[500-0]"}
    for name, extra in info.items():
        if name.startswith("test_latency"):
            assert abs(extra["records"] - 1000) <= 25  # 2 s at 500/s, after the warm-up
            assert 0 < extra["p50_ms"] <= extra["p90_ms"] <= extra["p99_ms"] <= extra["max_ms"]
        else:
            assert extra["records"] == (300 if "old" in name else 2000)
            assert extra["signals_per_s"] > 0 and extra["cpu_us_per_signal"] > 0
            assert extra["peak_rss_mb"] > 0
    text = report.markdown(data, results, has_chart=False)
    for label in [label for _, label in report.THROUGHPUT] + list(report.LATENCY.values()):
        assert f"| {label} |" in text
    assert report.chart(data, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
