"""`gatepeer status`: the state document's reading, the health rules and exit codes, the JSON
shape, a never-configured machine, what it imports (the lab's tests: tests/lab/test_status_lab.py).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers.readings import link

from gatepeer import atomic_json
from gatepeer.cli import main
from gatepeer.kernel.rtnl import TunnelReading
from gatepeer.running_daemon import daemon_pid
from gatepeer.state_document import StateSummary
from gatepeer.status_report import Status, gather, render, to_json

A = ipaddress.IPv4Address
NOW = 1_760_000_000.0
GATE = {
    "vpg_id": "d6a52f88-4f11-4f5e-9b2d-1f2e3d4c5b6a",
    "vni": 10,
    "device_subnet": "10.128.0.0/9",
    "gate_opened": True,
    "inner": "10.128.0.3/9",
    "outer": "172.31.5.10",
    "endpoints": [
        {"outer": "100.64.10.1", "inner": "10.128.0.1"},
        {"outer": "100.64.10.2", "inner": "10.128.0.2"},
    ],
}


def probe(state: str, rtt: float | None = 0.0012, loss: float | None = 0.0) -> dict[str, Any]:
    return {"state": state, "rtt_s": rtt, "loss": loss, "error": None}


def state_doc(**changes: Any) -> dict[str, Any]:
    """What the daemon writes (agent state joined with the probes), healthy."""
    doc: dict[str, Any] = {
        "version": "0.1.0",
        "pid": 4242,
        "updated_at": NOW - 1,
        "config_file": "/etc/gatepeer/gatepeer.toml",
        "health": "ok",
        "reasons": [],
        "notes": [],
        "gate": GATE,
        "gate_fetched_at": NOW - 20,
        "gate_error": None,
        "host": {"underlay": "ens5", "underlay_mtu": 9001, "local_address": "172.31.5.10"},
        "tunnel": {"interface": "vxlan0"},
        "packet_path": {"mode": "route", "flowtable_supported": True, "fast_path_active": True},
        "last_reconcile": {"health": "ok", "actions": [], "duration_s": 0.0042, "error": None},
        "counters": {"reconciles": 42, "failures": 1, "last_success_at": NOW - 20},
        "endpoints": [
            {
                "outer": "100.64.10.1",
                "inner": "10.128.0.1",
                "fdb_present": True,
                "probe": probe("up"),
            },
            {
                "outer": "100.64.10.2",
                "inner": "10.128.0.2",
                "fdb_present": True,
                "probe": probe("up", 0.0015),
            },
        ],  # fmt: skip
    }
    doc.update(changes)
    return doc


HEALTHY_TUNNEL = TunnelReading(
    link(),
    (ipaddress.IPv4Interface("10.128.0.3/9"),),
    frozenset({A("100.64.10.1"), A("100.64.10.2")}),
)


def run_status(
    tmp_path: Path,
    doc: dict[str, Any] | None,
    tunnel: TunnelReading = HEALTHY_TUNNEL,
    daemon: bool = True,
    config: str | None = "",
) -> Status:
    state_file = tmp_path / "state.json"
    cfg = tmp_path / "gatepeer.toml"
    if config is not None:
        cfg.write_text(
            config
            or (
                '[soracom]\nauth_key_id = "keyId-x"\nvpg_id = "vpg-1"\n'
                f'auth_key_file = "{tmp_path / "key"}"\n'
                f'[agent]\nstate_file = "{state_file}"\nreconcile_interval = "30s"\n'
            )
        )
    if doc is not None:
        atomic_json.write(state_file, doc)
    return gather(
        cfg,
        read_tunnel=lambda name: tunnel,
        find_daemon=lambda pid: pid if daemon else None,
        clock=lambda: NOW,
    )


# ---- the state document -----------------------------------------------------------------


def test_state_summary_reads_the_daemons_document() -> None:
    s = StateSummary.from_state(state_doc())
    assert s.registered and s.probed
    assert s.gate is not None and str(s.gate.inner) == "10.128.0.3/9"
    assert [(e.outer, e.probe.state, e.fdb_present) for e in s.endpoints] == [
        ("100.64.10.1", "up", True),
        ("100.64.10.2", "up", True),
    ]
    assert (s.reconciles, s.failures, s.fast_path, s.packet_path_mode) == (42, 1, True, "route")


def test_state_summary_tolerates_an_apply_document_and_junk() -> None:
    # `gatepeer apply` writes no endpoints: they come from the gate view, probes unknown.
    applied = state_doc()
    del applied["endpoints"]
    s = StateSummary.from_state(applied)
    assert not s.probed
    assert [(e.outer, e.probe.state, e.fdb_present) for e in s.endpoints] == [
        ("100.64.10.1", "unknown", None),
        ("100.64.10.2", "unknown", None),
    ]
    empty = StateSummary.from_state({})
    assert (empty.gate, empty.health, empty.registered, empty.endpoints) == (
        None, "unknown", False, ()
    )  # fmt: skip
    junk = StateSummary.from_state(
        {"gate": {"vni": "x"}, "pid": "12", "updated_at": True, "endpoints": [{"probe": {}}, 3]}
    )
    assert junk.gate is None and junk.pid is None and junk.updated_at is None
    # An endpoint entry without an outer address is dropped, and the damage remembered.
    assert junk.endpoints == ()
    assert {"gate", "pid", "updated_at", "endpoints[0]", "endpoints[1]"} <= set(junk.damaged)
    moved = StateSummary.from_state(state_doc(host={"local_address": "172.31.9.9"}))
    assert not moved.registered


DAMAGED_DOCUMENTS = [
    {"endpoints": [{"inner": None}]},
    {"endpoints": [{"outer": "not an address", "inner": 5, "fdb_present": "yes"}]},
    {"endpoints": [{"outer": "100.64.10.1", "probe": "up"}]},
    {"endpoints": "all of them"},
    {"counters": 5},
    {"counters": {"reconciles": "many", "failures": [], "last_success_at": "yesterday"}},
    {"reasons": 5},
    {"reasons": [None, {"x": 1}]},
    {"host": [], "tunnel": "vxlan0", "packet_path": 3, "last_reconcile": "ok"},
    {"tunnel": {"interface": "../../etc"}, "health": ["ok"]},
    {"packet_path": {"mode": ["route"], "fast_path_active": "x"}},
    {"last_reconcile": {"health": {}, "error": 3, "duration_s": "fast"}},
    {"gate": "10.0.0.1", "gate_error": {"code": 1}, "gate_fetched_at": "now"},
    {"gate": {**GATE, "endpoints": [{"outer": None}]}},
    {"version": 1, "pid": True, "updated_at": "x", "reconciled_at": [1]},
]


@pytest.mark.parametrize("damage", DAMAGED_DOCUMENTS, ids=lambda d: json.dumps(d)[:40])
def test_a_damaged_state_file_is_said_and_the_kernel_view_still_shown(
    tmp_path: Path, damage: dict[str, Any]
) -> None:
    s = run_status(tmp_path, state_doc(**damage))
    text, doc = render(s), to_json(s)
    json.dumps(doc)  # what `status --json` prints
    assert any(r.startswith("state file unreadable: ") for r in s.reasons), s.reasons
    assert s.health in ("degraded", "down")
    # The kernel's own view is still reported.
    assert doc["tunnel"]["present"] and doc["tunnel"]["vni"] == 10
    assert "tunnel        vxlan0 vxlan" in text


def test_a_state_file_that_is_not_json_is_said(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"format": 1, "pid": ')
    s = run_status(tmp_path, None)
    assert any(r.startswith("state file unreadable: ") for r in s.reasons), s.reasons
    assert not any("never set up" in r for r in s.reasons)


def test_status_command_survives_a_damaged_state_file(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    atomic_json.write(state_file, {"endpoints": [{"inner": None}], "counters": 5})
    cfg = tmp_path / "gatepeer.toml"
    cfg.write_text(
        '[soracom]\nauth_key_id = "keyId-x"\nvpg_id = "vpg-1"\n'
        f'[agent]\nstate_file = "{state_file}"\n'
        '[tunnel]\ninterface = "gpnosuch0"\n'
    )
    for args in ([], ["--json"]):
        result = CliRunner().invoke(main, ["status", "--config", str(cfg), *args])
        assert result.exception is None or isinstance(result.exception, SystemExit), result
        assert result.exit_code == 2, result.output
        assert "state file unreadable: " in result.output


# ---- health and exit codes --------------------------------------------------------------


def test_healthy_is_ok_exit_0(tmp_path: Path) -> None:
    s = run_status(tmp_path, state_doc())
    assert (s.health, s.exit_code, s.reasons) == ("ok", 0, [])


def test_one_endpoint_down_is_degraded_and_named(tmp_path: Path) -> None:
    reason = "VPG endpoint 100.64.10.2 (inner 10.128.0.2) does not answer probes through the tunnel"
    doc = state_doc(health="degraded", reasons=[reason])
    doc["endpoints"][1]["probe"] = probe("down", None, 0.4)
    s = run_status(tmp_path, doc)
    assert (s.health, s.exit_code, s.reasons) == ("degraded", 1, [reason])
    j = to_json(s)
    assert j["endpoints"][1]["probe"] == {"state": "down", "rtt_s": None, "loss": 0.4,
                                          "error": None}  # fmt: skip
    assert "DOWN" in render(s)


def test_all_endpoints_down_is_down(tmp_path: Path) -> None:
    # The probes are the signal (the daemon's own "health" word is not read).
    doc = state_doc(health="failed", reasons=["no VPG endpoint answers"])
    for endpoint in doc["endpoints"]:
        endpoint["probe"] = probe("down", None, 1.0)
    s = run_status(tmp_path, doc)
    assert (s.health, s.exit_code) == ("down", 2)


def test_daemon_not_running_is_degraded_and_its_old_probes_are_not_shown(tmp_path: Path) -> None:
    s = run_status(tmp_path, state_doc(), daemon=False)
    assert (s.health, s.exit_code) == ("degraded", 1)
    assert "the daemon is not running" in s.reasons[0]
    assert {e["probe"]["state"] for e in to_json(s)["endpoints"]} == {"unknown"}


def test_a_stale_state_file_is_degraded(tmp_path: Path) -> None:
    s = run_status(tmp_path, state_doc(updated_at=NOW - 3600))
    assert s.health == "degraded"
    assert "has not reconciled" in s.reasons[0]


def test_a_stuck_loop_is_degraded_though_the_prober_keeps_writing(tmp_path: Path) -> None:
    # The prober thread rewrites the file every round; the loop's own pass is what counts.
    s = run_status(tmp_path, state_doc(updated_at=NOW - 1, reconciled_at=NOW - 3600))
    assert s.health == "degraded"
    assert "has not reconciled for 3600 s" in s.reasons[0]
    fresh = run_status(tmp_path, state_doc(updated_at=NOW - 1, reconciled_at=NOW - 2))
    assert fresh.health == "ok"


@pytest.mark.parametrize(
    ("tunnel", "reason"),
    [
        (TunnelReading(None), "vxlan0 does not exist"),
        (TunnelReading(link(flags=0)), "vxlan0 is admin down"),
        (TunnelReading(link(oper_state="down", flags=0x1)), "vxlan0 is operationally down"),
        (TunnelReading(link(kind="veth")), "vxlan0 is a veth link, not vxlan"),
        (
            TunnelReading(link(vni=11), HEALTHY_TUNNEL.addresses, HEALTHY_TUNNEL.flood),
            "vxlan0 has VNI 11, the registration says 10",
        ),
        (
            TunnelReading(link(), (), HEALTHY_TUNNEL.flood),
            "vxlan0 lacks the inner address 10.128.0.3/9",
        ),
        (
            TunnelReading(link(), HEALTHY_TUNNEL.addresses, frozenset()),
            "vxlan0 has no FDB entry for any VPG endpoint",
        ),
    ],
)
def test_a_broken_tunnel_is_down(tmp_path: Path, tunnel: TunnelReading, reason: str) -> None:
    s = run_status(tmp_path, state_doc(), tunnel)
    assert (s.health, s.exit_code) == ("down", 2)
    assert reason in s.reasons


def test_one_missing_fdb_entry_is_degraded(tmp_path: Path) -> None:
    tunnel = TunnelReading(link(), HEALTHY_TUNNEL.addresses, frozenset({A("100.64.10.1")}))
    s = run_status(tmp_path, state_doc(), tunnel)
    assert (s.health, s.reasons) == (
        "degraded", ["vxlan0 has no FDB entry for VPG endpoint 100.64.10.2"]
    )  # fmt: skip
    assert [e["fdb_present"] for e in to_json(s)["endpoints"]] == [True, False]


def test_a_registration_for_an_old_address_is_down(tmp_path: Path) -> None:
    s = run_status(tmp_path, state_doc(host={"local_address": "172.31.9.9"}))
    assert s.exit_code == 2
    assert "registered as 172.31.5.10, but this host's address is now 172.31.9.9" in s.reasons
    assert to_json(s)["registration"]["registered"] is False


def test_vpc_cidrs_are_shown_with_their_source(tmp_path: Path) -> None:
    """Route mode's "inside the VPC": what the agent used and where it came from."""
    packet_path = {
        "mode": "route",
        "fast_path_active": False,
        "outside_vpc": "masquerade",
        "vpc_cidrs": ["198.18.0.0/16", "203.0.113.0/24"],
        "vpc_cidrs_source": "imds",
    }
    s = run_status(tmp_path, state_doc(packet_path=packet_path))
    assert to_json(s)["packet_path"]["vpc_cidrs"] == "198.18.0.0/16, 203.0.113.0/24 (from imds)"
    assert "vpc cidrs     198.18.0.0/16, 203.0.113.0/24 (from imds)" in render(s)
    broken = run_status(tmp_path, state_doc(packet_path={**packet_path, "vpc_cidrs": "x"}))
    assert to_json(broken)["packet_path"]["vpc_cidrs"] is None


