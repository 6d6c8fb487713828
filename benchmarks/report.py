"""``BENCHMARKS.md`` and its chart from a results file that ``scripts/bench`` wrote
(pytest-benchmark's JSON), and the change from the results file before it.

    python -m benchmarks.report benchmarks/results/2026-12-02.json   # BENCHMARKS.md + chart
    python -m benchmarks.report --compare                            # newest vs the one before
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARKDOWN = HERE.parent / "BENCHMARKS.md"
CHART = RESULTS / "throughput.png"

# (benchmark name, label), in the order of the tables.
THROUGHPUT = [
    ("test_alternative[old-", "old script: `send_task` per message"),
    ("test_alternative[raw-", "raw pipe: LPUSH the bytes, no decoding"),
    ("test_ingestd[each-1]", "**ingestd** `--workers 1 --dispatch each`"),
    ("test_ingestd[each-2]", "ingestd `--workers 2 --dispatch each`"),
    ("test_ingestd[batch-1]", "ingestd `--workers 1 --dispatch batch`"),
    ("test_ingestd[each-8]", "ingestd `--workers 8 --dispatch each` (classic group: 4 "
                             "partitions, so 4 workers at most)"),
    ("test_ingestd[share-each-8]", "ingestd `--workers 8 --dispatch each --group-type share`"),
]
# (pipeline, workers) of a latency benchmark, and its label.
LATENCY = {("raw pipe", 1): "raw pipe, natural batching", ("ingestd", 1): "ingestd `--workers 1`",
           ("ingestd", 2): "ingestd `--workers 2`"}
# The micro benchmark of ingestd's own step in each group, for the CPU profile.
STEPS = [
    ("test_decode_validate[a2-ingestd-Validator.check typed (each mode, no dict)]",
     "decode + validate (each mode: typed, no dict)"),
    ("test_build_ingestd[C]", "build the Celery message and the LPUSH command (C)"),
    ("test_build_ingestd[Python]", "... the same where `ingestd._native` is not built"),
    ("test_publish_lpush_multi", "publish: one multi-value LPUSH, wall time per record, "
                                 "Redis's own work included"),
    ("test_decode_build_record_headers[no headers]",
     "decode + build of a consumed record without headers (the hot path)"),
    ("test_decode_build_record_headers[other headers]",
     "... with headers, none of them trace context"),
    ("test_decode_build_record_headers[traceparent]",
     "... with `traceparent` and `tracestate` (passed on: the message is built from a dict)"),
    ("test_decode_build_record_headers[no headers, --with-metadata]",
     "... without headers, with `--with-metadata` (the `kafka` dict, its JSON and "
     "`kwargsrepr`)"),
]


def _by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in data["benchmarks"]}


def _find(found: dict[str, dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    return next((b["extra_info"] for name, b in found.items() if name.startswith(prefix)), None)


def throughput_rows(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = _by_name(data)
    rows = []
    for prefix, label in THROUGHPUT:
        info = _find(found, prefix)
        if info is not None:
            rows.append((label, info))
    return rows


def throughput_table(data: dict[str, Any]) -> str:
    found = _by_name(data)
    base = (_find(found, THROUGHPUT[0][0]) or {}).get("steady_signals_per_s")
    raw = (_find(found, THROUGHPUT[1][0]) or {}).get("steady_signals_per_s")
    lines = ["| pipeline | records | signals/s (whole run) | signals/s (steady) | vs old script "
             "| share of raw pipe | CPU µs per signal | peak RSS | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, info in throughput_rows(data):
        steady = info["steady_signals_per_s"]
        times = f"{steady / base:.0f}x" if base else ""
        share = f"{steady / raw:.2f}" if raw else ""
        lines.append(f"| {label} | {info['records']:,} | {info['signals_per_s']:,} | "
                     f"{steady:,} | {times} | {share} | {info['cpu_us_per_signal']:.1f} | "
                     f"{info['peak_rss_mb']:.0f} MB | {info.get('mean_batch', '')} |")
    return "\n".join(lines)


def latency_table(data: dict[str, Any]) -> str:
    """By rate and producer: the raw pipe, then ingestd, with ingestd's p50 and p90 as a
    multiple of the raw pipe's in the same run."""
    runs: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        key = (info.get("pipeline"), info.get("workers"))
        if b["name"].startswith("test_latency") and key in LATENCY:
            runs.setdefault((info["rate"], info.get("linger_ms", 1)), {})[LATENCY[key]] = info
    lines = ["| rate | producer's linger.ms | pipeline | p50 | p90 | p99 | max | p50, p90 "
             "vs raw | its Kafka requests/s | the producer's send → ack, p50, p90 |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (rate, linger), by_label in sorted(runs.items()):
        raw = by_label.get(LATENCY[("raw pipe", 1)])
        for label in LATENCY.values():
            info = by_label.get(label)
            if info is None:
                continue
            ratio = (f"{info['p50_ms'] / raw['p50_ms']:.1f}x, {info['p90_ms'] / raw['p90_ms']:.1f}x"
                     if raw and info is not raw else "")
            if info["records"] > 1.05 * info.get("expected_records", info["records"]):
                label += " (the producer fell behind its pace)"
            lines.append(f"| {rate:,}/s | {linger} | {label} | {info['p50_ms']:.1f} ms | "
                         f"{info['p90_ms']:.1f} ms | {info['p99_ms']:.1f} ms | "
                         f"{info['max_ms']:.0f} ms | {ratio} | "
                         f"{info.get('kafka_requests_per_s', '')} | {_acks(info)} |")
    return "\n".join(lines)


def _acks(info: dict[str, Any]) -> str:
    if "ack_p50_ms" not in info:  # results from before it was measured
        return ""
    return f"{info['ack_p50_ms']:.1f} ms, {info['ack_p90_ms']:.1f} ms"


def micro_table(data: dict[str, Any]) -> str:
    """Every micro benchmark by group: the mean per record, ingestd's own first."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for b in data["benchmarks"]:
        us = b["extra_info"].get("mean_per_record_us")
        if us is not None:
            groups.setdefault(b["group"] or "", []).append((b["name"], us))
    lines = ["| group | variant | µs per record |", "|---|---|---:|"]
    for group, rows in groups.items():
        for name, us in rows:
            variant = name.split("[", 1)[1][:-1] if "[" in name else name.removeprefix("test_")
            lines.append(f"| {group} | {variant} | {us:.2f} |")
    return "\n".join(lines)


def profile_lines(data: dict[str, Any]) -> list[str]:
    found = _by_name(data)
    out = []
    for name, label in STEPS:
        us = found.get(name, {}).get("extra_info", {}).get("mean_per_record_us")
        if us is not None:
            out.append(f"- {label}: {us:.2f} µs")
    return out


def _per_record(found: dict[str, dict[str, Any]], name: str) -> float | None:
    us: float | None = found.get(name, {}).get("extra_info", {}).get("mean_per_record_us")
    return us


def where_it_goes(data: dict[str, Any]) -> list[str]:
    """The end-to-end CPU per signal split by thread, beside the floor the micro benchmarks
    give: what librdkafka and the per-record steps cost before anything is published."""
    found = _by_name(data)
    one = _find(found, "test_ingestd[each-1]") or {}
    roles: dict[str, float] = one.get("cpu_us_by_role", {})
    consume = _per_record(found, "test_consume[consume(1000)]")
    single = _per_record(found, "test_consume[consume(1), 1000 times]")
    path = _per_record(found, "test_consume[consume(1000), decode, build]")
    floor = _per_record(found, "test_decode_validate[f-msgspec.Decoder(Signal) only "
                               "(floor, no dict)]")
    build = _per_record(found, "test_build_ingestd[C]")
    out = []
    if roles:
        split = ", ".join(f"{role} {us:.2f} µs" for role, us in roles.items() if us)
        out.append(f"- **By thread**, in the end-to-end run (`--workers 1 --dispatch each`, "
                   f"{one['cpu_us_per_signal']:.1f} µs a signal): {split}.")
    if consume is not None and single is not None and path is not None:
        out.append(
            f"- **librdkafka's hand-over**: `Consumer.consume` makes a `Message` per record, "
            f"{consume:.2f} µs a record in a call of 1,000, {single:.2f} µs in a call a "
            f"record (so a worker that waits for a commit takes up to a batch in one call). "
            f"Consume, decode and build of fetched records, the loop thread's whole "
            f"per-record path: {path:.2f} µs.")
    if consume is not None and floor is not None and build is not None and path is not None \
            and roles:
        rdk = roles.get("librdkafka's threads", 0.0)
        loop = roles.get("the loop's thread", 0.0)
        least = rdk + consume + floor + build
        out.append(
            f"- **The floor**: librdkafka's threads ({rdk:.2f}), its hand-over ({consume:.2f}), "
            f"msgspec decoding into the schema's Struct and nothing else ({floor:.2f}) and "
            f"the C build of the message ({build:.2f}) add up to {least:.2f} µs a signal, "
            "before a byte is published.")
        memory = _per_record(found, "test_decode_build_record_headers[no headers]")
        fresh = (f" Of it, {path - consume - memory:.2f} µs is what the decode and build "
                 f"of just-consumed records cost beyond the same records made in memory "
                 f"({memory:.2f}).") if memory is not None else ""
        out.append(
            f"- **What is above it**: the loop thread's per-record path measured "
            f"{path:.2f} µs against the {consume + floor + build:.2f} of its parts: "
            f"{path - consume - floor - build:.2f} µs is Python around them, per record, "
            "in `Pipeline.decode` (the checks before msgspec, a `Task` and its id, the "
            f"run bookkeeping).{fresh} The loop thread spent {loop:.2f} µs a signal end to "
            "end, so the loop's own work per batch (offsets, commits, metrics, waits) "
            f"comes to about {max(loop - path, 0):.2f} µs a signal. The next step down is "
            "the per-record Python: a C pass over the `Message` objects, as the build's.")
    return out


def scaling(data: dict[str, Any]) -> list[str]:
    """A model of how throughput grows with workers, from the measured costs."""
    rows = dict(throughput_rows(data))
    one = next((v for k, v in rows.items() if "--workers 1 --dispatch each" in k), None)
    two = next((v for k, v in rows.items() if "--workers 2" in k), None)
    raw = next((v for k, v in rows.items() if k.startswith("raw pipe")), None)
    if one is None:
        return []
    cpu = one["cpu_us_per_signal"]
    per_core = 1e6 / cpu if cpu else 0
    lines = [
        f"- **CPU.** ingestd spends {cpu:.1f} CPU µs per signal (all its processes), so one "
        f"core carries about {per_core:,.0f} signals/s. Workers scale with the cores that "
        "are free: a host with C spare cores carries about C times that, until one of the "
        "limits below binds first.",
    ]
    if two is not None:
        lines.append(
            f"- **Measured here**: 1 worker {one['steady_signals_per_s']:,}/s, 2 workers "
            f"{two['steady_signals_per_s']:,}/s. This machine has 2 cores, shared with the "
            "Kafka broker, Redis and the benchmark itself, so a second worker adds less than "
            "a core here, and the figure moves from run to run.")
    if raw is not None:
        lines.append(
            f"- **The Celery broker.** Redis is single-threaded. The raw pipe, which only "
            f"moves bytes, reached {raw['steady_signals_per_s']:,}/s on this machine; every "
            "ingestd message is about 1 KB (the Celery envelope, base64 body and `argsrepr`), "
            "so Redis's own cost per task is the larger one: with many workers, one Redis "
            "core is the first ceiling. Shard queues, or use `--dispatch batch` (one task per "
            "partition slice), to go past it.")
    lines += [
        "- **The network.** At about 1 KB per task, 1 Gbit/s to the broker carries about "
        "120,000 tasks/s in `each` mode; the Kafka side reads ~200 bytes per signal, five "
        "times less.",
        "- **Kafka fetch.** Each worker's consumer prefetches up to 32 MiB "
        "(`queued.max.messages.kbytes`); a partition is read by one worker, so more workers "
        "than partitions add nothing, unless they form a share group (below).",
    ]
    return lines + share_groups(data)


def share_groups(data: dict[str, Any]) -> list[str]:
    """8 workers on 4 partitions, classic and share, and a model of 16 cores."""
    found = _by_name(data)
    classic = _find(found, "test_ingestd[each-8]")
    share = _find(found, "test_ingestd[share-each-8]")
    raw = _find(found, THROUGHPUT[1][0])
    if classic is None or share is None:
        return []
    lines = [
        f"- **More workers than partitions** (8 workers, 4 partitions, this run): the classic "
        f"group kept {classic.get('busy_workers', '?')} busy, {classic['steady_signals_per_s']:,}"
        f"/s steady at {classic['cpu_us_per_signal']:.1f} CPU µs a signal; the share group "
        f"kept {share.get('busy_workers', '?')} busy, {share['steady_signals_per_s']:,}/s at "
        f"{share['cpu_us_per_signal']:.1f} µs. Over the whole run "
        f"{classic['signals_per_s']:,}/s and {share['signals_per_s']:,}/s: Kafka hands a "
        "share group's partitions to its members at their heartbeats (every 5 s), so while "
        "the workers join, some partitions wait for the next round; on a small backlog that "
        "is most of the run. On 2 cores shared with Kafka and Redis, neither can use "
        "more than these cores, so the share group's extra workers show no gain here.",
    ]
    per_core_classic = 1e6 / classic["cpu_us_per_signal"]
    per_core_share = 1e6 / share["cpu_us_per_signal"]
    ceiling = (f"{raw['steady_signals_per_s']:,}/s (the raw pipe here)" if raw
               else "a core of its own")
    lines.append(
        f"- **A 16-core model** (an ingest host, Kafka and Redis on hosts of their own). With "
        f"these costs a worker's core carries about {per_core_classic:,.0f} signals/s in a "
        f"classic group and {per_core_share:,.0f} in a share group (each record is "
        f"acknowledged on its own). On 4 partitions a classic group uses 4 cores: about "
        f"{4 * per_core_classic:,.0f}/s; a share group of 16 workers about "
        f"{16 * per_core_share:,.0f}/s, if the Celery broker keeps up. One Redis does not: "
        f"its ceiling, {ceiling}, binds first, "
        "so share groups pay where the per-record work is heavier (a registry decode, "
        "`--with-metadata`) or the tasks go to several brokers or queues.")
    return lines


def chart(data: dict[str, Any], path: Path) -> bool:
    """A bar chart of steady signals/s by pipeline (log scale); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = throughput_rows(data)
    labels = [label.replace("`", "").replace("*", "") for label, _ in rows]
    rates = [info["steady_signals_per_s"] for _, info in rows]
    colors = ["#999999" if "old" in x else "#4c72b0" if "raw" in x else "#dd8452"
              for x in labels]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    bars = ax.barh(labels[::-1], rates[::-1], color=colors[::-1])
    ax.set_xscale("log")
    ax.set_xlabel("signals/s at steady rate (log scale)")
    ax.bar_label(bars, labels=[f"{r:,}" for r in rates[::-1]], padding=3, fontsize=8)
    ax.set_xlim(right=max(rates) * 4)
    ax.set_title("Kafka backlog to Celery queue, same run")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def machine(data: dict[str, Any]) -> str:
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {})
    return (f"{cpu.get('brand_raw', m.get('processor', '?'))}, {cpu.get('count', '?')} cores, "
            f"{m.get('system', '')} {m.get('release', '')}, Python {m.get('python_version', '')}"
            ", Kafka, Redis and the pipelines on the same machine")


