"""keepalived.conf rendered from [ha]: golden files per mode, `keepalived -t` passes for each,
the facts it needs come from config or state.json, and `gatepeer ha render` end to end.

GATEPEER_UPDATE_GOLDEN=1 rewrites tests/golden/ha/*.conf from the cases below.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gatepeer.config import Config, parse
from gatepeer.ha import install, verdict
from gatepeer.ha.keepalived import ADVERT_MARKER, HaFacts, RenderError, render

GOLDEN = Path(__file__).parents[1] / "golden" / "ha"
SORACOM = {"auth_key_id": "keyId-testtesttest", "vpg_id": "vpg-0123abcd"}
LOCAL = ipaddress.IPv4Address("198.18.0.10")
# The verdict script as a package installed under /usr/lib would have it (verdict.command).
SCRIPT = "/usr/lib/python3/dist-packages/gatepeer/ha/verdict.sh"
CHECK = ("/bin/sh", SCRIPT, "/run/gatepeer/state.ha-check", "4")
SYNC = ("/bin/sh", SCRIPT, "/run/gatepeer/state.ha-sync", "4")
HOST_STATE = {"host": {"local_address": str(LOCAL), "underlay": "eth0"}}

# mode name -> [ha] table
MODES: dict[str, dict[str, Any]] = {
    # Junction redirection only (the claim through the API): the default shape.
    "redirection": {"peer_address": "198.18.0.11"},
    # Fast failover, a virtual inner address keepalived moves, and route tables (the latter
    # do not change keepalived's file: gatepeer calls ReplaceRoute on MASTER).
    "vip": {
        "peer_address": "198.18.0.11",
        "advert_interval": "100ms",
        "priority": 150,
        "virtual_router_id": 7,
        "virtual_address": "198.19.0.100",
        "route_tables": ["rtb-0123abcd"],
        "check_interval": "2s",
        "check_timeout": "2s",
        "check_fall": 3,
        "check_rise": 5,
    },
    # Preemption on: the higher priority takes the role back when it returns; no conntrackd
    # (so no sync script).
    "preempt": {
        "peer_address": "198.18.0.11",
        "nopreempt": False,
        "priority": 200,
        "conntrack_sync": False,
    },
    # Connections that survive: the NAT address keepalived moves on the underlay, the sync.
    "snat": {"peer_address": "198.18.0.11", "snat_address": "198.18.0.12"},
}


def config_for(mode: str) -> Config:
    return parse({"soracom": SORACOM, "ha": MODES[mode]})


def facts(check: tuple[str, ...] = CHECK) -> HaFacts:
    return HaFacts(LOCAL, "eth0", "vxlan0", check, SYNC, underlay="eth0")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_render_matches_golden_file(mode: str) -> None:
    cfg = config_for(mode)
    assert cfg.ha is not None
    text = render(cfg.ha, facts())
    path = GOLDEN / f"{mode}.conf"
    if os.environ.get("GATEPEER_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_every_golden_file_is_a_mode() -> None:
    assert {p.stem for p in GOLDEN.glob("*.conf")} == set(MODES)


def test_rendered_values_follow_the_config() -> None:
    """Not only the golden text: the settings that matter, read back from the rendering."""
    cfg = config_for("vip")
    assert cfg.ha is not None
    lines = [ln.strip() for ln in render(cfg.ha, facts()).splitlines()]
    assert "advert_int 0.1" in lines
    assert "version 3" in lines
    assert "priority 150" in lines and "virtual_router_id 7" in lines
    assert "unicast_src_ip 198.18.0.10" in lines and "198.18.0.11" in lines
    assert "unicast_fault_no_peer" in lines and "nopreempt" in lines
    assert "198.19.0.100/32 dev vxlan0" in lines
    assert "state BACKUP" in lines and "state MASTER" not in lines
    assert "weight 0" in lines and "fall 3" in lines and "rise 5" in lines
    redirection = config_for("redirection").ha
    assert redirection is not None
    plain = render(redirection, facts())
    assert "advert_int 1\n" in plain
    # No virtual address: the advert's mandatory address is the loopback marker, nothing on
    # the tunnel.
    assert f"{ADVERT_MARKER}/32 dev lo scope host" in plain and "dev vxlan0" not in plain
    preempt = config_for("preempt").ha
    assert preempt is not None
    assert "nopreempt" not in render(preempt, facts())
    assert "no_accept" not in plain  # the default: accept mode, as before


def test_snat_address_is_not_keepalived_s() -> None:
    """gatepeer takes the NAT address after conntrackd's commit (gatepeer/ha/handover.py):
    keepalived would add it, and draw the VPC hosts' replies, before the commit. It only
    removes it (the notify lines, below)."""
    snat = config_for("snat").ha
    assert snat is not None
    lines = [ln.strip() for ln in render(snat, facts()).splitlines()]
    assert [ln for ln in lines if "198.18.0.12" in ln and not ln.startswith("notify_")] == []
    assert f"{ADVERT_MARKER}/32 dev lo scope host" in lines  # the advert's address
    assert "no_accept" not in lines
    assert "weight -253" in lines and "gatepeer_sync" in lines


def keepalived_missing() -> str | None:
    return None if shutil.which("keepalived") else "keepalived is not installed"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_keepalived_accepts_each_mode(mode: str) -> None:
    if keepalived_missing():
        pytest.skip(keepalived_missing())
    cfg = config_for(mode)
    assert cfg.ha is not None
    # keepalived -t checks that the script exists: this installation's own commands.
    text = render(cfg.ha, install.facts_for(cfg, HOST_STATE))
    assert install.keepalived_test(text) is None


def test_keepalived_test_reports_what_it_refuses() -> None:
    """The validator must be able to fail: a config keepalived refuses comes back as its text."""
    if keepalived_missing():
        pytest.skip(keepalived_missing())
    cfg = config_for("redirection")
    assert cfg.ha is not None
    text = render(cfg.ha, install.facts_for(cfg, HOST_STATE))
    complaint = install.keepalived_test(text.replace("virtual_router_id 51", "virtual_router_id 0"))
    assert complaint is not None and "0" in complaint


def test_render_refuses_our_own_address_as_peer() -> None:
    cfg = config_for("redirection")
    assert cfg.ha is not None
    own = HaFacts(ipaddress.IPv4Address("198.18.0.11"), "eth0", "vxlan0", CHECK, SYNC)
    with pytest.raises(RenderError, match=r"^ha\.peer_address: 198\.18\.0\.11 is this host"):
        render(cfg.ha, own)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_master_stepping_down_tells_the_winner(mode: str) -> None:
    """A split brain's loser sends an advert at its lower priority before it steps down, so
    the winner hears MASTER_RX_LOWER_PRI and claims the gateway back at once."""
    cfg = config_for(mode)
    assert cfg.ha is not None
    assert "\n    higher_prio_send_advert\n" in render(cfg.ha, facts())


def test_keepalived_lets_go_of_the_nat_address_even_without_the_daemon() -> None:
    """On BACKUP, FAULT and stop keepalived itself removes ha.snat_address: a daemon killed on
    the master cannot, and its address would stay beside the new master's."""
    cfg = config_for("snat")
    assert cfg.ha is not None
    text = render(cfg.ha, facts())
    drop = '"/sbin/ip address del 198.18.0.12/32 dev eth0"'
    for state in ("backup", "fault", "stop"):
        assert f"    notify_{state} {drop}\n" in text
    assert "notify_master" not in text  # taking it is the daemon's, after conntrackd's commit
    plain = config_for("redirection").ha
    assert plain is not None and "ip address del" not in render(plain, facts())
    without = HaFacts(LOCAL, "eth0", "vxlan0", CHECK, SYNC)
    with pytest.raises(RenderError, match=r"^ha\.snat_address: the underlay"):
        render(cfg.ha, without)