def test_configured_but_never_set_up_is_down(tmp_path: Path) -> None:
    s = run_status(tmp_path, None, TunnelReading(None), daemon=False)
    assert s.exit_code == 2
    assert any(r.startswith("never set up: no state file") for r in s.reasons)


def test_not_registered_yet_is_down(tmp_path: Path) -> None:
    s = run_status(tmp_path, state_doc(gate=None, gate_error="SORACOM API auth failed"))
    assert s.exit_code == 2
    assert "not registered: no gate view yet (SORACOM API auth failed)" in s.reasons


def test_a_bad_config_is_down_and_says_why(tmp_path: Path) -> None:
    s = run_status(tmp_path, state_doc(), config="[soracom]\nnope = 1\n")
    assert s.exit_code == 2
    assert s.reasons[0].startswith("config error: soracom.auth_key_id: missing")


def test_a_never_configured_machine_says_so_and_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "etc" / "gatepeer.toml"
    result = CliRunner().invoke(main, ["status", "--config", str(missing)])
    assert result.exit_code == 2
    first = result.output.splitlines()
    assert first[0] == "gatepeer 0.1.0: DOWN"
    assert (
        first[1]
        == f"  ! not configured: {missing} does not exist (set --config or GATEPEER_CONFIG)"
    )
    as_json = CliRunner().invoke(main, ["status", "--json"], env={"GATEPEER_CONFIG": str(missing)})
    assert as_json.exit_code == 2
    data = json.loads(as_json.output)
    assert data["config"] == {
        "path": str(missing),
        "configured": False,
        "error": data["reasons"][0],
    }
    assert (data["health"], data["exit_code"], len(data["reasons"])) == ("down", 2, 1)


