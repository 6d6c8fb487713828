"""``deploy/``: the Prometheus alert rules pass promtool's check and their own unit tests,
and the Grafana dashboard and the rules name only metrics a live ingestd exports, so a
renamed metric fails the build.

promtool comes from Debian's ``prometheus`` package; ``scripts/test`` installs it."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests import stack
from tests.test_cli import INVALID, Ingestd, sample, scrape

DEPLOY = stack.REPO / "deploy"
RULES = DEPLOY / "prometheus" / "ingestd-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "ingestd-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "ingestd.json"
METRIC = re.compile(r"\bingestd_[a-z0-9_]+")
# What Grafana fills in before a query runs, and what stands for it in a rule file.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool not found: scripts/test installs Debian's prometheus package"
    return subprocess.run([tool, *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=RULES.parent)


def dashboard_queries() -> dict[str, list[str]]:
    """Each panel's title and its PromQL."""
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    return {panel["title"]: [t["expr"] for t in panel["targets"]]
            for panel in dashboard["panels"]}


def test_the_alert_rules_pass_promtools_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", RULE_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    alerts = re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE)
    assert len(alerts) == len(set(alerts)) >= 7
    tests = RULE_TESTS.read_text()
    for alert in alerts:
        # an evaluation of it whose expected alerts are not the empty list
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts:\n", tests), alert


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool has no query check of its own: each panel's queries become recording
    rules, which it parses."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for title, exprs in dashboard_queries().items():
        for i, expr in enumerate(exprs):
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            lines += [f"      - record: panel_{len(lines)}_{i}",
                      f"        expr: {orjson.dumps(expr).decode()}  # {title}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    checked = promtool("check", "rules", rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_has_the_panels_an_operator_needs() -> None:
    titles = set(dashboard_queries())
    assert titles >= {"Signals per second", "Lag by topic and partition",
                      "Celery queue depth and backpressure", "Rate limit", "Dispatch latency",
                      "End-to-end latency", "Workers: restarts and stuck kills",
                      "Partitions without an owner", "Broker outages"}


@pytest.mark.stack
def test_the_dashboard_and_the_rules_name_only_metrics_a_live_ingestd_exports(
        topic_factory: Callable[..., str], broker_url: str) -> None:
    """A real ingestd consumes valid and invalid records; every ``ingestd_*`` name in the
    dashboard and the rules must be among the samples its /metrics serves."""
    topic = topic_factory(partitions=2)
    topic_factory(partitions=1, name=f"{topic}.dlq")
    port = stack.free_port()
    base = f"http://127.0.0.1:{port}"
    valid = 50
    stack.produce(topic, [stack.signal_record(i) for i in range(valid)] + list(INVALID))
    args = stack.ingestd_args(topic, stack.group(), broker_url,
                              "--metrics-addr", f"127.0.0.1:{port}")
    wanted = set(METRIC.findall(DASHBOARD.read_text())) | set(METRIC.findall(RULES.read_text()))
    with Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: stack.http_get(f"{base}/readyz")[0] == 200, 90), \
            ingestd.output()[-3000:]

        def exported() -> set[str]:
            return {name for name, _ in scrape(base)}

        # The lag comes with librdkafka's statistics (5 s), the owners with the watcher's
        # first answer: the last names to appear.
        assert stack.wait_until(lambda: wanted <= exported(), 60), \
            (sorted(wanted - exported()), ingestd.output()[-3000:])
        samples = scrape(base)
    assert sample(samples, "ingestd_messages_consumed_total", topic=topic) == \
        valid + len(INVALID)
    assert sample(samples, "ingestd_celery_queue_depth", queue="celery") is not None
    assert {labels for name, labels in samples if name == "ingestd_broker_unreachable"} == \
        {(("broker", "celery"),), (("broker", "kafka"),), (("broker", "schema_registry"),)}
