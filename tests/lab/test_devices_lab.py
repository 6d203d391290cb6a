"""`gatepeer devices` in a lab: the daemon fetches the lab's SIMs from the emulator, and after
a ping from the VPC host each lab device shows by name with its packets counted both ways;
the SIM in session on another VPG is not listed. With the metrics on, a scrape makes the daemon
read the counters and keep the reading, which `gatepeer devices` then shows with its age."""

from __future__ import annotations

import json
import sys
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


@pytest.mark.netns
def test_devices_shows_the_daemons_reading_after_a_scrape(make_lab: Callable[..., Any]) -> None:
    from helpers.lab_agent import GATEPEER, METRICS_URL, running_agent

    lab = make_lab()
    config = Path(lab.paths.config)
    config.write_text(config.read_text() + "\n[packet_path]\ndevice_counters = true\n")
    pinged = str(lab.layout.devices[0])

    def devices(*args: str) -> dict[str, Any]:
        out = lab.run("peer", GATEPEER, "devices", "--json", *args, "--config", str(config))
        return dict(json.loads(out.stdout))

    with running_agent(lab) as agent:
        deadline = time.monotonic() + 20
        while (agent.state() or {}).get("sim_map", {}).get("fetched_at") is None:
            assert time.monotonic() < deadline, agent.log.read_text()
            time.sleep(0.1)
        before = devices()  # no scrape yet: no reading kept, the kernel is read
        lab.run("vpc", "ping", "-c", "3", "-i", "0.2", "-W", "2", pinged)
        # The first scrape waits for the daemon's first reading, which is kept on disk.
        scrape = f"import urllib.request; urllib.request.urlopen({METRICS_URL!r}, timeout=10)"
        lab.run("peer", sys.executable, "-c", scrape)
        kept = devices()
        live = devices("--live")

    assert before["traffic"]["source"] == "kernel"
    assert before["traffic"]["why"].startswith("no daemon reading in ")
    assert kept["traffic"]["source"] == "daemon" and kept["traffic"]["why"] is None
    assert 0 <= kept["traffic"]["age_s"] < 30
    row = {r["address"]: r for r in kept["devices"]}[pinged]
    assert row["name"] == "lab-device-1"
    assert row["packets_to_device"] >= 3 and row["packets_from_device"] >= 3
    assert row["last_packet_age_s"] is not None and row["last_packet_age_s"] < 30
    assert live["traffic"] == {
        "source": "kernel",
        "read_at": live["traffic"]["read_at"],
        "age_s": 0.0,
        "why": "asked to (--live)",
    }
    assert {r["address"]: r for r in live["devices"]}[pinged]["packets_to_device"] >= 3
