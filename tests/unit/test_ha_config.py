"""The [ha] section: typed values and defaults, and a one-line error naming `ha.<key>` for every
bad value, through `parse` and through `gatepeer config check` (exit 2)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gatepeer.config import HA_NOTIFY_FIFO, ConfigError, HaConfig, parse

SORACOM = {"auth_key_id": "keyId-testtesttest", "vpg_id": "vpg-0123abcd"}
PEER = "198.18.0.11"


def with_ha(ha: dict[str, Any], tunnel: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"soracom": SORACOM, "ha": ha}
    if tunnel is not None:
        doc["tunnel"] = tunnel
    return doc


def test_no_ha_section_means_a_single_peer() -> None:
    cfg = parse({"soracom": SORACOM})
    assert cfg.ha is None
    assert "ha" not in cfg.masked()


def test_defaults() -> None:
    ha = parse(with_ha({"peer_address": PEER})).ha
    assert ha == HaConfig(peer_address=ipaddress.IPv4Address(PEER))
    assert ha.priority == 254
    assert ha.advert_interval == 1.0
    assert ha.nopreempt is True
    assert ha.virtual_address is None and ha.route_tables == ()
    assert (ha.check_interval, ha.check_timeout, ha.check_fall, ha.check_rise) == (1, 3, 2, 2)
    assert ha.notify_fifo == HA_NOTIFY_FIFO


def test_every_key() -> None:
    ha = parse(
        with_ha(
            {
                "peer_address": PEER,
                "priority": 150,
                "advert_interval": "100ms",
                "virtual_router_id": 7,
                "nopreempt": False,
                "interface": "ens5",
                "virtual_address": "198.19.0.100",
                "route_tables": ["rtb-0123abcd", "rtb-0123456789abcdef0"],
                "check_interval": "2s",
                "check_timeout": 2,
                "check_fall": 3,
                "check_rise": 4,
                "notify_fifo": "/run/test/ka.fifo",
            }
        )
    ).ha
    assert ha is not None
    assert ha.priority == 150
    assert ha.advert_interval == pytest.approx(0.1)
    assert ha.virtual_router_id == 7
    assert ha.nopreempt is False
    assert ha.interface == "ens5"
    assert ha.virtual_address == ipaddress.IPv4Address("198.19.0.100")
    assert ha.route_tables == ("rtb-0123abcd", "rtb-0123456789abcdef0")
    assert (ha.check_interval, ha.check_timeout, ha.check_fall, ha.check_rise) == (2, 2, 3, 4)
    assert ha.notify_fifo == Path("/run/test/ka.fifo")


@pytest.mark.parametrize(
    ("raw", "seconds"), [('"10ms"', 0.01), ('"2.5s"', 2.5), ("3", 3.0), ('"40.95s"', 40.95)]
)
def test_advert_interval_in_centiseconds(raw: str, seconds: float) -> None:
    import tomllib

    value = tomllib.loads(f"a = {raw}")["a"]
    ha = parse(with_ha({"peer_address": PEER, "advert_interval": value})).ha
    assert ha is not None and ha.advert_interval == pytest.approx(seconds)


# key, value (None: leave the key out), expected message start; tunnel settings when needed
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("missing peer", {}, "ha.peer_address: missing"),
    ("peer not a string", {"peer_address": 3}, "ha.peer_address: must be a string"),
    ("peer not an address", {"peer_address": "198.18.0.300"}, "ha.peer_address: not an IPv4"),
    ("peer multicast", {"peer_address": "224.0.0.18"}, "ha.peer_address: must be a unicast"),
    ("peer loopback", {"peer_address": "127.0.0.1"}, "ha.peer_address: must be a unicast"),
    ("peer is us", {"peer_address": "198.18.0.10"}, "ha.peer_address: is this host's"),
    ("priority 0", {"priority": 0}, "ha.priority: must be between 1 and 254"),
    ("priority 255", {"priority": 255}, "ha.priority: must be between 1 and 254"),
    ("priority string", {"priority": "100"}, "ha.priority: must be an integer"),
    ("advert too short", {"advert_interval": "5ms"}, "ha.advert_interval: must be between"),
    ("advert too long", {"advert_interval": "41s"}, "ha.advert_interval: must be between"),
    ("advert ms", {"advert_interval": "105ms"}, "ha.advert_interval: VRRPv3 counts"),
    ("advert word", {"advert_interval": "fast"}, "ha.advert_interval: must be a duration"),
    ("vrid 0", {"virtual_router_id": 0}, "ha.virtual_router_id: must be between 1 and 255"),
    ("vrid 256", {"virtual_router_id": 256}, "ha.virtual_router_id: must be between 1 and 255"),
    ("nopreempt string", {"nopreempt": "yes"}, "ha.nopreempt: must be true or false"),
    ("interface bad", {"interface": "eth 0"}, "ha.interface: not an interface name"),
    ("interface tunnel", {"interface": "vxlan0"}, "ha.interface: VRRP runs on the underlay"),
    ("vip bad", {"virtual_address": "198.19.0.0/24"}, "ha.virtual_address: not an IPv4"),
    ("vip is peer", {"virtual_address": PEER}, "ha.virtual_address: 198.18.0.11 is a VPC"),
    ("vip is us", {"virtual_address": "198.18.0.10"}, "ha.virtual_address: 198.18.0.10 is a"),
    ("vip broadcast", {"virtual_address": "255.255.255.255"}, "ha.virtual_address: must be a"),
    ("tables string", {"route_tables": "rtb-0123abcd"}, "ha.route_tables: must be a list"),
    ("tables bad id", {"route_tables": ["rtb-xyz"]}, "ha.route_tables: not a route table id"),
    ("tables twice", {"route_tables": ["rtb-0123abcd"] * 2}, "ha.route_tables: lists a route"),
    ("check 0", {"check_interval": 0}, "ha.check_interval: must be between 1s and 60s"),
    ("check fraction", {"check_interval": "1.5s"}, "ha.check_interval: keepalived counts whole"),
    ("timeout 0", {"check_timeout": 0}, "ha.check_timeout: must be between 1s and 60s"),
    ("fall 0", {"check_fall": 0}, "ha.check_fall: must be between 1 and 100"),
    ("rise bool", {"check_rise": True}, "ha.check_rise: must be an integer"),
    ("fifo relative", {"notify_fifo": "ka.fifo"}, "ha.notify_fifo: must be an absolute path"),
    ("unknown key", {"mode": "vip"}, "ha.mode: unknown key"),
    ("snat bad", {"snat_address": "198.18.0"}, "ha.snat_address: not an IPv4"),
    ("snat is peer", {"snat_address": PEER}, "ha.snat_address: 198.18.0.11 is ha.peer_address"),
    ("snat is us", {"snat_address": "198.18.0.10"}, "ha.snat_address: 198.18.0.10 is this host"),
    ("snat multicast", {"snat_address": "239.1.1.1"}, "ha.snat_address: must be a unicast"),
    (
        "snat is vip",
        {"snat_address": "198.19.0.100", "virtual_address": "198.19.0.100"},
        "ha.snat_address: 198.19.0.100 is ha.virtual_address",
    ),
    ("sync not bool", {"conntrack_sync": "on"}, "ha.conntrack_sync: must be true or false"),
    ("sync port 0", {"sync_port": 0}, "ha.sync_port: must be between 1 and 65535"),
    ("sync port vxlan", {"sync_port": 4789}, "ha.sync_port: 4789 is the tunnel's VXLAN port"),
    (
        "conntrackd config relative",
        {"conntrackd_config": "conntrackd.conf"},
        "ha.conntrackd_config: must be an absolute path",
    ),
    (
        "conntrackd socket spaces",
        {"conntrackd_socket": "/run/a b.ctl"},
        "ha.conntrackd_socket: must be an absolute path without spaces",
    ),
]


@pytest.mark.parametrize(("values", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_value_is_one_line_naming_the_key(values: dict[str, Any], message: str) -> None:
    # Every case but the missing peer has a valid peer, so only its own key is wrong.
    ha: dict[str, Any] = {"peer_address": PEER} if values else {}
    ha.update(values)
    with pytest.raises(ConfigError) as info:
        parse(with_ha(ha, tunnel={"local_address": "198.18.0.10"}))
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_ha_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"^ha: must be a table"):
        parse({"soracom": SORACOM, "ha": "on"})


def test_config_check_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    key = tmp_path / "auth-key"
    key.write_text("secret\n")
    key.chmod(0o600)
    path = tmp_path / "gatepeer.toml"
    path.write_text(
        f'[soracom]\nauth_key_id = "keyId-x"\nauth_key_file = "{key}"\nvpg_id = "vpg-1"\n'
        f'[ha]\npeer_address = "{PEER}"\nadvert_interval = "105ms"\n'
    )
    cmd = [sys.executable, "-m", "gatepeer", "config", "check", "--config", str(path)]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("gatepeer: config error: ha.advert_interval:")
    assert len(bad.stderr.strip().splitlines()) == 1
    path.write_text(path.read_text().replace('"105ms"', '"100ms"'))
    good = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30)
    assert good.returncode == 0, good.stderr
    shown = json.loads(good.stdout)["ha"]
    assert shown["peer_address"] == PEER and shown["advert_interval"] == 0.1
    assert shown["virtual_address"] == "(default)"


def test_snat_and_sync_defaults_and_values() -> None:
    ha = parse(with_ha({"peer_address": PEER})).ha
    assert ha is not None
    assert ha.snat_address is None  # behaviour as before: each peer masquerades to itself
    assert ha.conntrack_sync is True and ha.sync_port == 3780
    assert ha.conntrackd_config == Path("/etc/conntrackd/conntrackd.conf")
    ha = parse(
        with_ha(
            {
                "peer_address": PEER,
                "snat_address": "198.18.0.12",
                "conntrack_sync": False,
                "sync_port": 3781,
                "conntrackd_config": "/run/lab/c.conf",
                "conntrackd_socket": "/run/lab/c.ctl",
            }
        )
    ).ha
    assert ha is not None
    assert ha.snat_address == ipaddress.IPv4Address("198.18.0.12")
    assert (ha.conntrack_sync, ha.sync_port) == (False, 3781)
    assert (ha.conntrackd_config, ha.conntrackd_socket) == (
        Path("/run/lab/c.conf"),
        Path("/run/lab/c.ctl"),
    )


def test_snat_address_outside_the_listed_vpc_cidrs_names_the_key() -> None:
    doc = with_ha({"peer_address": PEER, "snat_address": "203.0.113.5"})
    doc["packet_path"] = {"mode": "nat", "vpc_cidrs": ["198.18.0.0/16"]}
    with pytest.raises(ConfigError, match=r"^ha\.snat_address: 203\.0\.113\.5 is outside "):
        parse(doc)
    doc["ha"]["snat_address"] = "198.18.0.12"
    assert parse(doc).ha is not None
