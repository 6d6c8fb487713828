"""``ingestd status``: what a running ingestd is doing, from its /metrics and /readyz.

One row per worker (slot, pid, partitions, signals/s, lag, restarts, state), then
the totals. Rates need two readings, so a single print takes two, a second apart;
``--watch`` redraws every second on a terminal. ``--json`` prints the same data as
one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
from prometheus_client.parser import text_string_to_metric_families

from ingestd.errors import ExitCode

DEFAULT_URL = "http://127.0.0.1:9102"
INTERVAL = 1.0
TIMEOUT = 5.0
CLEAR = "\x1b[H\x1b[2J"
# Counters shown as totals, each with its rate: name in the JSON -> metric (without _total).
TOTALS = {"consumed": "ingestd_messages_consumed", "dispatched": "ingestd_messages_dispatched",
          "dead_lettered": "ingestd_dlq_produced"}


class Unreachable(Exception):
    """The URL did not answer; the message says why, in one line."""


@dataclass
class Reading:
    """One scrape of /metrics and /readyz."""

    at: float
    wall: float  # time.time() at ``at``
    samples: dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value)
    readyz: dict[str, Any]

    def total(self, name: str) -> float:
        return sum(value for _, value in self.samples.get(name, ()))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in self.samples.get(name, ()):
            out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + value
        return out


def read(url: str) -> Reading:
    """Scrape ``url``'s /metrics and /readyz; raise :class:`Unreachable`."""
    text = _get(f"{url}/metrics").decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    try:
        readyz = orjson.loads(_get(f"{url}/readyz?verbose"))
    except orjson.JSONDecodeError as exc:
        raise Unreachable(f"{url}/readyz: not JSON: {exc}") from None
    return Reading(time.monotonic(), time.time(), samples, readyz)


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:  # /readyz answers 503 while not ready
        if exc.code == 503:
            return exc.read()
        raise Unreachable(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot reach {url}: {getattr(reason, 'strerror', None) or reason}") \
            from None


def snapshot(now: Reading, before: Reading | None) -> dict[str, Any]:
    """The status as one JSON-ready object; rates over the time since ``before``."""
    elapsed = now.at - before.at if before else 0.0

    def rate(name: str, key: str | None = None, label: str = "") -> float | None:
        if before is None or elapsed <= 0:
            return None
        if key is None:
            change = now.total(name) - before.total(name)
        else:
            change = now.by_label(name, label).get(key, 0.0) - \
                before.by_label(name, label).get(key, 0.0)
        return round(max(0.0, change) / elapsed, 1)

    owned: dict[str, dict[str, list[int]]] = {}  # slot -> topic -> partitions
    for labels, value in now.samples.get("ingestd_assigned_partitions", ()):
        if value > 0:
            owned.setdefault(labels["slot"], {}).setdefault(labels["topic"], []).append(
                int(labels["partition"]))
    # Lag of the partitions a worker owns (a gauge's last value outlives a revoke).
    owned_now = {(t, p) for topics in owned.values() for t, ps in topics.items() for p in ps}
    lag = {key: value for labels, value in now.samples.get("ingestd_consumer_lag", ())
           if (key := (labels["topic"], int(labels["partition"]))) in owned_now}
    detail = now.readyz.get("detail", {})
    workers = []
    for row in detail.get("workers", []):
        slot = str(row["slot"])
        partitions = {topic: sorted(ps) for topic, ps in sorted(owned.get(slot, {}).items())}
        workers.append({
            "slot": row["slot"], "pid": row["pid"], "partitions": partitions,
            "signals_per_second": rate("ingestd_worker_dispatched_total", slot, "slot"),
            "lag": int(sum(lag.get((t, p), 0) for t, ps in partitions.items() for p in ps)),
            "restarts": row["restarts"], "state": row["state"]})
    totals = {key: {"count": int(now.total(f"{metric}_total")),
                    "per_second": rate(f"{metric}_total")} for key, metric in TOTALS.items()}
    # A share group's workers own no partitions: no lag, no ownership to show (and
    # confluent-kafka has no share-group admin calls to ask the cluster with).
    share = detail.get("group_type") == "share"
    if share:
        for worker in workers:
            worker["partitions"] = worker["lag"] = None
    return {
        "ready": bool(now.readyz.get("ready")),
        "problems": now.readyz.get("workers", {}),
        "draining": bool(detail.get("draining")),
        "group_type": detail.get("group_type", "classic"),
        "workers": workers,
        "totals": totals,
        "lag": None if share else int(sum(lag.values())),
        "backpressure_paused_workers": int(now.total("ingestd_backpressure_paused")),
        "unowned_partitions": None if share else int(now.total("ingestd_unowned_partitions")),
        # The ownership watcher asks the cluster every few seconds, apart from the rows.
        "unowned_partitions_age_seconds": _age(now.total(
            "ingestd_owners_checked_timestamp_seconds"), now.wall),
        "restarts": int(now.total("ingestd_worker_restarts_total")),
        "max_rate": detail.get("max_rate") or 0,
        "rate_limited_workers": int(now.total("ingestd_rate_limited")),
    }


def render(status: dict[str, Any], url: str) -> str:
    """The status as plain text: a readiness line, one row per worker, then the totals."""
    if status["ready"]:
        head = "ready"
    else:
        why = "; ".join(f"{k}: {v}" for k, v in sorted(status["problems"].items()))
        head = "draining" if status["draining"] else f"NOT READY ({why or 'starting'})"
    lines = [f"ingestd at {url}: {head}", "",
             f"{'slot':>4} {'pid':>8}  {'partitions':<28} {'signals/s':>10} {'lag':>10} "
             f"{'restarts':>9}  state"]
    share = status["group_type"] == "share"
    for w in status["workers"]:
        parts = "shared" if share else " ".join(
            f"{t}[{','.join(map(str, ps))}]" for t, ps in w["partitions"].items())
        lag = "-" if w["lag"] is None else f"{w['lag']:,}"
        lines.append(f"{w['slot']:>4} {w['pid'] or '-':>8}  {parts or '-':<28} "
                     f"{_number(w['signals_per_second']):>10} {lag:>10} "
                     f"{w['restarts']:>9}  {w['state']}")
    lines.append("")
    for key, total in status["totals"].items():
        lines.append(f"{key.replace('_', '-'):>14} {total['count']:>14,}  "
                     f"{_number(total['per_second'])}/s")
    paused = status["backpressure_paused_workers"]
    age = status["unowned_partitions_age_seconds"]
    backpressure = f"backpressure {f'pausing {paused} workers' if paused else 'off'}"
    if share:
        lines += ["", f"share group (every worker takes records of every partition: no lag "
                      f"or ownership to show); {backpressure}; restarts {status['restarts']}"]
    else:
        lines += ["", f"lag {status['lag']:,}; {backpressure}; partitions without an owner "
                      f"{status['unowned_partitions']}"
                      f"{'' if age is None else f' (as the cluster said {age:.0f}s ago)'}; "
                      f"restarts {status['restarts']}"]
    if status["max_rate"]:
        limited = status["rate_limited_workers"]
        lines.append(f"rate limit {_number(status['max_rate'])}/s: "
                     f"{f'pausing {limited} workers' if limited else 'not limiting'}")
    return "\n".join(lines)


def _age(timestamp: float, wall: float) -> float | None:
    """Seconds since a Unix ``timestamp`` (0: never), at ``wall``."""
    return round(max(0.0, wall - timestamp), 1) if timestamp else None


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"ingestd status: error: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.CONFIG)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ingestd status", allow_abbrev=False,
                     description="Show what a running ingestd is doing, from its /metrics "
                                 "and /readyz.")
    parser.add_argument("--url", default=DEFAULT_URL, metavar="URL",
                        help="where ingestd serves /metrics and /readyz (its --metrics-addr)")
    parser.add_argument("--watch", action="store_true",
                        help="redraw every second on a terminal; without one, print once")
    parser.add_argument("--json", action="store_true",
                        help="print the same data as one JSON object")
    return parser


def main(argv: Sequence[str]) -> int:
    opts = build_parser().parse_args(list(argv))
    url = opts.url.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    watch = opts.watch and sys.stdout.isatty() and not opts.json
    before: Reading | None = None
    try:
        while True:
            try:
                if before is None:
                    before = read(url)
                    time.sleep(INTERVAL)
                now = read(url)
            except Unreachable as exc:
                if not watch:
                    print(f"ingestd status: {exc}", file=sys.stderr)
                    return ExitCode.RUNTIME
                # Watching goes on: ingestd may be restarting.
                print(f"{CLEAR}ingestd status: {exc}; retrying", flush=True)
                before = None
                time.sleep(INTERVAL)
                continue
            status = snapshot(now, before)
            if opts.json:
                print(orjson.dumps(status).decode())
            else:
                print((CLEAR if watch else "") + render(status, url), flush=True)
            if not watch:
                return ExitCode.OK
            before = now
            time.sleep(INTERVAL)
    except KeyboardInterrupt:
        return ExitCode.OK
