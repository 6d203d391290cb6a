"""monitoring/: the alert rules pass `promtool check rules`, their unit tests pass
`promtool test rules` and cover every alert, and every metric name the rules and the Grafana
dashboard use is one the agent exports (compared with the golden expositions; the lab test in
tests/lab/test_metrics_lab.py compares with a live scrape as well)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.monitoring_files import (
    DASHBOARD,
    MONITORING,
    RULES,
    promql_metric_names,
    used_metric_names,
)

RULE_TESTS = sorted((MONITORING / "tests").glob("*.yml"))
GOLDEN = Path(__file__).parents[1] / "golden" / "metrics"
# Series Prometheus makes itself, not the agent.
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds"}


def golden_names() -> set[str]:
    names = set()
    for path in GOLDEN.glob("*.prom"):
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                names.add(line.split("{")[0].split(" ")[0])
    return names


# The process collector's names (not in the golden files: their values change every run).
PROCESS_NAMES = {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
}


def test_the_name_parser_sees_through_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, instance) (rate(foo_bucket{instance=~"$instance",'
        ' job="x"}[$__rate_interval]))) / on (instance) group_left (device) bar_total offset 5m'
        " and time() - baz > 900 unless count without (endpoint) (qux == bool 1)"
    )
    assert promql_metric_names(expr) == {"foo_bucket", "bar_total", "baz", "qux"}
    assert promql_metric_names("label_values(gatepeer_up, instance)") == {"gatepeer_up"}
    assert promql_metric_names('up{job="gatepeer"} == 0') == {"up"}


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    used = used_metric_names()
    assert len(used) > 25, used  # the parser found the expressions at all
    unknown = used - golden_names() - PROCESS_NAMES - PROMETHEUS_OWN
    assert not unknown, f"not exported by the agent: {sorted(unknown)}"


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown staying quiet"
    assert fired <= alerts, "tests name alerts that do not exist"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool (Debian package prometheus)")
    return promtool


def test_promtool_check_rules() -> None:
    proc = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_test_rules() -> None:
    assert RULE_TESTS, "no rule unit tests in monitoring/tests"
    proc = subprocess.run(
        [_promtool(), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        cwd=MONITORING / "tests",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "gatepeer"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p.get("targets") for p in panels)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