def markdown(data: dict[str, Any], source: Path, has_chart: bool) -> str:
    commit = data.get("commit_info", {}).get("id", "")[:10]
    parts = [
        "# Benchmarks",
        "",
        "Generated by `scripts/bench` (`benchmarks/report.py`) from "
        f"`{source.relative_to(HERE.parent) if source.is_relative_to(HERE.parent) else source}`"
        f", run {data.get('datetime', '')[:16]} at commit `{commit}`.",
        "",
        f"**Machine:** {machine(data)}. It is shared, so rates move between runs; "
        "the CPU per signal moves less. Every row of a table comes from the same run.",
        "",
        "## Throughput: a backlog drained",
        "",
        "A 4-partition topic is preloaded with signals of about 200 bytes with tags. Each "
        "pipeline drains it into a Redis queue of its own. Steady rate runs from the first "
        "signal out to the last, leaving out process start and the group join. CPU is user + "
        "system of every process of the pipeline, from `/proc`, at steady rate, divided by the "
        "signals. Peak RSS is the largest process's.",
        "",
        throughput_table(data),
        "",
    ]
    if has_chart:
        parts += [f"![signals/s by pipeline]({CHART.relative_to(HERE.parent)})", ""]
    parts += [
        "## Latency at a fixed rate",
        "",
        "A producer on the same machine sends signals at a fixed rate, each carrying its send "
        "time: with `linger.ms=0` (a produce request per record, as low-latency producers "
        "send) and with `linger.ms=5`. A reader pops the Celery queue as it fills. From send "
        "to arrival in the queue, ingestd beside the raw pipe of the same run. Then the "
        "requests the pipeline's own consumers sent to Kafka a second (fetches, "
        "heartbeats, commits), from librdkafka's statistics; and the producer's own leg, "
        "from a signal's send to the broker's acknowledgement (the leader appended it): no "
        "pipeline can deliver a signal before the broker has it, so where that leg is most "
        "of the latency, the broker is what holds the signals:",
        "",
        latency_table(data),
        "",
        "p99 and max on this shared 2-core machine are mostly scheduling noise.",
        "",
        "## Where a signal's CPU goes",
        "",
        "ingestd's own steps, per record of a 1,000-record batch (`benchmarks/test_micro.py`):",
        "",
        *profile_lines(data),
        "",
        *where_it_goes(data),
        "",
        "## Scaling",
        "",
        *scaling(data),
        "",
        "## Every micro benchmark",
        "",
        micro_table(data),
        "",
    ]
    return "\n".join(parts)


