"""`gatepeer check`, keepalived's health script: every reason it refuses the role, with fake
kernel and state inputs; its exit codes as a command; and how long one run takes (shown, not
asserted: keepalived runs it every ha.check_interval on both peers)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import readings

from gatepeer import atomic_json
from gatepeer.config import load
from gatepeer.ha.check import CheckInputs, evaluate, gather
from gatepeer.kernel.nftables import NftError
from gatepeer.kernel.rtnl import LinkReading, TunnelReading
from gatepeer.state_document import StateSummary

A = ipaddress.IPv4Address
NOW = 1_760_000_000.0
GATE = {
    "vpg_id": "vpg-0123abcd",
    "vni": 10,
    "device_subnet": "198.19.0.0/16",
    "gate_opened": True,
    "inner": "198.19.0.3/16",
    "outer": "198.18.0.10",
    "endpoints": [
        {"outer": "198.18.1.11", "inner": "198.19.0.1"},
        {"outer": "198.18.1.12", "inner": "198.19.0.2"},
    ],
}


def state_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "pid": 4242,
        "updated_at": NOW - 2,
        "health": "ok",
        "gate": GATE,
        "host": {"underlay": "eth0", "local_address": "198.18.0.10"},
        "tunnel": {"interface": "vxlan0"},
        "endpoints": [
            {"outer": "198.18.1.11", "inner": "198.19.0.1", "probe": {"state": "up"}},
            {"outer": "198.18.1.12", "inner": "198.19.0.2", "probe": {"state": "down"}},
        ],
    }
    doc.update(changes)
    return doc


def link(**changes: Any) -> LinkReading:
    """vxlan0 as the HA check sees it: no traffic counters, no underlay attributes."""
    unset = {"stats": None, "local": None, "dst_port": None, "underlay_index": None}
    return readings.link(**{**unset, **changes})


TUNNEL = TunnelReading(link(), (ipaddress.IPv4Interface("198.19.0.3/16"),), frozenset())


def inputs(**changes: Any) -> CheckInputs:
    base = CheckInputs(
        state=StateSummary.from_state(state_doc()),
        state_path=Path("/run/gatepeer/state.json"),
        tunnel=TUNNEL,
        interface="vxlan0",
        table_loaded=True,
        table_error=None,
        daemon=4242,
        probe_interval=5.0,
        probe_timeout=1.0,
        now=NOW,
    )
    return replace(base, **changes)


def test_healthy() -> None:
    assert evaluate(inputs()) == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"tunnel": TunnelReading(None)}, "vxlan0 does not exist"),
        ({"tunnel": TunnelReading(link(kind="veth"))}, "vxlan0 is not a vxlan link"),
        ({"tunnel": TunnelReading(link(flags=0x1, oper_state="down"))}, "vxlan0 is not up"),
        ({"tunnel": TunnelReading(link(), ())}, "vxlan0 lacks the inner address 198.19.0.3/16"),
        ({"table_loaded": False}, "table inet gatepeer is not loaded"),
        (
            {"table_loaded": None, "table_error": "nft: not installed"},
            "cannot list table inet gatepeer: nft: not installed",
        ),
        ({"state": None}, "no state file /run/gatepeer/state.json"),
        ({"state": StateSummary.from_state(state_doc(gate=None))}, "not registered"),
        (
            {"state": StateSummary.from_state(state_doc(host={"local_address": "198.18.0.99"}))},
            "registered as 198.18.0.10, this host is 198.18.0.99",
        ),
        ({"daemon": None}, "the daemon is not running"),
        ({"state": StateSummary.from_state(state_doc(endpoints=None))}, "no probe results yet"),
        # 3 rounds of 5 s plus the 1 s timeout: 16 s is the last fresh moment
        ({"now": NOW - 2 + 16.5}, "probe results are 16 s old"),
        (
            {
                "state": StateSummary.from_state(
                    state_doc(
                        endpoints=[
                            {"outer": "198.18.1.11", "probe": {"state": "down"}},
                            {"outer": "198.18.1.12", "probe": {"state": "unknown"}},
                        ]
                    )
                )
            },
            "no VPG endpoint answers its probe",
        ),
    ],
)
def test_each_reason_refuses_the_role(changes: dict[str, Any], reason: str) -> None:
    reasons = evaluate(inputs(**changes))
    assert any(r.startswith(reason) for r in reasons), reasons


def test_fresh_enough_at_the_edge() -> None:
    assert evaluate(inputs(now=NOW - 2 + 16.0)) == []


def test_one_endpoint_up_is_enough() -> None:
    # the baseline has one up and one down
    assert [e.probe.state for e in inputs().state.endpoints] == ["up", "down"]  # type: ignore[union-attr]
    assert evaluate(inputs()) == []


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "gatepeer.toml"
    path.write_text(
        '[soracom]\nauth_key_id = "keyId-x"\nvpg_id = "vpg-1"\n'
        f'auth_key_file = "{tmp_path / "key"}"\n'
        f'[agent]\nstate_file = "{tmp_path / "state.json"}"\n'
        '[probes]\ninterval = "2s"\ntimeout = "500ms"\n' + extra
    )
    return path


def test_gather_reads_the_state_file_and_the_kernel_through_its_readers(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path), check_system=False)
    atomic_json.write(tmp_path / "state.json", state_doc(tunnel={"interface": "vxlan9"}))
    asked: list[str] = []

    def read_tunnel(name: str) -> TunnelReading:
        asked.append(name)
        return TUNNEL

    got = gather(
        cfg,
        read_tunnel=read_tunnel,
        table_text=lambda: "table inet gatepeer {}",
        find_daemon=lambda pid: pid,
        clock=lambda: NOW,
    )
    assert asked == ["vxlan9"]  # the interface the daemon works on
    assert got.daemon == 4242 and got.table_loaded is True
    assert (got.probe_interval, got.probe_timeout) == (2.0, 0.5)
    assert evaluate(got) == []

    def nft_fails() -> str | None:
        raise NftError("listing table inet gatepeer failed", ["nft"], 1, "Operation not permitted")

    broken = gather(cfg, read_tunnel=read_tunnel, table_text=nft_fails, clock=lambda: NOW)
    assert broken.table_loaded is None
    assert broken.daemon is None  # pid 4242 is not a live gatepeer run here
    assert any("Operation not permitted" in r for r in evaluate(broken))
    absent = gather(cfg, read_tunnel=read_tunnel, table_text=lambda: None, clock=lambda: NOW)
    assert "table inet gatepeer is not loaded" in evaluate(absent)


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatepeer", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_command_exit_codes_and_one_line(tmp_path: Path) -> None:
    # This host has no vxlan0 of ours, no state file: unhealthy, exit 1, one line.
    path = write_config(tmp_path, '[tunnel]\ninterface = "gpck0"\n')
    out = run_check(path)
    assert out.returncode == 1
    assert out.stderr.startswith("unhealthy: gpck0 does not exist")
    assert "no state file" in out.stderr and len(out.stderr.splitlines()) == 1
    bad = write_config(tmp_path, '[ha]\npeer_address = "nope"\n')
    out = run_check(bad)
    assert out.returncode == 2
    assert out.stderr.startswith("config error: ha.peer_address:")


def test_time_per_run_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What one check costs keepalived, printed for the docs; never asserted."""
    path = write_config(tmp_path)
    runs = 5
    started = time.perf_counter()
    for _ in range(runs):
        assert run_check(path).returncode in (1, 2)
    per_run = (time.perf_counter() - started) / runs
    with capsys.disabled():
        print(f"\n`gatepeer check` (interpreter start included): {per_run * 1000:.0f} ms per run")
