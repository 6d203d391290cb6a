"""`gatepeer doctor` without a lab: each judgment on its own (pure), the DF probe's parsing of
"fragmentation needed", the report's exit codes and JSON, the API checks against the emulator
in process (healthy, wrong key, Gate closed, unknown VPG, API down: and never a secret in the
output), and the command's bad-config exit 2."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import readings
from helpers.aws_fakes import closed_port_url

from gatepeer import atomic_json
from gatepeer.cli import main
from gatepeer.config import (
    AgentConfig,
    Config,
    HaConfig,
    PacketPathConfig,
    SoracomConfig,
    TunnelConfig,
)
from gatepeer.desired_state import Endpoint, GateView, Redirection
from gatepeer.doctor.judgments import (
    Check,
    TunnelExpectation,
    judge_clock,
    judge_conntrack,
    judge_fdb,
    judge_gate,
    judge_ip_forward,
    judge_neighbours,
    judge_nftables,
    judge_path_mtu,
    judge_redirection,
    judge_registration,
    judge_sim_map,
    judge_tunnel,
    judge_underlay_mtu,
)
from gatepeer.doctor.runner import Doctor, Report, diagnose, render, to_json
from gatepeer.kernel.pmtu import PathProbe, parse_frag_needed
from gatepeer.kernel.rtnl import LinkReading
from gatepeer.lab.emulator.model import EmulatorSettings
from gatepeer.lab.emulator.service import Emulator
from gatepeer.ruleset import PacketPathSpec
from gatepeer.ruleset import render as render_table
from gatepeer.soracom import SoracomClient

A = IPv4Address
VPG = "d6a52f88-4f11-4f5e-9b2d-1f2e3d4c5b6a"
OUTER = A("198.18.0.10")
SUBNET = IPv4Network("198.19.0.0/16")
ENDPOINTS = (A("198.18.1.11"), A("198.18.1.12"))
SECRET = "doctor-test-secret-4f9a1c2e7b"


def gate_view(gateway: str | None = "198.19.0.3", enabled: bool = True) -> GateView:
    return GateView(
        vpg_id=VPG,
        vni=10,
        device_subnet=SUBNET,
        gate_opened=True,
        inner=IPv4Interface("198.19.0.3/16"),
        endpoints=tuple(Endpoint(e, None) for e in ENDPOINTS),
        outer=OUTER,
        redirection=Redirection(enabled, A(gateway) if gateway else None),
    )


def config(**soracom: Any) -> Config:
    return Config(soracom=SoracomConfig(vpg_id=VPG, auth_key_id="keyId-x", **soracom))


# ---- judgments ------------------------------------------------------------------------------


def test_gate_closed_fails_and_says_how_to_open_it() -> None:
    assert judge_gate(VPG, True, False).status == "ok"
    closed = judge_gate(VPG, False, False)
    assert closed.status == "fail" and "soracom.open_gate" in closed.detail
    # gatepeer itself will open it at the next apply: a warning only.
    assert judge_gate(VPG, False, True).status == "warn"


def test_registration_missing_is_a_warning_before_the_first_apply_and_a_failure_after() -> None:
    before = judge_registration(VPG, OUTER, None, None, None, preflight=True)
    after = judge_registration(VPG, OUTER, None, None, None, preflight=False)
    assert before.status == "warn" and after.status == "fail"
    assert "198.18.0.10 is not registered" in after.detail and "gatepeer apply" in after.detail


def test_registration_inner_address_must_agree_with_config_and_tunnel() -> None:
    inner = A("198.19.0.3")
    on_link = [IPv4Interface("198.19.0.3/16")]
    ok = judge_registration(VPG, OUTER, inner, inner, on_link, preflight=False)
    assert ok.status == "ok" and "on the tunnel" in ok.detail
    asked = judge_registration(VPG, OUTER, inner, A("198.19.0.9"), on_link, preflight=False)
    assert asked.status == "fail" and 'inner_address = "198.19.0.3"' in asked.detail
    elsewhere = [IPv4Interface("198.19.0.7/16")]
    moved = judge_registration(VPG, OUTER, inner, None, elsewhere, preflight=False)
    assert moved.status == "fail" and "198.19.0.7/16" in moved.detail


@pytest.mark.parametrize(
    ("mode", "setting", "expected"),
    [("route", "self", "fail"), ("nat", "unmanaged", "fail"), ("route", "unmanaged", "warn")],
)
def test_redirection_elsewhere_fails_only_where_it_is_needed(
    mode: str, setting: str, expected: str
) -> None:
    cfg = Config(
        soracom=SoracomConfig(redirection=setting),  # type: ignore[arg-type]
        packet_path=PacketPathConfig(mode=mode),  # type: ignore[arg-type]
    )
    assert judge_redirection(cfg, gate_view()).status == "ok"
    check = judge_redirection(cfg, gate_view("198.19.0.200"))
    assert check.status == expected
    assert "198.19.0.200" in check.detail and "198.19.0.3" in check.detail
    assert judge_redirection(cfg, gate_view(None, enabled=False)).status == expected


def test_redirection_with_ha_accepts_the_virtual_address_and_only_warns_otherwise() -> None:
    ha = HaConfig(peer_address=A("198.18.0.11"), virtual_address=A("198.19.0.250"))
    cfg = Config(soracom=SoracomConfig(redirection="self"), ha=ha)
    assert judge_redirection(cfg, gate_view("198.19.0.250")).status == "ok"
    backup = judge_redirection(cfg, gate_view("198.19.0.4"))
    assert backup.status == "warn" and "master" in backup.detail


def test_underlay_mtu_must_carry_the_tunnel_mtu_and_50_bytes() -> None:
    bad = judge_underlay_mtu("eth0", 1500, 1500)
    assert bad.status == "fail"
    assert "1550" in bad.detail and "at most 1450" in bad.detail
    assert judge_underlay_mtu("eth0", 1550, 1500).status == "ok"
    assert judge_underlay_mtu("eth0", 9001, "auto").status == "ok"
    assert judge_underlay_mtu("eth0", 1500, "auto").status == "warn"  # 1450 < devices' 1500


def test_path_mtu_outcomes() -> None:
    t = ENDPOINTS[0]
    assert judge_path_mtu(PathProbe(t, 1550, answered=True), 1500).status == "ok"
    local = judge_path_mtu(PathProbe(t, 1550, local_mtu=1500), 1500)
    assert local.status == "fail" and "at most 1450" in local.detail
    router = judge_path_mtu(PathProbe(t, 1550, reported_mtu=1400), 1500)
    assert router.status == "fail" and "1400" in router.detail and "at most 1350" in router.detail
    black_hole = judge_path_mtu(PathProbe(t, 1550, small_answered=True), 1500)
    assert black_hole.status == "fail" and "small pings" in black_hole.detail
    silent = judge_path_mtu(PathProbe(t, 1550), 1500)
    assert silent.status == "warn" and "not known" in silent.detail


def frag_needed(dst: IPv4Address, ident: int, mtu: int) -> bytes:
    """A router's ICMP "fragmentation needed" quoting an echo request to `dst`."""
    quoted_ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1550, 1, 0x4000, 64, 1, 0, b"\xc6\x12\0\x0a",
                            dst.packed)  # fmt: skip
    quoted_icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quoted_ip + quoted_icmp
    outer = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 2, 0, 64, 1, 0,
                        b"\xc6\x12\x01\x01", b"\xc6\x12\0\x0a")  # fmt: skip
    return outer + icmp


