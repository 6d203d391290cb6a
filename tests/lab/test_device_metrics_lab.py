"""The per-device metrics from a running daemon (issue 19): with `packet_path.device_counters`
on, the daemon's SIM map and the kernel's counters; after a ping from the VPC host to the first
lab device, a scrape shows it as a top talker by its SIM's name, IMSI and group, the group
counts every lab device, and the flow log's and ENA's series are absent (both off or not ENA
here: absent, not zero)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.lab_agent import METRICS_URL, running_agent
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.netns


def _scrape(lab: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape from inside the peer's namespace (the metrics listen on its address)."""
    code = (
        "import sys, urllib.request\n"
        f"sys.stdout.write(urllib.request.urlopen({METRICS_URL!r}, timeout=5).read().decode())\n"
    )
    text = lab.run("peer", sys.executable, "-c", code, check=False).stdout
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_a_pinged_device_is_a_named_top_talker(make_lab: Any) -> None:
    lab = make_lab()
    config = Path(lab.paths.config)
    config.write_text(config.read_text() + "\n[packet_path]\ndevice_counters = true\n")
    devices = lab.layout.devices
    pinged = str(devices[0])
    key = "gatepeer_device_received_packets_total"
    with running_agent(lab) as agent:
        deadline = time.monotonic() + 20
        while (agent.state() or {}).get("sim_map", {}).get("fetched_at") is None:
            assert time.monotonic() < deadline, agent.log.read_text()
            time.sleep(0.1)
        lab.run("vpc", "ping", "-c", "3", "-i", "0.2", "-W", "2", pinged)
        # The counters are read at most every 15 s, on the metrics' own thread: a scrape
        # starts a reading when the last is older, and the next one shows it.
        deadline = time.monotonic() + 40
        while True:
            found = _scrape(lab)
            top = {dict(labels)["address"]: (labels, v) for (n, labels), v in found.items()
                   if n == key}  # fmt: skip
            if pinged in top:
                break
            assert time.monotonic() < deadline, (sorted(found)[:20], agent.log.read_text())
            time.sleep(1)
    labels, received = top[pinged]
    assert dict(labels) == {
        "address": pinged,
        "name": "lab-device-1",
        "imsi": "001010000000001",
        "group": "lab-devices",
    }
    assert received >= 3
    assert found[("gatepeer_device_sent_packets_total", labels)] >= 3
    assert found[("gatepeer_device_last_seen_age_seconds", labels)] < 60
    assert found[("gatepeer_device_group_sent_packets_total", (("group", "lab-devices"),))] >= 3
    assert found[("gatepeer_devices", ())] >= 1
    assert found[("gatepeer_devices_silent", ())] == 0
    names = {n for n, _ in found}
    assert not any(n.startswith(("gatepeer_flow_log", "gatepeer_ena")) for n in names)
