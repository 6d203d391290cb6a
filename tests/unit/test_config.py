"""The configuration file: typed values, defaults, and one-line errors that name the key.

Every invalid case goes through `gatepeer.config.load(path)` on a real file and, the same table,
through `gatepeer config check` in a subprocess. The secret lives in a key file (mode 0600 unless
the case is about the mode) and must never appear in an error or in the command's output.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.config_files import KEY_ID, SECRET, VPG_ID, soracom_section, write_config, write_key

from gatepeer import config as cfgmod
from gatepeer.config import ConfigError, load, parse

REPO = Path(__file__).resolve().parents[2]

# An underlay that exists on every Linux host, for the valid configurations.
UNDERLAY = "lo"


# ---- valid configurations --------------------------------------------------------------------


def test_full_config_parses_to_typed_values(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key")
    path = write_config(
        tmp_path,
        f"""
[soracom]
endpoint = "https://api.soracom.io/"
auth_key_id = "{KEY_ID}"
auth_key_file = "{key}"
vpg_id = "{VPG_ID}"
open_gate = true
request_timeout = "500ms"
redirection = "self"

[tunnel]
interface = "vxlan7"
underlay_interface = "{UNDERLAY}"
local_address = "198.18.0.10"
inner_address = "10.128.0.3"
mtu = 1400
source_port_range = [4789, 4790]
destination_port = 4790

[kernel]
neighbour_table_devices = 100000

[agent]
reconcile_interval = "5m"
state_file = "/run/gatepeer-test/state.json"
""",
    )
    cfg = load(path)
    assert cfg.source == path
    s = cfg.soracom
    assert s.endpoint == "https://api.soracom.io"  # trailing slash dropped
    assert s.auth_key_id == KEY_ID
    assert s.auth_key_file == key
    assert s.vpg_id == VPG_ID
    assert s.open_gate is True
    assert s.request_timeout == pytest.approx(0.5)
    assert s.read_auth_key() == SECRET  # stripped of the newline
    assert s.redirection == "self"
    t = cfg.tunnel
    assert t.interface == "vxlan7"
    assert t.underlay_interface == UNDERLAY
    assert t.local_address == ipaddress.IPv4Address("198.18.0.10")
    assert t.inner_address == ipaddress.IPv4Address("10.128.0.3")
    assert t.mtu == 1400 and isinstance(t.mtu, int)
    assert t.source_port_range == (4789, 4790)
    assert isinstance(t.source_port_range, tuple)
    assert t.destination_port == 4790
    assert cfg.kernel.neighbour_table_devices == 100_000
    assert cfg.agent.reconcile_interval == 300.0
    assert cfg.agent.state_file == Path("/run/gatepeer-test/state.json")


def test_minimal_config_takes_the_defaults(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key")
    cfg = load(write_config(tmp_path, soracom_section(key, endpoint=None)))
    assert cfg.soracom.endpoint == "https://api.soracom.io"
    assert cfg.soracom.open_gate is False
    assert cfg.soracom.request_timeout == 10.0
    assert cfg.soracom.redirection == "unmanaged"
    assert cfg.tunnel.inner_address is None
    assert cfg.tunnel.interface == "vxlan0"
    assert cfg.tunnel.underlay_interface is None
    assert cfg.tunnel.local_address is None
    assert cfg.tunnel.mtu == 1500
    assert cfg.tunnel.source_port_range == (4789, 4789)
    assert cfg.tunnel.destination_port == 4789
    assert cfg.kernel.neighbour_table_devices == 50_000
    assert cfg.agent.reconcile_interval == 30.0
    assert cfg.agent.state_file == Path("/run/gatepeer/state.json")


def test_host_services(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key")
    cfg = load(write_config(tmp_path, soracom_section(key)))
    assert cfg.packet_path.host_services == ()  # devices may open nothing on the host
    text = soracom_section(key) + '[packet_path]\nhost_services = ["udp/53", 22, "tcp/22"]\n'
    cfg = load(write_config(tmp_path, text))
    # A bare number is a TCP port; duplicates go, the order is fixed.
    assert cfg.packet_path.host_services == (("tcp", 22), ("udp", 53))


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ('"30s"', 30.0),
        ('"5m"', 300.0),
        ('"1h"', 3600.0),
        ('"1.5m"', 90.0),
        ('"2000ms"', 2.0),
        ("45", 45.0),
        ("2.5", 2.5),
    ],
)
def test_durations(tmp_path: Path, raw: str, seconds: float) -> None:
    key = write_key(tmp_path / "auth-key")
    text = soracom_section(key) + f"[agent]\nreconcile_interval = {raw}\n"
    assert load(write_config(tmp_path, text)).agent.reconcile_interval == pytest.approx(seconds)


def test_request_timeout_in_milliseconds(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key")
    text = soracom_section(key, request_timeout='"500ms"')
    assert load(write_config(tmp_path, text)).soracom.request_timeout == pytest.approx(0.5)


@pytest.mark.parametrize(("raw", "mtu"), [('"auto"', "auto"), ("1500", 1500), ("8951", 8951)])
def test_mtu_int_or_auto(tmp_path: Path, raw: str, mtu: int | str) -> None:
    key = write_key(tmp_path / "auth-key")
    text = soracom_section(key) + f"[tunnel]\nmtu = {raw}\n"
    assert load(write_config(tmp_path, text)).tunnel.mtu == mtu


def test_masked_holds_no_secret(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key")
    cfg = load(write_config(tmp_path, soracom_section(key)))
    masked = cfg.masked()
    assert masked["soracom"]["auth_key_file"] == str(key)
    assert masked["tunnel"]["source_port_range"] == [4789, 4789]
    assert masked["tunnel"]["underlay_interface"] == "(default)"
    assert SECRET not in repr(masked)
    assert SECRET not in repr(cfg)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cfgmod.ENV_VAR, raising=False)
    assert cfgmod.config_path(None) == Path("/etc/gatepeer/gatepeer.toml")
    monkeypatch.setenv(cfgmod.ENV_VAR, "/srv/env.toml")
    assert cfgmod.config_path(None) == Path("/srv/env.toml")
    assert cfgmod.config_path("/srv/cli.toml") == Path("/srv/cli.toml")


def test_missing_config_file_names_the_path_and_the_env_var(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:")
    assert "GATEPEER_CONFIG" in msg
    assert "\n" not in msg


# ---- invalid configurations: the table -------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One invalid configuration: the file's text (from the key path) and the expected prefix.

    `key_mode` None means no key file is written at all; `key_dir` makes it a directory.
    """

    id: str
    text: Callable[[Path], str]
    prefix: str
    key_mode: int | None = 0o600
    key_dir: bool = False