def test_json_shape(tmp_path: Path) -> None:
    j = to_json(run_status(tmp_path, state_doc()))
    assert set(j) == {
        "health", "exit_code", "reasons", "version", "config", "daemon", "registration",
        "tunnel", "endpoints", "packet_path", "last_reconcile", "state_file", "redirection",
        "api",
    }  # fmt: skip
    assert j["daemon"] == {"running": True, "pid": 4242}
    assert j["registration"] == {
        "registered": True,
        "vpg_id": GATE["vpg_id"],
        "outer_address": "172.31.5.10",
        "inner_address": "10.128.0.3/9",
        "vni": 10,
        "device_subnet": "10.128.0.0/9",
        "gate_open": True,
    }
    assert j["tunnel"] == {
        "interface": "vxlan0", "present": True, "kind": "vxlan", "vni": 10, "mtu": 1500,
        "local_address": "172.31.5.10", "dst_port": 4789, "addresses": ["10.128.0.3/9"],
        "admin_up": True, "oper_state": "unknown", "oper_up": True,
        "counters": {
            "rx_bytes": 1500, "rx_packets": 10, "rx_errors": 0, "rx_dropped": 0,
            "tx_bytes": 3000, "tx_packets": 20, "tx_errors": 0, "tx_dropped": 1,
        },
    }  # fmt: skip
    assert j["endpoints"][0] == {
        "outer": "100.64.10.1",
        "inner": "10.128.0.1",
        "fdb_present": True,
        "probe": probe("up"),
    }
    assert j["packet_path"] == {"mode": "route", "fast_path": True, "vpc_cidrs": None}
    assert j["redirection"] == {
        "mode": "unmanaged", "enabled": False, "gateway": None, "is_self": False,
        "this_peer": "10.128.0.3",
    }  # fmt: skip
    assert j["api"] == {"error": None, "answer_refused": False, "refused_field": None}
    assert j["last_reconcile"] == {
        "health": "ok", "error": None, "duration_s": 0.0042, "runs": 42, "failures": 1,
        "last_success_at": NOW - 20,
    }  # fmt: skip
    assert j["state_file"]["age_s"] == 1.0


