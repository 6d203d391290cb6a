"""Metrics in a lab: a live scrape of `gatepeer run` checked by promtool and scraped by a real
Prometheus server; SIGHUP moves the listener.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.exposition import sample_names

# ---- in a lab: the real agent, promtool, a real Prometheus --------------------------------


def _peer_get(lab: Any, url: str) -> str:
    """GET from inside the lab's gate peer namespace (the metrics listen on its address)."""
    code = (
        "import sys, urllib.request\n"
        f"sys.stdout.write(urllib.request.urlopen({url!r}, timeout=5).read().decode())\n"
    )
    return str(lab.run("peer", sys.executable, "-c", code).stdout)


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


@pytest.mark.netns
def test_live_scrape_passes_promtool_and_a_real_prometheus_sees_both_endpoints_up(
    make_lab: Callable[..., Any], tmp_path: Path
) -> None:
    from helpers.lab_agent import METRICS_URL, running_agent

    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    if promtool is None or prometheus is None:
        pytest.skip("needs promtool and prometheus (Debian package prometheus)")
    lab = make_lab()
    with running_agent(lab) as agent:
        text = _wait(
            lambda: "gatepeer_vpg_endpoint_up{" in (t := _peer_get(lab, METRICS_URL)) and t,
            20,
            "a scrape with probe results",
        )
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True
        )
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
        secret = lab.paths.auth_key.read_text().strip()
        assert secret and secret not in text
        # Every metric the rules and the dashboard use is in the live exposition too (the
        # golden-file check in test_monitoring covers the ones a lab cannot produce).
        from helpers.monitoring_files import rule_expressions, used_metric_names

        live = sample_names(text)
        lab_cannot = {"gatepeer_neighbour_table_limit"}  # not in a non-initial namespace
        # Off in this lab's config or absent from its kernel: per-device counters (their
        # series: test_device_metrics_lab.py), the flow log (test_flow_log_lab.py), ENA.
        lab_cannot |= {
            n
            for n in used_metric_names()
            if n.startswith(("gatepeer_device", "gatepeer_flow_log_", "gatepeer_ena_"))
        }
        assert used_metric_names() - live - {"up"} <= lab_cannot

        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: ["
            + json.dumps(str(Path(__file__).parents[2] / "monitoring" / "alerts.yml"))
            + "]\n"
            "scrape_configs:\n"
            "  - job_name: gatepeer\n"
            f"    static_configs: [{{targets: ['{METRICS_URL.split('/')[2]}']}}]\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                lab.ns("peer"),
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                "--web.listen-address=127.0.0.1:9090",
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:

            def query(promql: str) -> list[dict[str, Any]]:
                url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode(
                    {"query": promql}
                )
                answer = json.loads(_peer_get(lab, url))
                assert answer["status"] == "success", answer
                return list(answer["data"]["result"])

            up = _wait(lambda: query("gatepeer_up == 1"), 30, "Prometheus to scrape gatepeer_up")
            assert up[0]["metric"]["job"] == "gatepeer"
            endpoints = _wait(
                lambda: len(r := query("gatepeer_vpg_endpoint_up == 1")) == 2 and r,
                30,
                "both endpoints up in Prometheus",
            )
            assert {e["metric"]["endpoint"] for e in endpoints} == {
                str(ep.outer) for ep in lab.layout.endpoints
            }
            rules = json.loads(_peer_get(lab, "http://127.0.0.1:9090/api/v1/rules"))
            evaluated = [r for g in rules["data"]["groups"] for r in g["rules"]]
            assert len(evaluated) == len(rule_expressions())
            assert all(r["health"] in ("ok", "unknown") for r in evaluated), evaluated
            assert query('ALERTS{alertstate="firing"}') == []
        finally:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
            log.close()
        assert agent.alive()


@pytest.mark.netns
def test_sighup_moves_the_metrics_listener(make_lab: Callable[..., Any]) -> None:
    from helpers.lab_agent import METRICS_URL, running_agent

    lab = make_lab()
    moved = METRICS_URL.replace(":8479/", ":8480/")
    with running_agent(lab) as agent:
        _wait(lambda: "gatepeer_up 1" in _peer_get(lab, METRICS_URL), 20, "the first listener")
        config = agent.config
        config.write_text(config.read_text().replace(":8479", ":8480"))
        os.kill(agent.proc.pid, signal.SIGHUP)
        _wait(lambda: "gatepeer_up 1" in _peer_get(lab, moved), 20, "the moved listener")
        with pytest.raises(subprocess.CalledProcessError):
            _peer_get(lab, METRICS_URL)  # the old port is closed