def _with(section: str, body: str) -> Callable[[Path], str]:
    return lambda key: soracom_section(key) + f"[{section}]\n{body}\n"


def _soracom(**changes: str | None) -> Callable[[Path], str]:
    return lambda key: soracom_section(key, **changes)


PATH_PREFIX = "<config path>"  # stands for the config file's own path

BAD_CONFIGS = [
    Bad("missing-vpg-id", _soracom(vpg_id=None), "soracom.vpg_id:"),
    Bad("http-to-the-internet", _soracom(endpoint='"http://api.soracom.io"'), "soracom.endpoint:"),
    Bad(
        "allowed-destination-bool",
        _with("packet_path", "allowed_destinations = [true]"),
        "packet_path.allowed_destinations:",
    ),
    Bad(
        "host-service-unknown-protocol",
        _with("packet_path", 'host_services = ["sctp/22"]'),
        "packet_path.host_services:",
    ),
    Bad(
        "host-service-port-zero",
        _with("packet_path", 'host_services = ["udp/0"]'),
        "packet_path.host_services:",
    ),
    Bad(
        "host-services-not-a-list",
        _with("packet_path", 'host_services = "tcp/22"'),
        "packet_path.host_services:",
    ),
    Bad(
        "conntrack-too-large",
        lambda key: (
            soracom_section(key)
            + "[kernel]\nneighbour_table_devices = 4000000\n"
            + "[packet_path]\nflows_per_device = 1024\n"
        ),
        "packet_path.flows_per_device:",
    ),
    Bad("empty-vpg-id", _soracom(vpg_id='""'), "soracom.vpg_id:"),
    Bad("unknown-redirection", _soracom(redirection='"peer"'), "soracom.redirection:"),
    Bad("redirection-bool", _soracom(redirection="true"), "soracom.redirection:"),
    Bad("inner-address-junk", _with("tunnel", 'inner_address = "10.1.2"'), "tunnel.inner_address:"),
    Bad("inner-address-int", _with("tunnel", "inner_address = 167772163"), "tunnel.inner_address:"),
    Bad(
        "inner-address-multicast",
        _with("tunnel", 'inner_address = "224.0.0.5"'),
        "tunnel.inner_address:",
    ),
    Bad("bad-vpg-id", _soracom(vpg_id='"vpg/../x"'), "soracom.vpg_id:"),
    Bad("missing-auth-key-id", _soracom(auth_key_id=None), "soracom.auth_key_id:"),
    Bad("inline-auth-key", _soracom(auth_key=f'"{SECRET}"'), "soracom.auth_key:"),
    Bad("unknown-key", _soracom(region='"jp"'), "soracom.region:"),
    Bad("misspelt-key", _with("tunnel", "mut = 1400"), "tunnel.mut:"),
    Bad("misspelt-section", _with("tunel", "mtu = 1400"), "tunel:"),
    Bad("unknown-section", _with("bogus", "port = 9"), "bogus:"),
    Bad("section-not-a-table", lambda key: "tunnel = 5\n" + soracom_section(key), "tunnel:"),
    Bad("mtu-too-big", _with("tunnel", "mtu = 70000"), "tunnel.mtu:"),
    Bad("mtu-too-small", _with("tunnel", "mtu = 100"), "tunnel.mtu:"),
    Bad("mtu-word", _with("tunnel", 'mtu = "big"'), "tunnel.mtu:"),
    Bad("mtu-bool", _with("tunnel", "mtu = true"), "tunnel.mtu:"),
    Bad("mtu-float", _with("tunnel", "mtu = 1500.0"), "tunnel.mtu:"),
    Bad(
        "interval-word", _with("agent", 'reconcile_interval = "soon"'), "agent.reconcile_interval:"
    ),
    Bad("interval-zero", _with("agent", 'reconcile_interval = "0s"'), "agent.reconcile_interval:"),
    Bad(
        "interval-negative", _with("agent", "reconcile_interval = -5"), "agent.reconcile_interval:"
    ),
    Bad("interval-bool", _with("agent", "reconcile_interval = true"), "agent.reconcile_interval:"),
    Bad(
        "interval-unit",
        _with("agent", 'reconcile_interval = "30 days"'),
        "agent.reconcile_interval:",
    ),
    Bad("timeout-zero", _soracom(request_timeout='"0ms"'), "soracom.request_timeout:"),
    Bad("open-gate-word", _soracom(open_gate='"yes"'), "soracom.open_gate:"),
    Bad("key-file-missing", _soracom(), "soracom.auth_key_file:", key_mode=None),
    Bad("key-file-0644", _soracom(), "soracom.auth_key_file:", key_mode=0o644),
    Bad("key-file-0640", _soracom(), "soracom.auth_key_file:", key_mode=0o640),
    Bad("key-file-0604", _soracom(), "soracom.auth_key_file:", key_mode=0o604),
    Bad("key-file-directory", _soracom(), "soracom.auth_key_file:", key_dir=True),
    Bad("key-file-relative", _soracom(auth_key_file='"auth-key"'), "soracom.auth_key_file:"),
    Bad(
        "unknown-underlay",
        _with("tunnel", 'underlay_interface = "nosuchif0"'),
        "tunnel.underlay_interface:",
    ),
    Bad(
        "underlay-is-interface",
        _with("tunnel", 'interface = "vx0"\nunderlay_interface = "vx0"'),
        "tunnel.underlay_interface:",
    ),
    Bad(
        "local-address-junk",
        _with("tunnel", 'local_address = "10.0.0.256"'),
        "tunnel.local_address:",
    ),
    Bad(
        "local-address-cidr",
        _with("tunnel", 'local_address = "10.0.0.1/24"'),
        "tunnel.local_address:",
    ),
    Bad(
        "local-address-ipv6",
        _with("tunnel", 'local_address = "2001:db8::1"'),
        "tunnel.local_address:",
    ),
    Bad(
        "local-address-multicast",
        _with("tunnel", 'local_address = "224.0.0.1"'),
        "tunnel.local_address:",
    ),
    Bad(
        "local-address-zero", _with("tunnel", 'local_address = "0.0.0.0"'), "tunnel.local_address:"
    ),
    Bad(
        "ports-reversed",
        _with("tunnel", "source_port_range = [5000, 4000]"),
        "tunnel.source_port_range:",
    ),
    Bad("ports-one", _with("tunnel", "source_port_range = [1]"), "tunnel.source_port_range:"),
    Bad(
        "ports-words",
        _with("tunnel", 'source_port_range = ["a", "b"]'),
        "tunnel.source_port_range:",
    ),
    Bad("ports-zero", _with("tunnel", "source_port_range = [0, 10]"), "tunnel.source_port_range:"),
    Bad(
        "ports-string",
        _with("tunnel", 'source_port_range = "4789-4789"'),
        "tunnel.source_port_range:",
    ),
    Bad("dstport-zero", _with("tunnel", "destination_port = 0"), "tunnel.destination_port:"),
    Bad("endpoint-ftp", _soracom(endpoint='"ftp://api.soracom.io"'), "soracom.endpoint:"),
    Bad("endpoint-words", _soracom(endpoint='"not a url"'), "soracom.endpoint:"),
    Bad("endpoint-no-host", _soracom(endpoint='"https://"'), "soracom.endpoint:"),
    Bad("endpoint-number", _soracom(endpoint="443"), "soracom.endpoint:"),
    Bad("state-file-relative", _with("agent", 'state_file = "state.json"'), "agent.state_file:"),
    Bad(
        "interface-too-long",
        _with("tunnel", 'interface = "vxlan0123456789ab"'),
        "tunnel.interface:",
    ),
    Bad("interface-slash", _with("tunnel", 'interface = "vx/0"'), "tunnel.interface:"),
    Bad(
        "outside-vpc-unknown",
        _with("packet_path", 'outside_vpc = "nat"'),
        "packet_path.outside_vpc:",
    ),
    Bad(
        "outside-vpc-in-nat-mode",
        _with("packet_path", 'mode = "nat"\noutside_vpc = "route"'),
        "packet_path.outside_vpc:",
    ),
    Bad(
        "vpc-cidrs-host-bits",
        _with("packet_path", 'vpc_cidrs = ["198.18.0.1/16"]'),
        "packet_path.vpc_cidrs:",
    ),
    Bad(
        "vpc-cidrs-not-a-list",
        _with("packet_path", 'vpc_cidrs = "198.18.0.0/16"'),
        "packet_path.vpc_cidrs:",
    ),
    Bad(
        "placeholder-key-id",
        _soracom(auth_key_id='"keyId-REPLACE-WITH-YOUR-AUTH-KEY-ID"'),
        "soracom.auth_key_id:",
    ),
    Bad("placeholder-vpg-id", _soracom(vpg_id='"REPLACE-WITH-YOUR-VPG-ID"'), "soracom.vpg_id:"),
    Bad(
        "neighbours-too-few",
        _with("kernel", "neighbour_table_devices = 10"),
        "kernel.neighbour_table_devices:",
    ),
    Bad("not-toml", lambda key: "this is not toml at all {\n", PATH_PREFIX),
    Bad("not-utf8", lambda key: "\udcff", PATH_PREFIX),
    Bad("duplicate-key", lambda key: soracom_section(key) + f'vpg_id = "{VPG_ID}"\n', PATH_PREFIX),
]