def test_frag_needed_is_parsed_for_our_probes_only() -> None:
    packet = frag_needed(ENDPOINTS[1], 0x4242, 1400)
    assert parse_frag_needed(packet, 0x4242) == (ENDPOINTS[1], 1400)
    assert parse_frag_needed(packet, 0x4243) is None  # someone else's ping
    assert parse_frag_needed(packet[:40], 0x4242) is None  # truncated quote


def test_ip_forward() -> None:
    assert judge_ip_forward(1, preflight=False).status == "ok"
    off = judge_ip_forward(0, preflight=False)
    assert off.status == "fail" and "net.ipv4.ip_forward = 0" in off.detail
    assert judge_ip_forward(0, preflight=True).status == "skip"


def link(**changes: Any) -> LinkReading:
    """vxlan0 as the doctor reads it: no traffic counters, local address OUTER."""
    return readings.link(**{"stats": None, "local": OUTER, **changes})


WANT = TunnelExpectation("vxlan0", vni=10, local=OUTER, dst_port=4789, underlay_index=2, mtu=1500)


def test_tunnel_states() -> None:
    assert judge_tunnel(link(), WANT, preflight=False).status == "ok"
    assert judge_tunnel(None, WANT, preflight=True).status == "skip"
    assert judge_tunnel(None, WANT, preflight=False).status == "fail"
    wrong_vni = judge_tunnel(link(vni=20), WANT, preflight=False)
    assert wrong_vni.status == "fail" and "VNI 20" in wrong_vni.detail
    down = judge_tunnel(link(flags=0), WANT, preflight=False)
    assert down.status == "fail" and "admin down" in down.detail
    bridge = judge_tunnel(link(kind="bridge"), WANT, preflight=False)
    assert bridge.status == "fail" and "not vxlan" in bridge.detail
    assert judge_tunnel(link(mtu=1400), WANT, preflight=False).status == "warn"


