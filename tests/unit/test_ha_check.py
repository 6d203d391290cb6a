"""`gatepeer check`'s rules: every reason it refuses the role, with fake kernel and state inputs;
its exit codes as a command. The same rules applied by the daemon (gatepeer/ha/verdict.py) and
the line keepalived's script reads: each way the script refuses. How long a run of each takes
is shown, never asserted (keepalived runs one every ha.check_interval on both peers)."""

from __future__ import annotations

import ipaddress
import os
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
from gatepeer.ha import verdict
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


# ---- the daemon's verdict, and the script keepalived runs -----------------------------------


def test_daemon_judges_the_document_it_wrote_by_the_same_rules(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path, '[ha]\npeer_address = "198.18.0.11"\n'), check_system=False)
    sync = {"read_at": NOW, "last_message_at": NOW - 1}
    doc = state_doc(updated_at=NOW, ha={"role": "backup", "sync": sync})
    asked: list[str] = []

    def read_tunnel(name: str) -> TunnelReading:
        asked.append(name)
        return TUNNEL

    def judge(**changes: Any) -> tuple[list[str], list[str] | None]:
        tables = changes.pop("tables", lambda: ["gatepeer"])
        document = {**doc, **changes}
        return verdict.judge(cfg, document, NOW, read_tunnel=read_tunnel, tables=tables)

    assert judge() == ([], [])
    assert asked == ["vxlan0"]
    assert judge(tables=lambda: ["other"])[0] == ["table inet gatepeer is not loaded"]
    assert judge(updated_at=NOW - 60)[0] == ["probe results are 60 s old"]

    def refused() -> list[str]:
        raise OSError("Operation not permitted")

    assert "Operation not permitted" in judge(tables=refused)[0][0]
    no_reading = judge(ha={"role": "backup"})[1]
    assert no_reading and no_reading[0].startswith("sync: the daemon recorded no reading")
    off = load(
        write_config(tmp_path, '[ha]\npeer_address = "198.18.0.11"\nconntrack_sync = false\n'),
        check_system=False,
    )
    assert verdict.judge(off, doc, NOW, read_tunnel=read_tunnel, tables=lambda: ["gatepeer"]) == (
        [],
        None,
    )


def test_status_reads_back_what_the_daemon_wrote(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path, '[ha]\npeer_address = "198.18.0.11"\n'), check_system=False)
    file = verdict.path(cfg, verdict.CHECK_FILE)
    assert verdict.report(cfg, NOW)["verdict"] == "missing"
    file.write_text(verdict.line(["a", "b"], NOW - 2))
    got = verdict.report(cfg, NOW)
    assert (got["verdict"], got["reasons"], got["age_s"]) == ("fail", ["a", "b"], 2.0)
    file.write_text(verdict.line([], NOW))
    assert verdict.report(cfg, NOW)["verdict"] == "ok"
    file.write_text(verdict.line(["conntrackd said:\nline two"], NOW))
    assert verdict.report(cfg, NOW)["reasons"] == ["conntrackd said: line two"]
    file.write_text("garbage\n")
    assert verdict.report(cfg, NOW)["verdict"] == "unreadable"


def test_two_peers_sharing_a_folder_keep_their_own_verdicts(tmp_path: Path) -> None:
    """The lab's two peers keep state.json and state-peer2.json in one folder: one verdict
    file for both let each peer's keepalived read the other's daemon."""
    one = load(write_config(tmp_path), check_system=False)
    other = replace(one, agent=replace(one.agent, state_file=tmp_path / "state-peer2.json"))
    paths = {
        verdict.path(c, n) for c in (one, other) for n in (verdict.CHECK_FILE, verdict.SYNC_FILE)
    }
    assert len(paths) == 4 and all(p.parent == tmp_path for p in paths)


def run_script(file: Path, max_age: int = 4) -> int:
    argv = ["/bin/sh", str(verdict.SCRIPT), str(file), str(max_age)]
    return subprocess.run(argv, capture_output=True, timeout=10).returncode


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("{now} {pid} ok\n", True),
        ("{now} {pid} ok", True),  # no newline at the end
        ("{now} {pid} fail: table inet gatepeer is not loaded\n", False),
        ("{old} {pid} ok\n", False),  # the daemon stopped writing (hung)
        ("{now} {gone} ok\n", False),  # the daemon that wrote it is gone
        ("{now} ok\n", False),
        ("x{now} {pid} ok\n", False),
        ("\n", False),
        ("", False),
    ],
)
def test_script_reads_the_verdict(tmp_path: Path, text: str, ok: bool) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    now = int(time.time())
    file = tmp_path / "state.ha-check"
    file.write_text(text.format(now=now, old=now - 10, pid=1, gone=gone.pid))
    assert (run_script(file) == 0) is ok
    assert run_script(tmp_path / "missing") != 0


def test_write_puts_both_lines_beside_the_state_file(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path, '[ha]\npeer_address = "198.18.0.11"\n'), check_system=False)
    verdict.write(cfg, state_doc(updated_at=time.time()), time.time())
    check_line = (tmp_path / "state.ha-check").read_text()
    sync_line = (tmp_path / "state.ha-sync").read_text()
    # This host has no vxlan0 of the daemon's: both fail, and the script says so.
    assert check_line.split()[2] == "fail:" and "vxlan0 does not exist" in check_line
    assert sync_line.split()[2] == "fail:"
    assert run_script(tmp_path / "state.ha-check") != 0
    assert check_line.split()[1] == str(os.getpid())
    off = load(
        write_config(tmp_path, '[ha]\npeer_address = "198.18.0.11"\nconntrack_sync = false\n'),
        check_system=False,
    )
    verdict.write(off, state_doc(), time.time())
    assert not (tmp_path / "state.ha-sync").exists()  # no sync check: no stale line left behind


def test_script_time_per_run_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What keepalived's script costs now, beside `gatepeer check` above; never asserted."""
    file = tmp_path / "state.ha-check"
    file.write_text(f"{int(time.time())} 1 ok\n")
    runs = 20
    started = time.perf_counter()
    for _ in range(runs):
        assert run_script(file, 60) == 0
    per_run = (time.perf_counter() - started) / runs
    with capsys.disabled():
        print(f"\nkeepalived's verdict script: {per_run * 1000:.1f} ms per run")
