"""The control plane's pure steps, in process, on pytest-benchmark: what one reconcile and one
read of the state cost without the kernel, the API or the interpreter's start-up.

    .venv/bin/pytest bench/bench_inprocess.py --benchmark-enable
    .venv/bin/pytest bench/bench_inprocess.py --benchmark-enable --benchmark-json=/tmp/inproc.json

- plan            `plan()` on a converged peer (the daemon's every reconcile) and from nothing
- render          the `inet gatepeer` table for route (two endpoints) and nat with an allow-list
- health          the one evaluator over a healthy daemon's signals
- status read     state.json from disk into the `StateSummary` every reader uses
- scrape          one /metrics exposition of every collector (fresh registry, as per scrape)

Not run by `pytest -q` (bench/ is outside testpaths); without `--benchmark-enable` (the
project's default is `--benchmark-disable`) each runs once as a plain test, a quick check that
the benchmarks still work. Inputs are the tests' builders (tests/helpers/) and a daemon's state
document (fixtures/state.json): numbers compare across commits, not across machines.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' shared builders: tests/helpers/

from helpers.metrics_sources import (  # noqa: E402
    FULL_COUNTERS,
    FakeAgent,
    FakeKernel,
    FakePacketPath,
)
from helpers.plan_inputs import FACTS, converged, desired  # noqa: E402
from helpers.ruleset_specs import CASES  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from gatepeer import atomic_json, health, ruleset  # noqa: E402
from gatepeer.desired_state import ObservedState  # noqa: E402
from gatepeer.metrics.collectors import build_registry  # noqa: E402
from gatepeer.plan import plan  # noqa: E402
from gatepeer.state_document import StateSummary, recorded_signals  # noqa: E402

STATE_DOCUMENT = Path(__file__).resolve().parent / "fixtures" / "state.json"


def test_plan_converged(benchmark: Any) -> None:
    d = desired()
    observed = converged(d)
    actions = benchmark(plan, d, observed, FACTS.underlay, frozenset({d.address}))
    assert actions == []  # converged: nothing to do, which is what is timed


def test_plan_from_nothing(benchmark: Any) -> None:
    d = desired()
    nothing = ObservedState(link=None, addresses=frozenset(), fdb=frozenset(), sysctls=())
    actions = benchmark(plan, d, nothing, FACTS.underlay)
    assert len(actions) > 5  # link, address, FDB entries, sysctls, ruleset


@pytest.mark.parametrize("case", ["route_2ep", "nat_allowlist"])
def test_render(benchmark: Any, case: str) -> None:
    text = benchmark(ruleset.render, CASES[case])
    assert text.startswith("table inet gatepeer")


def _state_summary(path: Path) -> StateSummary:
    raw = atomic_json.read(path)
    assert raw is not None, f"{path}: not a state document"
    return StateSummary.from_state(raw)


def test_health(benchmark: Any) -> None:
    summary = StateSummary.from_state(json.loads(STATE_DOCUMENT.read_text()))
    gate = summary.gate
    assert gate is not None
    tunnel = health.TunnelSignal(
        "vxlan0",
        vni=gate.vni,
        addresses=frozenset({gate.inner}),
        flood=frozenset(ep.outer for ep in gate.endpoints),
    )
    signals = dataclasses.replace(recorded_signals(summary), tunnel=tunnel)
    verdict = benchmark(health.evaluate, signals)
    assert verdict.health == "ok", verdict.reasons


def test_status_read(benchmark: Any, tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_json.write(path, json.loads(STATE_DOCUMENT.read_text()))  # as the daemon writes it
    summary = benchmark(_state_summary, path)
    # A document the parser no longer understands would time a shortcut: refuse it.
    assert not summary.damaged and summary.gate is not None and summary.health == "ok"
    assert summary.gate.inner == IPv4Interface("10.128.0.3/9")


def test_scrape(benchmark: Any) -> None:
    agent, kernel, counters = FakeAgent(), FakeKernel(), FakePacketPath(FULL_COUNTERS)

    def scrape() -> bytes:
        return generate_latest(build_registry(agent, kernel, counters, "0.1.0"))

    text = benchmark(scrape).decode()
    assert "gatepeer_up" in text or "gatepeer_build_info" in text
    assert "process_resident_memory_bytes" in text