def materialise(tmp_path: Path, case: Bad) -> tuple[Path, str]:
    """Write the key file (as the case says) and the config; (config path, expected prefix)."""
    key = tmp_path / "auth-key"
    if case.key_dir:
        key.mkdir()
    elif case.key_mode is not None:
        write_key(key, case.key_mode)
    path = tmp_path / "gatepeer.toml"
    path.write_bytes(case.text(key).encode("utf-8", "surrogateescape"))
    prefix = f"{path}:" if case.prefix == PATH_PREFIX else case.prefix
    return path, prefix


def assert_good_message(msg: str, prefix: str) -> None:
    assert msg.startswith(prefix), msg
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg == msg.strip() and len(msg) > len(prefix) + 3, msg
    assert SECRET not in msg


def test_table_is_large_enough() -> None:
    assert len(BAD_CONFIGS) >= 20
    assert len({c.id for c in BAD_CONFIGS}) == len(BAD_CONFIGS)


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c.id for c in BAD_CONFIGS])
def test_invalid_config_is_one_line_naming_the_key(tmp_path: Path, case: Bad) -> None:
    path, prefix = materialise(tmp_path, case)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert_good_message(str(info.value), prefix)


def test_outside_vpc_and_vpc_cidrs(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key")
    default = load(write_config(tmp_path, soracom_section(key))).packet_path
    assert (default.outside_vpc, default.vpc_cidrs) == ("masquerade", ())
    text = soracom_section(key) + (
        '[packet_path]\noutside_vpc = "route"\nvpc_cidrs = ["198.18.0.0/16", "192.0.2.0/24"]\n'
    )
    pp = load(write_config(tmp_path, text)).packet_path
    assert pp.outside_vpc == "route"
    assert pp.vpc_cidrs == (
        ipaddress.IPv4Network("198.18.0.0/16"),
        ipaddress.IPv4Network("192.0.2.0/24"),
    )


def test_every_error_is_shown_one_line_each(tmp_path: Path) -> None:
    """Not only the first: each refused key is reported, and the keys after it still checked."""
    key = write_key(tmp_path / "auth-key")
    text = (
        soracom_section(
            key,
            auth_key_id='"keyId-REPLACE-WITH-YOUR-AUTH-KEY-ID"',
            vpg_id='"REPLACE-WITH-YOUR-VPG-ID"',
        )
        + "[tunnel]\nmtu = 99999\ndestination_port = 0\n"
        + '[packet_path]\nmode = "bridge"\nvpc_cidrs = ["nope"]\nflows_per_device = 0\n'
    )
    with pytest.raises(ConfigError) as info:
        load(write_config(tmp_path, text))
    lines = info.value.lines
    assert [line.split(":", 1)[0] for line in lines] == [
        "soracom.auth_key_id",
        "soracom.vpg_id",
        "tunnel.mtu",
        "tunnel.destination_port",
        "packet_path.mode",
        "packet_path.vpc_cidrs",
        "packet_path.flows_per_device",
    ]
    for line in lines:
        assert_good_message(line, line.split(":", 1)[0] + ":")
    assert "placeholder" in lines[0] and "placeholder" in lines[1]


def test_cli_shows_every_error(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key")
    path = write_config(
        tmp_path,
        soracom_section(key, vpg_id='"REPLACE-WITH-YOUR-VPG-ID"') + "[tunnel]\nmtu = 1\n",
    )
    result = run_cli("config", "check", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "gatepeer: config error: soracom.vpg_id: 'REPLACE-WITH-YOUR-VPG-ID' is the example's "
        "placeholder; put your own value here",
        "gatepeer: config error: tunnel.mtu: must be between 576 and 8951, got 1",
    ]
    assert SECRET not in result.stdout + result.stderr


def test_host_checks_report_both_problems(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key", 0o644)
    text = soracom_section(key) + '[tunnel]\nunderlay_interface = "nosuchif9"\n'
    with pytest.raises(ConfigError) as info:
        load(write_config(tmp_path, text))
    assert [line.split(":", 1)[0] for line in info.value.lines] == [
        "soracom.auth_key_file",
        "tunnel.underlay_interface",
    ]


def test_bad_mode_message_says_how_to_fix(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key", 0o644)
    with pytest.raises(ConfigError, match=r"mode 0644 .*chmod 0600"):
        load(write_config(tmp_path, soracom_section(key)))


def test_check_system_false_skips_the_host_checks(tmp_path: Path) -> None:
    key = tmp_path / "absent"
    text = soracom_section(key) + '[tunnel]\nunderlay_interface = "nosuchif0"\n'
    cfg = load(write_config(tmp_path, text), check_system=False)
    assert cfg.tunnel.underlay_interface == "nosuchif0"


# Values the loader accepts but should not: each is a bug in gatepeer/config.py.
ACCEPTED_BUT_INVALID = [
    pytest.param(
        "tunnel",
        "local_address = true",
        "tunnel.local_address:",
        id="local-address-bool",
    ),
    pytest.param(
        "tunnel",
        "local_address = 3232235777",
        "tunnel.local_address:",
        id="local-address-int",
    ),
    pytest.param(
        "tunnel",
        'local_address = "255.255.255.255"',
        "tunnel.local_address:",
        id="local-address-broadcast",
    ),
    pytest.param(
        "tunnel",
        'interface = ".."',
        "tunnel.interface:",
        id="interface-dotdot",
    ),
    pytest.param(
        "tunnel",
        'interface = "vxlan0\\n"',
        "tunnel.interface:",
        id="interface-trailing-newline",
    ),
    pytest.param(
        "tunnel",
        'underlay_interface = "eth0\\n"',
        "tunnel.underlay_interface:",
        id="underlay-trailing-newline",
    ),
    *(
        pytest.param("tunnel", f'{key} = "{name}"', f"tunnel.{key}:", id=f"{key}-{name}")
        for key, name in (
            # /proc/sys/net/ipv4/conf/{all,default} are not interfaces; lo is the loopback.
            ("interface", "all"),
            ("interface", "default"),
            ("interface", "lo"),
            ("underlay_interface", "all"),
            ("underlay_interface", "default"),
        )
    ),
    pytest.param(
        "soracom",
        'vpg_id = "vpg-1\\n"',
        "soracom.vpg_id:",
        id="vpg-id-trailing-newline",
    ),
    pytest.param(
        "soracom",
        'endpoint = "https://api.soracom.io\\n"',
        "soracom.endpoint:",
        id="endpoint-newline",
    ),
    pytest.param(
        "soracom",
        'endpoint = "http://api.soracom.io:99999"',
        "soracom.endpoint:",
        id="endpoint-port-out-of-range",
    ),
]


@pytest.mark.parametrize(("section", "body", "prefix"), ACCEPTED_BUT_INVALID)
def test_invalid_values_the_loader_accepts(
    tmp_path: Path, section: str, body: str, prefix: str
) -> None:
    key = write_key(tmp_path / "auth-key")
    if section == "soracom":
        name = body.split("=", 1)[0].strip()
        text = soracom_section(key, **{name: None}) + body + "\n"
    else:
        text = soracom_section(key) + f"[{section}]\n{body}\n"
    with pytest.raises(ConfigError) as info:
        load(write_config(tmp_path, text))
    assert_good_message(str(info.value), prefix)


def test_parse_is_pure_and_names_unknown_sections() -> None:
    with pytest.raises(ConfigError, match=r"^tunel: unknown section"):
        parse({"tunel": {}})


# ---- the same table through `gatepeer config check` ------------------------------------------


def run_cli(*args: str, env_config: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != cfgmod.ENV_VAR}
    if env_config is not None:
        env[cfgmod.ENV_VAR] = env_config
    return subprocess.run(
        [sys.executable, "-m", "gatepeer", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def assert_cli_refused(result: subprocess.CompletedProcess[str], prefix: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gatepeer: "), lines[0]
    # The key comes first, after the program name and an optional "config error: ".
    rest = lines[0].removeprefix("gatepeer: ").removeprefix("config error: ")
    assert rest.startswith(prefix), lines[0]
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c.id for c in BAD_CONFIGS])
def test_cli_config_check_refuses(tmp_path: Path, case: Bad) -> None:
    path, prefix = materialise(tmp_path, case)
    assert_cli_refused(run_cli("config", "check", "--config", str(path)), prefix)


def test_cli_config_check_accepts_and_masks(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key")
    path = write_config(tmp_path, soracom_section(key) + "[tunnel]\nmtu = 1400\n")
    result = run_cli("config", "check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert VPG_ID in result.stdout
    assert KEY_ID in result.stdout
    assert str(key) in result.stdout
    assert "1400" in result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_cli_config_check_json(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key")
    path = write_config(tmp_path, soracom_section(key) + '[tunnel]\nmtu = "auto"\n')
    result = run_cli("config", "check", "--json", "--config", str(path))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["soracom"]["vpg_id"] == VPG_ID
    assert effective["soracom"]["auth_key_file"] == str(key)
    assert effective["tunnel"]["mtu"] == "auto"
    assert effective["tunnel"]["source_port_range"] == [4789, 4789]
    assert effective["agent"]["reconcile_interval"] == 30.0
    assert SECRET not in result.stdout + result.stderr


def test_cli_config_check_honours_env_var(tmp_path: Path) -> None:
    key = write_key(tmp_path / "auth-key")
    good = write_config(tmp_path, soracom_section(key))
    result = run_cli("config", "check", env_config=str(good))
    assert result.returncode == 0, result.stderr
    assert VPG_ID in result.stdout
    assert SECRET not in result.stdout + result.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text(soracom_section(key) + "[tunnel]\nmtu = 70000\n")
    assert_cli_refused(run_cli("config", "check", env_config=str(bad)), "tunnel.mtu:")
    # --config wins over the environment variable.
    result = run_cli("config", "check", "--config", str(good), env_config=str(bad))
    assert result.returncode == 0, result.stderr


def test_cli_config_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert_cli_refused(run_cli("config", "check", "--config", str(path)), f"{path}:")
