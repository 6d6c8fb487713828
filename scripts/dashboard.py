"""Driver for scripts/dashboard: the Grafana dashboard's panels, rendered from a real run.

A Prometheus server (Debian's, on a port and folder of its own) scrapes a run of
``scripts/demo`` every second, with ``deploy/prometheus/ingestd-alerts.yml`` loaded.
During the run one worker is SIGKILLed and the stack's Redis is paused for a few
seconds, so that restarts and a broker outage show. Then each panel of
``deploy/grafana/ingestd.json`` is asked of Prometheus over the run and drawn where
the dashboard puts it, into one PNG (matplotlib; Grafana itself is not needed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "ingestd.json"
RULES = REPO / "deploy" / "prometheus" / "ingestd-alerts.yml"
SCRAPE = "1s"
RATE_INTERVAL = "10s"  # $__rate_interval at this scrape interval
PAUSE = 15.0  # Redis paused: longer than a publish waits (10 s), so a batch is refused


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def start_prometheus(folder: Path, target: str, port: int) -> subprocess.Popen[bytes]:
    shutil.copy(RULES, folder / RULES.name)
    (folder / "prometheus.yml").write_text(
        f"global: {{scrape_interval: {SCRAPE}, evaluation_interval: {SCRAPE}}}\n"
        f"rule_files: [{RULES.name}]\n"
        "scrape_configs:\n"
        f"  - job_name: ingestd\n    static_configs: [{{targets: ['{target}']}}]\n")
    return subprocess.Popen(
        ["prometheus", f"--config.file={folder / 'prometheus.yml'}",
         f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(folder / "prometheus.log").open("wb"), stderr=subprocess.STDOUT)


def disturb(metrics: str, kill_at: float, pause_at: float, pause_for: float,
            stop: threading.Event) -> None:
    """SIGKILL one ingestd worker, then pause the stack's Redis for a while."""
    started = time.monotonic()
    if stop.wait(kill_at):
        return
    try:
        workers = get(f"http://{metrics}/readyz?verbose")["detail"]["workers"]
        pid = next(w["pid"] for w in workers if w["pid"])
        os.kill(pid, signal.SIGKILL)
        print(f"dashboard: SIGKILLed worker pid {pid}")
    except (OSError, StopIteration, KeyError, ValueError) as exc:
        print(f"dashboard: could not kill a worker: {exc}")
    if stop.wait(max(0.0, pause_at - (time.monotonic() - started))):
        return
    redis_pid = int((REPO / ".stack" / "redis" / "redis.pid").read_text())
    os.kill(redis_pid, signal.SIGSTOP)
    print(f"dashboard: Redis paused for {pause_for:.0f} s")
    try:
        stop.wait(pause_for)
    finally:
        os.kill(redis_pid, signal.SIGCONT)


def query_range(prometheus: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$instance", ".*")
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
    answer = get(f"{prometheus}/api/v1/query_range?{params}")
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def render(prometheus: str, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(16, rows * 0.42))
    fig.suptitle(f"{dashboard['title']}: panels of deploy/grafana/ingestd.json over a "
                 f"{end - start:.0f} s run of scripts/demo (a worker SIGKILLed, Redis paused)",
                 fontsize=11)
    grid = fig.add_gridspec(rows, 24, hspace=2.2, wspace=1.2, top=0.95, bottom=0.03)
    for panel in panels:
        pos = panel["gridPos"]
        ax = fig.add_subplot(grid[pos["y"]:pos["y"] + pos["h"] - 1, pos["x"]:pos["x"] + pos["w"]])
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        for target in panel["targets"]:
            for series in query_range(prometheus, target["expr"], start, end):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, linewidth=1,
                        label=legend(target["legendFormat"], series["metric"]))
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        ax.set_ylabel({"s": "seconds", "ops": "per second"}.get(unit, ""), fontsize=7)
        ax.set_xlabel("seconds into the run", fontsize=7)
        ax.set_xlim(0, end - start)
        ax.set_ylim(bottom=0)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
    fig.savefig(out, dpi=80, bbox_inches="tight")
    print(f"dashboard: wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/dashboard")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=REPO / "deploy" / "grafana" / "ingestd.png")
    opts = parser.parse_args()
    metrics = f"127.0.0.1:{free_port()}"
    port = free_port()
    prometheus_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="ingestd-dashboard-") as tmp:
        server = start_prometheus(Path(tmp), metrics, port)
        stop = threading.Event()
        try:
            start = time.time()
            disturber = threading.Thread(target=disturb, args=(
                metrics, opts.seconds * 0.3, opts.seconds * 0.55, PAUSE, stop))
            disturber.start()
            demo = subprocess.run(
                [sys.executable, str(REPO / "scripts" / "demo.py"), "--seconds",
                 str(opts.seconds), "--rate", str(opts.rate), "--metrics-addr", metrics],
                check=False)
            stop.set()
            disturber.join()
            end = time.time()
            render(prometheus_url, start, end, opts.out)
        finally:
            stop.set()
            server.terminate()
            server.wait(30)
    return demo.returncode


if __name__ == "__main__":
    sys.exit(main())