def test_fdb_needs_one_flood_entry_per_endpoint() -> None:
    both = frozenset(ENDPOINTS)
    assert judge_fdb("vxlan0", both, ENDPOINTS, preflight=False).status == "ok"
    missing = judge_fdb("vxlan0", frozenset(ENDPOINTS[:1]), ENDPOINTS, preflight=False)
    assert missing.status == "fail" and "198.18.1.12" in missing.detail
    stale = judge_fdb("vxlan0", both | {A("198.18.1.99")}, ENDPOINTS, preflight=False)
    assert stale.status == "warn" and "198.18.1.99" in stale.detail


def table(endpoints: tuple[IPv4Address, ...]) -> str:
    spec = PacketPathSpec(SUBNET, 10, OUTER, endpoints=frozenset(endpoints))
    return render_table(spec)


def test_nftables_table_must_be_loaded_and_admit_every_endpoint() -> None:
    assert judge_nftables(table(ENDPOINTS), ENDPOINTS, preflight=False).status == "ok"
    gone = judge_nftables(None, ENDPOINTS, preflight=False)
    assert gone.status == "fail" and "inet gatepeer is not loaded" in gone.detail
    assert judge_nftables(None, ENDPOINTS, preflight=True).status == "skip"
    shut = judge_nftables(table(ENDPOINTS[:1]), ENDPOINTS, preflight=False)
    assert shut.status == "fail" and "198.18.1.12" in shut.detail


def test_conntrack_and_neighbour_headroom() -> None:
    assert judge_conntrack(10, 1 << 20, 1 << 19, limit_writable=True).status == "ok"
    assert judge_conntrack(800, 1000, 100, limit_writable=True).status == "warn"
    full = judge_conntrack(990, 1000, 100, limit_writable=True)
    assert full.status == "fail" and "nf_conntrack_max" in full.detail
    small = judge_conntrack(1, 1000, 4096, limit_writable=False)
    assert small.status == "warn" and "initial network namespace" in small.detail
    assert judge_conntrack(None, None, 100, limit_writable=False).status == "skip"
    assert judge_neighbours(10, 100_000, 100_000).status == "ok"
    assert judge_neighbours(10, None, 100_000).status == "skip"
    overflow = judge_neighbours(1000, 1024, 100_000)
    assert overflow.status == "fail" and "kernel.neighbour_table_devices" in overflow.detail
    assert judge_neighbours(10, 1024, 100_000).status == "warn"


def test_clock_skew_against_the_date_header() -> None:
    date = "Sun, 29 Nov 2026 09:00:00 GMT"
    at = 1_795_942_800.0  # that second
    assert judge_clock(date, at + 0.5).status == "ok"
    ahead = judge_clock(date, at + 30.5)
    assert ahead.status == "warn" and "30.0 s ahead" in ahead.detail
    behind = judge_clock(date, at - 600)
    assert behind.status == "fail" and "behind" in behind.detail and "NTP" in behind.detail
    assert judge_clock(None, at).status == "skip"
    assert judge_clock("not a date", at).status == "skip"


def test_exit_codes_and_json() -> None:
    warn = Report([Check("ok", "a", "x"), Check("warn", "b", "y")])
    assert warn.exit_code == 0
    failed = Report([Check("fail", "gate", "closed"), Check("skip", "c", "z")])
    assert failed.exit_code == 1
    assert Report([Check("fail", "config", "bad")], bad_config=True).exit_code == 2
    doc = to_json(failed)
    assert doc["exit_code"] == 1 and doc["counts"] == {"ok": 0, "warn": 0, "fail": 1, "skip": 1}
    assert doc["checks"][0] == {"status": "fail", "name": "gate", "detail": "closed"}
    assert render(failed).splitlines()[0].split() == ["fail", "gate", "closed"]


# ---- against the emulator, in process -------------------------------------------------------


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(EmulatorSettings(vpg_id=VPG, auth_key=SECRET))
    try:
        yield emu
    finally:
        emu.stop()


