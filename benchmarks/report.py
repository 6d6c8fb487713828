"""Print the README's end-to-end table from a pytest-benchmark JSON file.

    python benchmarks/report.py .benchmarks/<machine>/<run>.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

ROWS = [
    ("test_baseline_send_task_per_message", "old script: `send_task` per message"),
    ("test_raw_pipe_lpush_bytes", "raw pipe: LPUSH the bytes, no decoding"),
    ("test_ingestd_one_worker[each]", "**ingestd**, 1 worker, `--dispatch each`"),
    ("test_ingestd_one_worker[batch]", "ingestd, 1 worker, `--dispatch batch`"),
]


def table(data: dict[str, Any]) -> str:
    found = {b["name"]: b["extra_info"] for b in data["benchmarks"]}
    base = found.get(ROWS[0][0], {}).get("steady_signals_per_s")
    raw = found.get(ROWS[1][0], {}).get("steady_signals_per_s")
    lines = ["| pipeline | records | signals/s (whole run) | signals/s (steady) | "
             "vs old script | share of raw pipe | peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, label in ROWS:
        info = found.get(name)
        if info is None:
            continue
        steady = info["steady_signals_per_s"]
        times = f"{steady / base:.0f}x" if base else ""
        share = f"{steady / raw:.2f}" if raw else ""
        rss = f"{info['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in info else ""
        lines.append(f"| {label} | {info['records']:,} | {info['signals_per_s']:,} | "
                     f"{steady:,} | {times} | {share} | {rss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(table(json.load(fh)))