def test_render_is_one_screen_with_every_section(tmp_path: Path) -> None:
    text = render(run_status(tmp_path, state_doc()))
    lines = text.splitlines()
    assert lines[0] == "gatepeer 0.1.0: OK"
    assert len(lines) <= 24 and max(map(len, lines[:-2])) <= 100  # the last two hold paths
    for needle in (
        "registration  VPG d6a52f88-4f11-4f5e-9b2d-1f2e3d4c5b6a, Gate open",
        "tunnel        vxlan0 vxlan, up (admin up, oper unknown), VNI 10, MTU 1500",
        "100.64.10.1   10.128.0.1  yes  up     1.20 ms  0 %",
        "packet path   route, fast path active",
        "reconcile     last ok in 4.2 ms; last success 20 s ago; 42 runs, 1 failed",
        "daemon        running, pid 4242",
    ):
        assert needle in text, f"{needle!r} not in:\n{text}"


def test_daemon_pid_checks_the_process_is_gatepeer_run(tmp_path: Path) -> None:
    def proc(pid: int, argv: list[str], state: str = "S") -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} (gate peer) {state} 1 2 3\n")
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")

    proc(10, ["/opt/venv/bin/python", "/opt/venv/bin/gatepeer", "run", "--config", "/x"])
    proc(11, ["/usr/bin/python3", "-m", "gatepeer", "run"])
    proc(12, ["/opt/venv/bin/gatepeer", "apply"])
    proc(13, ["sleep", "100"])  # a reused pid
    proc(14, ["/opt/venv/bin/gatepeer", "run"], state="Z")
    found = {pid: daemon_pid(pid, tmp_path) for pid in (10, 11, 12, 13, 14, 15)}
    assert found == {10: 10, 11: 11, 12: None, 13: None, 14: None, 15: None}
    assert daemon_pid(None, tmp_path) is None