def api_doctor(tmp_path: Path, endpoint: str, *, key: str = SECRET, **soracom: Any) -> Doctor:
    key_file = tmp_path / "auth-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    state = tmp_path / "state.json"
    atomic_json.write(state, {"health": "ok"})  # a peer gatepeer set up: nothing is pre-flight
    cfg = Config(
        soracom=SoracomConfig(
            endpoint=endpoint,
            auth_key_id=EmulatorSettings().auth_key_id,
            auth_key_file=key_file,
            vpg_id=soracom.pop("vpg_id", VPG),
            redirection="self",
            **soracom,
        ),
        # No such link on the test host: the tunnel reads find nothing, as on a bare host.
        tunnel=TunnelConfig(interface="gpdoctest0", local_address=OUTER),
        agent=AgentConfig(state_file=state, gate_cache=None),
    )
    doctor = Doctor(cfg, sys_root=tmp_path)
    doctor.outer = OUTER
    doctor.add(*doctor.check_secret())
    doctor.add(*doctor.check_api())
    return doctor


def by_name(doctor: Doctor) -> dict[str, Check]:
    return {c.name: c for c in doctor.report.checks}


def register(emu: Emulator, base: str, gateway_here: bool = True) -> str:
    api = SoracomClient(base, EmulatorSettings().auth_key_id, lambda: SECRET)
    inner = str(api.register_gate_peer(VPG, str(OUTER))["innerIpAddress"])
    if gateway_here:
        api.set_redirection(VPG, inner)
    return inner


def secrets_of(emu: Emulator) -> set[str]:
    """Every token and API key the emulator issued, and the auth key."""
    issued = {SECRET}
    for token, session in emu._tokens.items():
        issued |= {token, session.api_key}
    return issued


def assert_no_secret(emu: Emulator, doctor: Doctor) -> None:
    out = render(doctor.report) + json.dumps(to_json(doctor.report))
    shown = [s for s in secrets_of(emu) if s in out]
    assert shown == [], "doctor printed a secret"


def test_healthy_api_side_passes_and_shows_no_secret(emulator: Emulator, tmp_path: Path) -> None:
    base = emulator.start()
    inner = register(emulator, base)
    doctor = api_doctor(tmp_path, base)
    checks = by_name(doctor)
    for name in ("secret", "api", "clock", "vpg", "gate", "sim-map", "registration", "redirection"):
        assert checks[name].status == "ok", checks[name]
    assert "198.18.1.11, 198.18.1.12" in checks["vpg"].detail
    assert inner in checks["registration"].detail
    assert doctor.gathered.endpoints == ENDPOINTS and doctor.gathered.vni == 10
    assert len(secrets_of(emulator)) >= 3  # the doctor's own login issued a token
    assert_no_secret(emulator, doctor)


def test_wrong_key_fails_the_api_check_without_showing_either_key(
    emulator: Emulator, tmp_path: Path
) -> None:
    base = emulator.start()
    doctor = api_doctor(tmp_path, base, key="not-the-key-8d2e")
    checks = by_name(doctor)
    assert checks["api"].status == "fail" and "HTTP 401" in checks["api"].detail
    assert checks["vpg"].status == "skip" and doctor.report.exit_code == 1
    out = render(doctor.report)
    assert "not-the-key-8d2e" not in out
    assert_no_secret(emulator, doctor)


def test_closed_gate_and_unregistered_peer_and_redirection_elsewhere(
    emulator: Emulator, tmp_path: Path
) -> None:
    base = emulator.start()
    register(emulator, base, gateway_here=False)
    api = SoracomClient(base, EmulatorSettings().auth_key_id, lambda: SECRET)
    api.set_redirection(VPG, "198.19.0.200")
    emulator.update_settings(gate_opened=False)
    (tmp_path / "closed").mkdir()
    checks = by_name(api_doctor(tmp_path / "closed", base))
    assert checks["gate"].status == "fail"
    assert checks["redirection"].status == "fail" and "198.19.0.200" in checks["redirection"].detail
    emulator.update_settings(gate_opened=True)
    api.unregister_gate_peer(VPG, str(OUTER))
    (tmp_path / "gone").mkdir()
    checks = by_name(api_doctor(tmp_path / "gone", base))
    assert checks["gate"].status == "ok"
    assert checks["registration"].status == "fail" and checks["redirection"].status == "skip"