@pytest.mark.parametrize("word", ["/opt/my gatepeer/bin/gatepeer", '/etc/"q".toml', "a;b"])
def test_render_refuses_a_command_keepalived_cannot_pass(word: str) -> None:
    cfg = config_for("redirection")
    assert cfg.ha is not None
    with pytest.raises(RenderError, match="health check command"):
        render(cfg.ha, facts((word, "check")))


# ---- the facts: config first, then the state file --------------------------------------------


def test_facts_from_config() -> None:
    cfg = parse(
        {
            "soracom": SORACOM,
            "tunnel": {"local_address": "198.18.0.10", "underlay_interface": "ens5"},
            "ha": {"peer_address": "198.18.0.11"},
        }
    )
    state = {"host": {"local_address": "198.18.9.9", "underlay": "eth9"}}
    f = install.facts_for(cfg, state)
    assert (f.local_address, f.vrrp_interface, f.tunnel_interface) == (LOCAL, "ens5", "vxlan0")
    age = str(verdict.max_age(cfg))
    script = str(verdict.SCRIPT)
    assert f.check_command == ("/bin/sh", script, "/run/gatepeer/state.ha-check", age)
    assert f.sync_command == ("/bin/sh", script, "/run/gatepeer/state.ha-sync", age)
    assert verdict.SCRIPT.is_file()


