"""ENA allowance counters: the ethtool answers parsed from the kernel's bytes (a recorded ENA
statistics set), the ioctl against `ethtool -S` on this machine's own interfaces, the metrics
(absent off ENA), and doctor's judgment."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.device_fakes import kernel_answers, recorded_ena_statistics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from gatepeer.aws import ena
from gatepeer.doctor.judgments import judge_allowances
from gatepeer.metrics.ena import EnaCollector


def test_the_kernels_answers_parse_to_the_drivers_statistics() -> None:
    recorded = recorded_ena_statistics()
    sset, names, values = kernel_answers(recorded)
    count = ena.parse_statistics_count(sset)
    assert count == len(recorded) == 46
    assert ena.parse_names(names) == [n for n, _ in recorded]
    assert ena.parse_values(values) == [v for _, v in recorded]
    assert ena.allowances(ena.parse_names(names), ena.parse_values(values)) == {
        "bw_in_allowance_exceeded": 12,
        "bw_out_allowance_exceeded": 0,
        "pps_allowance_exceeded": 3407,
        "conntrack_allowance_exceeded": 0,
        "linklocal_allowance_exceeded": 28,
        "conntrack_allowance_available": 143982,
    }


def test_a_driver_without_statistics_has_none() -> None:
    sset = bytes(ena.statistics_count_request())  # the mask bit cleared by the kernel
    cleared = sset[:8] + (0).to_bytes(8, "little") + sset[16:]
    assert ena.parse_statistics_count(cleared) == 0


def test_requests_are_sized_for_the_answers() -> None:
    assert len(ena.names_request(3)) == 12 + 3 * ena.ETH_GSTRING_LEN
    assert len(ena.values_request(3)) == 8 + 3 * 8


def _interfaces_with_statistics() -> list[str]:
    found = []
    for path in sorted(Path("/sys/class/net").iterdir()):
        proc = subprocess.run(["ethtool", "-S", path.name], capture_output=True, text=True)
        if proc.returncode == 0 and "statistics" in proc.stdout:
            found.append(path.name)
    return found


def test_the_ioctl_reads_what_ethtool_prints() -> None:
    """Checks the struct layouts against the kernel itself (any driver with statistics)."""
    if shutil.which("ethtool") is None:
        pytest.skip("needs ethtool (Debian package ethtool)")
    interfaces = _interfaces_with_statistics()
    if not interfaces:
        pytest.skip("no interface here offers ethtool statistics")
    name = interfaces[0]
    names, values = ena.statistics(name)
    printed = subprocess.run(["ethtool", "-S", name], capture_output=True, text=True).stdout
    printed_names = [line.strip().rpartition(":")[0] for line in printed.splitlines()[1:]]
    assert names == printed_names and len(values) == len(names)
    assert ena.read(name) == {}  # not ENA here: nothing, not zeros


def test_an_unknown_interface_reads_as_nothing() -> None:
    assert ena.read("gp-nosuch0") == {}
    with pytest.raises(ena.EthtoolError, match="gp-nosuch0"):
        ena.statistics("gp-nosuch0")


def expose(collector: EnaCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_metrics_on_ena_and_absent_off_it() -> None:
    recorded = recorded_ena_statistics()
    names, values = [n for n, _ in recorded], [v for _, v in recorded]
    on = expose(EnaCollector(lambda: "eth0", lambda _: ena.allowances(names, values)))
    key = "gatepeer_ena_allowance_exceeded_packets_total"
    assert on[(key, (("allowance", "pps"), ("device", "eth0")))] == 3407
    assert {dict(k)["allowance"] for n, k in on if n == key} == {
        "bw_in",
        "bw_out",
        "pps",
        "conntrack",
        "linklocal",
    }
    assert on[("gatepeer_ena_conntrack_allowance_available", (("device", "eth0"),))] == 143982
    assert expose(EnaCollector(lambda: "eth0", lambda _: {})) == {}
    assert expose(EnaCollector(lambda: None, lambda _: {"pps_allowance_exceeded": 1})) == {}


def test_doctor_warns_when_an_allowance_was_exceeded() -> None:
    assert judge_allowances("eth0", {}).status == "skip"
    quiet = {n: 0 for n in ena.ALLOWANCE_COUNTERS}
    assert judge_allowances("eth0", quiet).status == "ok"
    check = judge_allowances("eth0", {**quiet, "pps_allowance_exceeded": 3407})
    assert check.status == "warn"
    assert "pps_allowance_exceeded 3407" in check.detail and "eth0" in check.detail


def test_doctor_reads_the_underlays_allowances(tmp_path: Path) -> None:
    from gatepeer.config import AgentConfig, Config
    from gatepeer.doctor.runner import Doctor

    cfg = Config(agent=AgentConfig(state_file=tmp_path / "state.json", gate_cache=None))
    doctor = Doctor(cfg, sys_root=tmp_path)
    (before,) = doctor.check_allowances()
    assert (before.status, before.detail) == ("skip", "needs the underlay check to pass")
    doctor.underlay = ("gp-nosuch0", 99, 1500)  # what check_host found: not ENA (no such link)
    (check,) = doctor.check_allowances()
    assert check.status == "skip" and "gp-nosuch0 is not an ENA interface" in check.detail