def test_unknown_vpg_names_the_setting(emulator: Emulator, tmp_path: Path) -> None:
    base = emulator.start()
    checks = by_name(api_doctor(tmp_path, base, vpg_id="00000000-0000-4000-8000-000000000000"))
    assert checks["vpg"].status == "fail" and "soracom.vpg_id" in checks["vpg"].detail


def test_api_down_fails_the_api_check_quickly(tmp_path: Path) -> None:
    doctor = api_doctor(tmp_path, closed_port_url())
    checks = by_name(doctor)
    assert checks["api"].status == "fail" and "soracom.endpoint" in checks["api"].detail
    assert checks["clock"].status == "skip"


# ---- the command ----------------------------------------------------------------------------


def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "gatepeer.toml"
    path.write_text('[soracom]\nauth_key_id = "keyId-x"\nvpg_id = "v"\n[tunnel]\nmtu = 99\n')
    result = CliRunner().invoke(main, ["doctor", "--config", str(path)])
    assert result.exit_code == 2
    fails = [ln for ln in result.output.splitlines() if ln.startswith("fail")]
    assert len(fails) == 1 and "tunnel.mtu" in fails[0]


def test_group_readable_key_file_is_bad_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gatepeer.aws.detect.SYS_ROOT", tmp_path)  # never EC2 here
    key = tmp_path / "auth-key"
    key.write_text(SECRET)
    key.chmod(0o640)
    path = tmp_path / "gatepeer.toml"
    path.write_text(
        f'[soracom]\nauth_key_id = "keyId-x"\nvpg_id = "v"\nauth_key_file = "{key}"\n'
        f'endpoint = "{closed_port_url()}"\n'
        f'[tunnel]\nunderlay_interface = "lo"\nlocal_address = "{OUTER}"\n'
        f'interface = "gpdoctest0"\n[agent]\nstate_file = "{tmp_path / "state.json"}"\n'
        'gate_cache = ""\n'
    )
    result = CliRunner().invoke(main, ["doctor", "--json", "--config", str(path)])
    assert result.exit_code == 2, result.output
    doc = json.loads(result.output)
    secret = next(c for c in doc["checks"] if c["name"] == "secret")
    assert secret["status"] == "fail" and "soracom.auth_key_file" in secret["detail"]
    assert "chmod 0600" in secret["detail"] and SECRET not in result.output
    statuses = {c["name"]: c["status"] for c in doc["checks"]}
    assert statuses["api"] == "skip" and doc["preflight"] is True
    assert all(statuses[n] == "skip" for n in ("aws-source-dest-check", "aws-iam"))


def test_diagnose_reports_an_unreadable_config_as_bad_config(tmp_path: Path) -> None:
    report = diagnose(tmp_path / "missing.toml")
    assert report.exit_code == 2 and report.checks[0].name == "config"


def test_the_judgments_import_no_kernel_or_aws_code() -> None:
    """doctor/judgments.py is pure: it gets readings as values, so importing it pulls in none
    of the modules that read the kernel or call AWS."""
    probe = (
        "import sys, gatepeer.doctor.judgments; "
        "print(sorted(m for m in sys.modules "
        "if m.startswith(('gatepeer.kernel', 'gatepeer.aws', 'pyroute2', 'boto'))))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_key_without_the_sim_map_permissions_is_a_named_warning(
    emulator: Emulator, tmp_path: Path
) -> None:
    base = emulator.start()
    register(emulator, base)
    emulator.set_faults(deny=["listSims"])
    doctor = api_doctor(tmp_path, base)
    check = by_name(doctor)["sim-map"]
    assert check.status == "warn"
    assert check.detail == (
        "the auth key may not call listSims: `gatepeer devices` shows no SIM names; give the "
        "key's SAM user (or role) the permissions Sim:listSims, "
        "VirtualPrivateGateway:listVirtualPrivateGatewayIpAddressMapEntries"
    )
    assert doctor.report.exit_code == 0  # a warning: the data path works without names
    # One page each, never the whole list: the doctor stays quick on a big operator.
    assert emulator.counts().get("listVirtualPrivateGatewayIpAddressMapEntries") == 1


def test_the_sim_map_judgment() -> None:
    assert judge_sim_map({}, enabled=False).status == "skip"
    assert judge_sim_map({}, enabled=True).status == "ok"
    other = judge_sim_map({"listSims": (503, "SORACOM API listSims failed")}, enabled=True)
    assert (other.status, other.detail) == (
        "warn",
        "cannot read the SIM map (listSims): SORACOM API listSims failed",
    )
