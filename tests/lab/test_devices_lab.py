"""`gatepeer devices` in a lab: the daemon fetches the lab's SIMs from the emulator, and after
a ping from the VPC host each lab device shows by name with its packets counted both ways;
the SIM in session on another VPG is not listed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.netns
def test_named_sims_and_their_traffic_after_a_ping(make_lab: Callable[..., Any]) -> None:
    from helpers.lab_agent import GATEPEER, running_agent

    lab = make_lab()
    config = Path(lab.paths.config)
    config.write_text(config.read_text() + "\n[packet_path]\ndevice_counters = true\n")
    devices = lab.layout.devices
    with running_agent(lab, metrics=False) as agent:
        deadline = time.monotonic() + 20
        while (agent.state() or {}).get("sim_map", {}).get("fetched_at") is None:
            assert time.monotonic() < deadline, agent.log.read_text()
            time.sleep(0.1)
        lab.run("vpc", "ping", "-c", "3", "-i", "0.2", "-W", "2", str(devices[0]))
        out = lab.run("peer", GATEPEER, "devices", "--json", "--config", str(config))
        report = json.loads(out.stdout)
        text = lab.run("peer", GATEPEER, "devices", "--config", str(config)).stdout
        status = agent.status_json()

    rows = {r["address"]: r for r in report["devices"]}
    assert report["sim_map"]["error"] is None and report["sim_map"]["sims"] == len(devices)
    assert sorted(r["name"] for r in rows.values()) == sorted(
        f"lab-device-{i}" for i in range(1, len(devices) + 1)
    )
    assert "on-another-vpg" not in out.stdout
    pinged = rows[str(devices[0])]
    assert pinged["name"] == "lab-device-1" and pinged["online"] is True
    assert pinged["imsi"] == "001010000000001"
    # Three echo requests in, three replies out (the lab's own ARP is not IP: not counted).
    assert pinged["packets_to_device"] >= 3 and pinged["packets_from_device"] >= 3
    assert pinged["bytes_to_device"] >= 3 * 84 and pinged["bytes_from_device"] >= 3 * 84
    assert pinged["last_packet_age_s"] is not None and pinged["last_packet_age_s"] < 30
    quiet = rows[str(devices[1])]
    assert quiet["name"] == "lab-device-2" and quiet["packets_from_device"] is None
    line = next(x for x in text.splitlines() if x.startswith(f"{devices[0]} "))
    assert line.split()[1:3] == ["lab-device-1", "001010000000001"]
    assert status["sim_map"]["sims"] == len(devices) and status["sim_map"]["error"] is None