def test_status_imports_nothing_heavy(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from gatepeer.cli import main\n"
        f"sys.argv = ['gatepeer', 'status', '--config', {str(tmp_path / 'none.toml')!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ('pyroute2', 'prometheus_client', 'scapy', 'psutil')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


# ---- the VPG's redirection and refused answers ----------------------------------------------

REDIRECTED_HERE = {**GATE, "redirection": {"enabled": True, "gateway": "10.128.0.3"}}
REDIRECTED_ELSEWHERE = {**GATE, "redirection": {"enabled": True, "gateway": "10.128.0.9"}}


def _with_mode(tmp_path: Path, mode: str = "route", redirection: str = "unmanaged") -> str:
    return (
        '[soracom]\nauth_key_id = "keyId-x"\nvpg_id = "vpg-1"\n'
        f'auth_key_file = "{tmp_path / "key"}"\nredirection = "{redirection}"\n'
        f'[agent]\nstate_file = "{tmp_path / "state.json"}"\n'
        f'[packet_path]\nmode = "{mode}"\n'
    )


def test_redirection_to_this_peer_is_shown_in_text_and_json(tmp_path: Path) -> None:
    doc = state_doc(gate=REDIRECTED_HERE, redirection={"mode": "self", "error": None})
    status = run_status(tmp_path, doc)
    assert status.health == "ok", status.reasons
    j = to_json(status)
    assert j["redirection"]["gateway"] == "10.128.0.3" and j["redirection"]["is_self"] is True
    assert j["redirection"]["mode"] == "self"
    assert "redirection   gateway 10.128.0.3 (this peer); soracom.redirection self" in render(
        status
    )


@pytest.mark.parametrize(
    ("gate", "mode", "setting", "reason"),
    [
        (GATE, "nat", "unmanaged", "packet_path.mode is nat but the VPG's redirection gateway "
         "is not set, not this peer (10.128.0.3)"),
        (REDIRECTED_ELSEWHERE, "nat", "unmanaged", "redirection gateway is 10.128.0.9, not"),
        ({**GATE, "redirection": {"enabled": False, "gateway": "10.128.0.3"}}, "nat",
         "unmanaged", "gateway is 10.128.0.3 (disabled)"),
        (REDIRECTED_ELSEWHERE, "route", "self", 'soracom.redirection is "self" but the VPG\'s '
         "redirection gateway is 10.128.0.9, not this peer (10.128.0.3)"),
    ],
)  # fmt: skip
def test_a_redirection_not_pointing_here_is_degraded_with_the_reason(
    tmp_path: Path, gate: dict[str, Any], mode: str, setting: str, reason: str
) -> None:
    # Without a daemon too: an apply's state is judged the same way.
    for daemon in (True, False):
        doc = state_doc(gate=gate, packet_path={"mode": mode}, redirection={"mode": setting})
        status = run_status(
            tmp_path, doc, daemon=daemon, config=_with_mode(tmp_path, mode, setting)
        )
        assert status.health == "degraded", status.reasons
        assert any(reason in r for r in status.reasons), status.reasons
        assert to_json(status)["redirection"]["is_self"] is False


def test_route_mode_with_unmanaged_redirection_elsewhere_is_fine(tmp_path: Path) -> None:
    status = run_status(tmp_path, state_doc(gate=REDIRECTED_ELSEWHERE))
    assert status.health == "ok", status.reasons
    assert "not this peer (10.128.0.3); soracom.redirection unmanaged" in render(status)


def test_a_refused_answer_is_degraded_once_with_its_reason(tmp_path: Path) -> None:
    error = "VPG vpg-1: listGatePeers answer refused: netmask '128.0.0.0' (/1) differs"
    doc = state_doc(
        gate_error=error,
        api_answer_refused=True,
        api_refused_field="netmask",
        health="degraded",
        reasons=[f"SORACOM API: {error}; keeping the last applied state"],
    )
    for daemon in (True, False):
        status = run_status(tmp_path, doc, daemon=daemon)
        assert status.health == "degraded"
        mentions = [r for r in status.reasons if error in r]
        assert len(mentions) == 1, status.reasons
        assert to_json(status)["api"] == {
            "error": error,
            "answer_refused": True,
            "refused_field": "netmask",
        }


def test_status_shows_the_route_claim_and_the_sweep(tmp_path: Path) -> None:
    from gatepeer.status_report import render, to_json

    aws = {
        "route_tables": {
            "destination": "198.19.0.0/16",
            "eni_id": "eni-0new",
            "tables": {"rtb-0a1b2c3d": "replaced"},
            "checked_at": 1.0,
            "error": None,
        },
        "stale_registrations": {"removed": ["198.18.0.10"], "checked_at": 1.0, "error": None},
    }
    status = run_status(tmp_path, state_doc(aws=aws))
    assert to_json(status)["aws"] == aws
    assert (
        "aws           routes 198.19.0.0/16 -> eni-0new (rtb-0a1b2c3d replaced); "
        "stale registrations removed: 198.18.0.10"
    ) in render(status).splitlines()
    # A single peer without these features: no aws key, no line.
    plain = run_status(tmp_path, state_doc())
    assert "aws" not in to_json(plain) and "aws     " not in render(plain)


def test_the_sim_map_line_says_a_failed_refresh_kept_the_last_map(tmp_path: Path) -> None:
    sim_map = {"sims": 12, "fetched_at": NOW - 300, "error": None, "path": "/x/sims.json"}
    status = run_status(tmp_path, state_doc(sim_map=sim_map))
    assert to_json(status)["sim_map"] == sim_map
    assert "sim map       12 SIMs, fetched 5 min ago" in render(status).splitlines()
    failed = {**sim_map, "error": "SORACOM API listSims failed with HTTP 403: no permission"}
    status = run_status(tmp_path, state_doc(sim_map=failed))
    assert (
        "sim map       12 SIMs, fetched 5 min ago; last refresh failed, keeping the last map: "
        "SORACOM API listSims failed with HTTP 403: no permission"
    ) in render(status).splitlines()
    assert status.health == "ok"  # the data path does not depend on the SIM map
    plain = run_status(tmp_path, state_doc())
    assert "sim_map" not in to_json(plain) and "sim map" not in render(plain)