def test_facts_from_state_file_when_config_leaves_them_out(tmp_path: Path) -> None:
    cfg = parse(
        {
            "soracom": SORACOM,
            "agent": {"state_file": str(tmp_path / "state.json")},
            "probes": {"interval": "5s", "timeout": "1s"},
            "ha": {"peer_address": "198.18.0.11", "interface": "ens6", "conntrack_sync": False},
        }
    )
    state = {"host": {"local_address": "198.18.0.10", "underlay": "eth9"}}
    f = install.facts_for(cfg, state)
    assert f.local_address == LOCAL
    assert f.vrrp_interface == "ens6"  # ha.interface beats the recorded underlay
    # Its verdict beside the state file, good for 3 probe rounds and a timeout (16 s).
    verdict_file = str(tmp_path / "state.ha-check")
    assert f.check_command == ("/bin/sh", str(verdict.SCRIPT), verdict_file, "16")
    assert f.sync_command == ()  # no sync, no sync check


@pytest.mark.parametrize(
    ("ha", "state", "message"),
    [
        (None, {}, r"^ha: no \[ha\] section"),
        ({"peer_address": "198.18.0.11"}, None, r"^tunnel\.local_address: unknown"),
        (
            {"peer_address": "198.18.0.11"},
            {"host": {"local_address": "198.18.0.10"}},
            r"^ha\.interface: unknown",
        ),
    ],
)
def test_facts_that_cannot_be_known_name_the_setting(
    ha: dict[str, Any] | None, state: dict[str, Any] | None, message: str
) -> None:
    cfg = parse({"soracom": SORACOM, **({"ha": ha} if ha else {})})
    with pytest.raises(RenderError, match=message):
        install.facts_for(cfg, state)


# ---- the command --------------------------------------------------------------------------


def write_config(tmp_path: Path, ha: str) -> Path:
    key = tmp_path / "auth-key"
    key.write_text("secret\n")
    key.chmod(0o600)
    path = tmp_path / "gatepeer.toml"
    path.write_text(
        f'[soracom]\nauth_key_id = "keyId-x"\nauth_key_file = "{key}"\nvpg_id = "vpg-1"\n'
        f'[tunnel]\nlocal_address = "198.18.0.10"\nunderlay_interface = "lo"\n'
        f'[agent]\nstate_file = "{tmp_path / "state.json"}"\n[ha]\n{ha}'
    )
    return path


def gatepeer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatepeer", *args], capture_output=True, text=True, timeout=60
    )


def test_ha_render_prints_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'peer_address = "198.18.0.11"\ninterface = "eth0"\n')
    out = gatepeer("ha", "render", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert "unicast_src_ip 198.18.0.10" in out.stdout
    assert f"verdict.sh {tmp_path / 'state.ha-check'} " in out.stdout


def test_ha_render_output_is_validated_before_writing(tmp_path: Path) -> None:
    if keepalived_missing():
        pytest.skip(keepalived_missing())
    target = tmp_path / "keepalived.conf"
    # lo cannot carry VRRP: keepalived -t refuses, and nothing is written.
    bad = write_config(tmp_path, 'peer_address = "198.18.0.11"\ninterface = "lo"\n')
    out = gatepeer("ha", "render", "--config", str(bad), "-o", str(target))
    assert out.returncode == 1
    assert "keepalived -t refused" in out.stderr and len(out.stderr.splitlines()) == 1
    assert not target.exists()
    good = write_config(tmp_path, 'peer_address = "198.18.0.11"\ninterface = "eth0"\n')
    out = gatepeer("ha", "render", "--config", str(good), "-o", str(target))
    assert out.returncode == 0, out.stderr
    assert "interface eth0" in target.read_text()


def test_ha_render_bad_config_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'peer_address = "198.18.0.10"\n')
    out = gatepeer("ha", "render", "--config", str(path))
    assert out.returncode == 2
    assert out.stderr.startswith("gatepeer: config error: ha.peer_address:")
    assert len(out.stderr.splitlines()) == 1