def results_files() -> list[Path]:
    """Oldest first, by when each run started (file times mean nothing after a clone)."""
    return sorted(RESULTS.glob("*.json"), key=lambda p: json.loads(p.read_text())["datetime"])


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What changed between two results files, for people (not a gate)."""
    keys = ("steady_signals_per_s", "cpu_us_per_signal", "peak_rss_mb", "p50_ms", "p90_ms",
            "p99_ms", "mean_per_record_us")
    before = {b["name"]: b["extra_info"] for b in old["benchmarks"]}
    lines = [f"{'benchmark':58} {'measure':22} {'before':>12} {'after':>12} {'change':>8}"]
    for b in new["benchmarks"]:
        prev = before.get(b["name"])
        if prev is None:
            continue
        for key in keys:
            if key in b["extra_info"] and key in prev and prev[key]:
                a, z = prev[key], b["extra_info"][key]
                lines.append(f"{b['name'][:58]:58} {key:22} {a:>12,} {z:>12,} "
                             f"{(z - a) / a:>+8.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.report")
    parser.add_argument("results", nargs="?", type=Path,
                        help="a results file: write BENCHMARKS.md and the chart from it")
    parser.add_argument("--compare", action="store_true",
                        help="print the change from the results file before the newest")
    a = parser.parse_args(argv)
    if a.results is not None:
        data = json.loads(a.results.read_text())
        has_chart = chart(data, CHART)
        MARKDOWN.write_text(markdown(data, a.results.resolve(), has_chart))
        print(throughput_table(data), latency_table(data), sep="\n\n")
        print(f"\nwrote {MARKDOWN}" + (f" and {CHART}" if has_chart else " (no chart: "
                                                                         "matplotlib missing)"))
    if a.compare:
        files = results_files()
        if len(files) < 2:
            print("compare: fewer than two results files in benchmarks/results",
                  file=sys.stderr)
            return 1
        print(f"{files[-2].name} -> {files[-1].name}")
        print(compare(json.loads(files[-2].read_text()), json.loads(files[-1].read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
