"""The configuration file: a TOML schema as frozen dataclasses, loaded and validated.

Every problem is reported as one `ConfigError` whose message names the key (`section.key`) and
what is wrong with its value, so that `gatepeer` can print one line and exit 2. Nothing here
touches the kernel; the only system reads are the secret file's metadata and interface names.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

T = TypeVar("T")
DEFAULT_PATH = Path("/etc/gatepeer/gatepeer.toml")
ENV_VAR = "GATEPEER_CONFIG"

# VXLAN over IPv4 adds 50 bytes; EC2 ENIs carry 9001, so 8951 is the largest useful inner MTU.
VXLAN_OVERHEAD = 50
MTU_MIN, MTU_MAX = 576, 9001 - VXLAN_OVERHEAD
MAX_TRACKED_FLOWS = 16_000_000
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # always fullmatch: `$` accepts a final newline
# Names gatepeer must not take: `all` and `default` are /proc/sys/net/ipv4/conf's own entries (a
# sysctl written there applies to every interface); `lo` cannot be the tunnel. (A loopback
# underlay is merely useless, and the tests use it as the one interface every host has.)
RESERVED_IFNAMES = ("all", "default", ".", "..")
RESERVED_TUNNEL_NAMES = (*RESERVED_IFNAMES, "lo")


class ConfigError(ValueError):
    """A configuration problem; the message is one line that names the key.

    `ConfigErrors` is one that holds several: its message is one such line per problem."""

    @property
    def lines(self) -> tuple[str, ...]:
        return (str(self),)


class ConfigErrors(ConfigError):
    """Every problem found in one file, in file order; each line names its key."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(str(e) for e in self.errors)


# The examples' stand-ins (keyId-REPLACE-..., REPLACE-WITH-YOUR-VPG-ID, rtb-REPLACE): a value
# holding REPLACE as a word was copied without being filled in.
_PLACEHOLDER_RE = re.compile(r"(^|[-_/.:])REPLACE([-_/.:]|$)")


RedirectionMode = Literal["unmanaged", "self"]


@dataclass(frozen=True)
class SoracomConfig:
    endpoint: str = "https://api.soracom.io"
    auth_key_id: str = ""
    # Exactly one source for the secret: a file (the default) or an SSM SecureString.
    auth_key_file: Path | None = Path("/etc/gatepeer/auth-key")
    auth_key_ssm_parameter: str | None = None
    vpg_id: str = ""
    open_gate: bool = False
    request_timeout: float = 10.0
    # "self": keep the VPG's Junction redirection gateway on this peer; "unmanaged": leave it.
    redirection: RedirectionMode = "unmanaged"

    def read_auth_key(self) -> str:
        """The secret itself; read only when authenticating, never kept in the config value.
        An SSM parameter is read by `gatepeer.aws.ssm.auth_key_reader` (boto3 lives there)."""
        if self.auth_key_file is None:
            raise ConfigError(
                "soracom.auth_key_ssm_parameter: the key comes from SSM; "
                "read it with gatepeer.aws.ssm.auth_key_reader"
            )
        return self.auth_key_file.read_text().strip()


@dataclass(frozen=True)
class TunnelConfig:
    interface: str = "vxlan0"
    underlay_interface: str | None = None  # None: the interface of the default route
    local_address: ipaddress.IPv4Address | None = None  # None: the underlay's primary address
    # Asked for at registration, so a replacement instance keeps the same inner address.
    inner_address: ipaddress.IPv4Address | None = None
    mtu: int | Literal["auto"] = 1500
    source_port_range: tuple[int, int] = (4789, 4789)
    destination_port: int = 4789


@dataclass(frozen=True)
class KernelConfig:
    # Sized so the neighbour table never overflows with this many devices talking at once.
    neighbour_table_devices: int = 50_000


PacketPathMode = Literal["route", "nat"]
HostService = tuple[Literal["tcp", "udp"], int]
# Route mode: what happens to device traffic whose destination is outside the VPC.
OutsideVpc = Literal["masquerade", "route"]


@dataclass(frozen=True)
class PacketPathConfig:
    mode: PacketPathMode = "route"
    # Destinations devices may reach through this peer; empty allows every destination.
    allowed_destinations: tuple[ipaddress.IPv4Network, ...] = ()
    # The list's AWS names (pl-..., com.amazonaws.<region>.<service>, vpce-...), resolved
    # through EC2 by gatepeer.aws.destinations, every destinations_refresh seconds, the last
    # good set kept in destinations_cache (None: not kept). Not a key of its own: the file
    # writes them in allowed_destinations.
    allowed_names: tuple[str, ...] = field(
        default=(), metadata={"from_key": "allowed_destinations"}
    )
    destinations_refresh: float = 300.0
    destinations_cache: Path | None = Path("/var/lib/gatepeer/destinations.json")
    # Device traffic to anything outside the allowed destinations and the VPC is dropped and
    # counted (closed_dropped).
    closed: bool = False
    # "auto": use the nftables flowtable fast path when the kernel offers one.
    flowtable: bool | Literal["auto"] = "auto"
    # nat mode: conntrack sized for neighbour_table_devices devices with this many flows each.
    flows_per_device: int = 8
    # Ports on this host that devices may open from the tunnel ("tcp", 22); empty: none.
    host_services: tuple[HostService, ...] = ()
    # Route mode: "masquerade" sends device traffic to destinations outside the VPC out with
    # this peer's address (a NAT or internet gateway then needs no route back to the devices);
    # "route" keeps the devices' addresses everywhere.
    outside_vpc: OutsideVpc = "masquerade"
    # What "inside the VPC" means; empty: learned (IMDS's VPC CIDRs, else the underlay's prefix).
    vpc_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    # Per-device packets and bytes each way, counted in the kernel (dynamic nftables sets).
    device_counters: bool = False


# Outside 9100-9999 (allocated to other exporters).
DEFAULT_METRICS_PORT = 8479


@dataclass(frozen=True)
class MetricsConfig:
    # None: the instance's private (local) address on DEFAULT_METRICS_PORT; "" turns it off.
    listen: str | None = None


@dataclass(frozen=True)
class FlowLogConfig:
    # Connection events (new; destroyed, with bytes) as JSON lines; route mode then tracks
    # device flows in conntrack (packet_path track_flows), which costs (docs/devices.md).
    enabled: bool = False
    # None: the unit's stdout (the journal); else a file, rotated at file_max_bytes.
    file: Path | None = None
    file_max_bytes: int = 50_000_000
    file_backups: int = 5
    # Records written per second at most (a burst of as many); the rest are counted, not written.
    rate_per_second: int = 200


@dataclass(frozen=True)
class ProbesConfig:
    interval: float = 5.0
    timeout: float = 1.0


@dataclass(frozen=True)
class AgentConfig:
    reconcile_interval: float = 30.0
    state_file: Path = Path("/run/gatepeer/state.json")
    # The last gate view the API gave, kept across reboots (state_file lives on tmpfs) so the
    # tunnel comes up at boot even while the API is unreachable; None turns it off.
    gate_cache: Path | None = Path("/var/lib/gatepeer/gate.json")


# The SIM map's default cadence: slow, since SIM names and static addresses change rarely and
# each refresh pages through every SIM of the operator (one call per 100 SIMs).
DEFAULT_SIM_REFRESH_S = 900
MIN_SIM_REFRESH_S = 60


@dataclass(frozen=True)
class DevicesConfig:
    """The SIM map behind `gatepeer devices` (gatepeer/sims.py)."""

    # Seconds between refreshes of the SIM map from the API (at start, then this often); 0 off.
    sim_refresh_seconds: int = DEFAULT_SIM_REFRESH_S
    # Where the map is kept; None: sims.json beside agent.gate_cache (on disk, like the gate
    # view), or beside agent.state_file when the gate cache is off (gatepeer.sims.cache_path).
    sim_cache: Path | None = None
    # Devices with metrics series of their own (the most traffic); every device counts in its
    # SIM group's (gatepeer/metrics/devices.py).
    metrics_top_n: int = 10


# [ha]: a pair of gate peers; keepalived elects the master (see gatepeer/ha/).
HA_NOTIFY_FIFO = Path("/run/gatepeer/keepalived.fifo")
# VRRPv3 counts the advert interval in centiseconds, in 12 bits (RFC 5798 5.2.7).
HA_ADVERT_MIN, HA_ADVERT_MAX = 0.01, 40.95
# conntrackd (conntrack-tools): its config file and control socket, and the UDP port of its sync
# messages (the port conntrack-tools' examples use).
HA_CONNTRACKD_CONFIG = Path("/etc/conntrackd/conntrackd.conf")
HA_CONNTRACKD_SOCKET = Path("/run/conntrackd.ctl")
HA_SYNC_PORT = 3780
ROUTE_TABLE_RE = re.compile(r"^rtb-[0-9a-f]{8}([0-9a-f]{9})?$")


@dataclass(frozen=True)
class HaConfig:
    """Two peers, one master. On MASTER this peer claims the gateway: Junction redirection
    through the API always; with `virtual_address`, a virtual inner address keepalived moves;
    with `route_tables`, those VPC route tables pointed at this instance (ReplaceRoute)."""

    peer_address: ipaddress.IPv4Address  # the other peer's VPC address (unicast VRRP)
    # A backup declares the master dead after 3 adverts plus a skew of (256 - priority)/256
    # adverts: 254 makes the skew 0.008 advert where 100 made it 0.61 (0.6 s at 1 s adverts,
    # enough to miss TCP's retransmission 3 s after a loss). nopreempt decides who stays master.
    priority: int = 254
    advert_interval: float = 1.0
    virtual_router_id: int = 51  # the same on both peers, unique in the VPC subnet
    nopreempt: bool = True  # a returning peer does not cause a second failover
    interface: str | None = None  # VRRP's interface; None: the tunnel's underlay
    virtual_address: ipaddress.IPv4Address | None = None  # vip mode; owned by keepalived
    route_tables: tuple[str, ...] = ()  # route mode: rtb-... ids pointed at this instance
    # The health check keepalived runs (`gatepeer check`); keepalived counts in whole seconds.
    check_interval: int = 1
    # A check is a Python process; on a busy host one took over 1 s and keepalived counted the
    # timeout as a failure: the master went FAULT, or a backup was in FAULT when the master
    # died (a 12 s takeover). A check that fails still fails at once; only a slow one waits.
    # Longer than the interval is sound: keepalived skips a run while the last one still runs.
    check_timeout: int = 3
    check_fall: int = 2  # failures in a row before the peer hands the role over
    check_rise: int = 2  # successes in a row before it may take the role
    notify_fifo: Path = HA_NOTIFY_FIFO
    # The address nat mode masquerades to, in the peers' VPC subnet; only the master holds it
    # (the daemon takes it after conntrackd's commit, gatepeer/ha/handover.py; on EC2 the claim
    # also moves it to this ENI as a secondary private address). None: each peer masquerades
    # to its own address, and connections do not survive a failover.
    snat_address: ipaddress.IPv4Address | None = None
    # conntrackd (FTFW, unicast between the two VPC addresses) keeps the backup's copy of the
    # master's connections; keepalived's transitions commit it on the new master.
    conntrack_sync: bool = True
    sync_port: int = HA_SYNC_PORT
    conntrackd_config: Path = HA_CONNTRACKD_CONFIG
    conntrackd_socket: Path = HA_CONNTRACKD_SOCKET


# The instance metadata service; contacted only when DMI says this host is an EC2 instance.
DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
# botocore's own variable for it; honoured when aws.imds_endpoint is not in the file.
IMDS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
IMDS_ENDPOINT_RE = re.compile(r"http://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\])(:\d{1,5})?")


@dataclass(frozen=True)
class AwsConfig:
    """EC2 and Auto Scaling integration (the gatepeer[aws] extra); each part has its own flag."""

    # On EC2, take the underlay (the primary ENI) and local address from IMDSv2 when
    # tunnel.underlay_interface or tunnel.local_address is not set.
    instance_facts: bool = True
    # None: not in the file; $AWS_EC2_METADATA_SERVICE_ENDPOINT, else DEFAULT_IMDS_ENDPOINT
    # (resolved where IMDS is asked: gatepeer.aws.imds.endpoint).
    imds_endpoint: str | None = None
    imds_timeout: float = 1.0
    region: str | None = None  # None: the instance's region, from IMDS
    disable_source_dest_check: bool = False
    autoscaling_group: str | None = None
    # Completed with CONTINUE after the first healthy reconcile, ABANDON past the deadline.
    launch_lifecycle_hook: str | None = None
    lifecycle_deadline: float = 600.0
    # On scale-in: unregister from SORACOM, then CONTINUE.
    termination_lifecycle_hook: str | None = None
    # A single peer in route mode: at every reconcile the device subnet's route in these VPC
    # route tables points at this instance's ENI (an Auto Scaling replacement takes it over).
    route_tables: tuple[str, ...] = ()
    # Unregister gate peers of this VPG whose VPC address no network interface holds any more
    # (an instance that was replaced), at start and after each registration.
    remove_stale_registrations: bool = False

    @property
    def any_api_feature(self) -> bool:
        """True when some flag needs the AWS API (and so boto3), not only IMDS."""
        return bool(
            self.disable_source_dest_check
            or self.launch_lifecycle_hook
            or self.termination_lifecycle_hook
            or self.route_tables
            or self.remove_stale_registrations
        )


@dataclass(frozen=True)
class Config:
    soracom: SoracomConfig = field(default_factory=SoracomConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    packet_path: PacketPathConfig = field(default_factory=PacketPathConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    flow_log: FlowLogConfig = field(default_factory=FlowLogConfig)
    ha: HaConfig | None = None  # None: a single peer, no keepalived
    aws: AwsConfig = field(default_factory=AwsConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    source: Path | None = None

    def masked(self) -> dict[str, dict[str, Any]]:
        """The effective configuration as plain values; holds no secret (only the key's path)."""
        out: dict[str, dict[str, Any]] = {}
        sections: dict[str, Any] = {
            "soracom": self.soracom,
            "tunnel": self.tunnel,
            "kernel": self.kernel,
            "agent": self.agent,
            "packet_path": self.packet_path,
            "metrics": self.metrics,
            "probes": self.probes,
            "flow_log": self.flow_log,
            "aws": self.aws,
            "devices": self.devices,
        }
        if self.ha is not None:
            sections["ha"] = self.ha
        for name, section in sections.items():
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in fields(section)}
        if self.soracom.auth_key_file is None:
            out["soracom"]["auth_key_file"] = "(unused: the key comes from SSM)"
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Path | ipaddress.IPv4Address):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, ipaddress.IPv4Network):
        return str(value)
    if value is None:
        return "(default)"
    return value


def config_path(cli_value: str | None) -> Path:
    """--config wins over GATEPEER_CONFIG, which wins over the default path."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def load(path: Path, *, check_system: bool = True) -> Config:
    """Read and validate the file. `check_system` also checks the key file and interfaces."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (set --config or {ENV_VAR})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = parse(data)
    cfg = replace(cfg, source=path)
    if check_system:
        check_against_system(cfg)
    return cfg


_SECTIONS = (
    "soracom",
    "tunnel",
    "kernel",
    "agent",
    "packet_path",
    "metrics",
    "probes",
    "flow_log",
    "aws",
    "ha",
    "devices",
)


def parse(data: Mapping[str, Any]) -> Config:
    """Validate a decoded TOML document. Pure: looks at nothing outside `data`.

    Every problem is reported, not only the first: each section is parsed again without a key
    that was refused (so its default stands in and the next key gets checked) until it passes,
    or the problem is a key that is missing."""
    errors: list[ConfigError] = []
    for name, value in data.items():
        if name not in _SECTIONS:
            errors.append(ConfigError(f"{name}: unknown section (known: {', '.join(_SECTIONS)})"))
        elif not isinstance(value, dict):
            errors.append(ConfigError(f"{name}: must be a table ([{name}])"))
    tables = {n: v for n, v in data.items() if n in _SECTIONS and isinstance(v, dict)}

    def section(name: str, parser: Callable[[_Section], T]) -> T | None:
        return _parse_section(name, tables.get(name, {}), parser, errors)

    soracom = section("soracom", _parse_soracom)
    tunnel = section("tunnel", _parse_tunnel)
    kernel = section("kernel", _parse_kernel)
    agent = section("agent", _parse_agent)
    packet_path = section("packet_path", _parse_packet_path)
    metrics = section("metrics", _parse_metrics)
    probes = section("probes", _parse_probes)
    flow_log = section("flow_log", _parse_flow_log)
    ha = (
        section("ha", lambda s: _parse_ha(s, tunnel or TunnelConfig(), packet_path))
        if "ha" in tables
        else None
    )
    aws = section("aws", lambda s: _parse_aws(s, packet_path or PacketPathConfig(), ha))
    devices = section("devices", _parse_devices)
    if kernel is not None and packet_path is not None:
        # conntrack is sized for devices x flows; past this the kernel refuses the table size
        # (it must fit a signed int, and each entry costs ~256 bytes of memory).
        flows = kernel.neighbour_table_devices * packet_path.flows_per_device
        if flows > MAX_TRACKED_FLOWS:
            errors.append(
                ConfigError(
                    f"packet_path.flows_per_device: {packet_path.flows_per_device} flows for "
                    f"{kernel.neighbour_table_devices} devices is {flows:,} connections; at "
                    f"most {MAX_TRACKED_FLOWS:,} can be tracked"
                )
            )
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
    # No error: every section parsed (only a refused key stops one, and it is reported).
    assert soracom and tunnel and kernel and agent and packet_path and metrics and probes and aws
    assert devices and flow_log
    return Config(
        soracom=soracom,
        tunnel=tunnel,
        kernel=kernel,
        agent=agent,
        packet_path=packet_path,
        metrics=metrics,
        probes=probes,
        flow_log=flow_log,
        ha=ha,
        aws=aws,
        devices=devices,
    )


def _parse_section(
    name: str, table: Mapping[str, Any], parser: Callable[[_Section], T], errors: list[ConfigError]
) -> T | None:
    """`parser` over one table, collecting every problem into `errors`; the parsed value
    (defaults standing in for refused keys), or None when a missing key stopped it."""
    table = dict(table)
    refused: set[str] = set()
    for key, value in table.items():
        if _placeholder(value):
            errors.append(
                ConfigError(
                    f"{name}.{key}: {_show(value)} is the example's placeholder; put your own "
                    "value here"
                )
            )
            refused.add(key)
    while True:
        try:
            return parser(_Section(name, table))
        except ConfigError as exc:
            named = _named_key(name, str(exc))
            if named is None or named not in refused:
                errors.append(exc)
            if named is None or named not in table:
                return None  # missing, or not one key's fault: nothing left to strip
            refused.add(named)
            del table[named]


def _named_key(section: str, message: str) -> str | None:
    m = re.match(rf"{re.escape(section)}\.([A-Za-z0-9_]+)\b", message)
    return m.group(1) if m else None


def _placeholder(value: Any) -> bool:
    if isinstance(value, str):
        return _PLACEHOLDER_RE.search(value) is not None
    if isinstance(value, list):
        return any(_placeholder(v) for v in value)
    return False


class _Section:
    """Typed access to one table; every key read is marked, the rest are unknown keys."""

    def __init__(self, name: str, table: Mapping[str, Any]) -> None:
        self.name = name
        self.table = table
        self.seen: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.table.get(key, default)

    def has(self, key: str) -> bool:
        self.seen.add(key)
        return key in self.table

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise ConfigError(f"{self.key(unknown[0])}: unknown key (known: {known})")

    def string(self, key: str, default: str) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.key(key)}: must be a string, got {_show(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(key)}: must be true or false, got {_show(value)}")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(key)}: must be an integer, got {_show(value)}")
        if not lo <= value <= hi:
            raise ConfigError(f"{self.key(key)}: must be between {lo} and {hi}, got {value}")
        return value

    def duration(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.get(key, None)
        if value is None:
            return default
        seconds = parse_duration(value, self.key(key))
        if not lo <= seconds <= hi:
            raise ConfigError(
                f"{self.key(key)}: must be between {lo:g}s and {hi:g}s, got {_show(value)}"
            )
        return seconds


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower()


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, key: str) -> float:
    """'30s', '5m', '1h', '500ms' or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f'{key}: must be a duration such as "30s", got {_show(value)}')
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ConfigError(f'{key}: must be a duration such as "30s" or "5m", got {_show(value)}')


def _parse_soracom(s: _Section) -> SoracomConfig:
    endpoint = s.string("endpoint", SoracomConfig.endpoint).rstrip("/")
    url = re.fullmatch(
        r"https?://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\])(?::(\d{1,5}))?(/\S*)?", endpoint
    )
    if not url or (url.group(2) and not 1 <= int(url.group(2)) <= 65535):
        raise ConfigError(f"{s.key('endpoint')}: must be an http(s) URL, got {endpoint!r}")
    if endpoint.startswith("http://") and not _local_host(url.group(1)):
        raise ConfigError(
            f"{s.key('endpoint')}: http would send the auth key in clear text; use https "
            f"(http is allowed only for a local or private address, such as the lab's emulator)"
        )
    auth_key_id = s.string("auth_key_id", "")
    if not auth_key_id:
        raise ConfigError(f"{s.key('auth_key_id')}: missing (the SORACOM AuthKey id, keyId-...)")
    if s.has("auth_key"):
        raise ConfigError(
            f"{s.key('auth_key')}: secrets are never inline; put the key in a file (mode 0600) "
            "and set soracom.auth_key_file"
        )
    ssm_parameter = _ssm_parameter(s)
    if ssm_parameter is not None and s.has("auth_key_file"):
        raise ConfigError(
            f"{s.key('auth_key_file')} and {s.key('auth_key_ssm_parameter')}: set exactly one "
            "(the key comes from a file or from SSM, not both)"
        )
    key_file = s.string("auth_key_file", str(SoracomConfig.auth_key_file))
    if not key_file.startswith("/"):
        raise ConfigError(f"{s.key('auth_key_file')}: must be an absolute path, got {key_file!r}")
    vpg_id = s.string("vpg_id", "")
    if not vpg_id:
        raise ConfigError(f"{s.key('vpg_id')}: missing (the id of your virtual private gateway)")
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", vpg_id):
        raise ConfigError(f"{s.key('vpg_id')}: not a VPG id, got {vpg_id!r}")
    cfg = SoracomConfig(
        endpoint=endpoint,
        auth_key_id=auth_key_id,
        auth_key_file=None if ssm_parameter else Path(key_file),
        auth_key_ssm_parameter=ssm_parameter,
        vpg_id=vpg_id,
        open_gate=s.boolean("open_gate", False),
        request_timeout=s.duration("request_timeout", 10.0, 0.1, 120.0),
        redirection=_redirection_mode(s),
    )
    s.finish()
    return cfg


def _redirection_mode(s: _Section) -> RedirectionMode:
    mode = s.get("redirection", "unmanaged")
    if mode not in ("unmanaged", "self"):
        raise ConfigError(
            f'{s.key("redirection")}: must be "unmanaged" or "self", got {_show(mode)}'
        )
    return cast(RedirectionMode, mode)


def _inner_address(s: _Section) -> ipaddress.IPv4Address | None:
    raw = s.get("inner_address")
    if raw is None:
        return None
    try:
        if not isinstance(raw, str):
            raise ValueError(raw)
        address = ipaddress.IPv4Address(raw)
    except ValueError:
        raise ConfigError(
            f'{s.key("inner_address")}: must be an IPv4 address string such as "10.128.0.3", '
            f"got {_show(raw)}"
        ) from None
    return _unicast(s, "inner_address", address)


# An SSM parameter name (a path such as /gatepeer/auth-key) or its ARN.
_SSM_PARAMETER_RE = re.compile(
    r"^(arn:aws[a-z-]*:ssm:[a-z0-9-]+:\d{12}:parameter)?/?[A-Za-z0-9_.\-/]{1,2000}$"
)


def _ssm_parameter(s: _Section) -> str | None:
    if not s.has("auth_key_ssm_parameter"):
        return None
    name = s.get("auth_key_ssm_parameter")
    if not isinstance(name, str) or not _SSM_PARAMETER_RE.match(name):
        raise ConfigError(
            f"{s.key('auth_key_ssm_parameter')}: not an SSM parameter name "
            f'(such as "/gatepeer/auth-key"), got {_show(name)}'
        )
    return name


def _local_host(host: str) -> bool:
    """localhost, or an IP literal in loopback, private or documentation ranges."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_private


def _interface_name(
    s: _Section, key: str, value: Any, reserved: tuple[str, ...] = RESERVED_IFNAMES
) -> str:
    if not isinstance(value, str) or not IFNAME_RE.fullmatch(value):
        raise ConfigError(f"{s.key(key)}: not an interface name (1-15 characters), got {value!r}")
    if value in reserved:
        raise ConfigError(f"{s.key(key)}: {value!r} is reserved, choose another interface name")
    return value


def _parse_tunnel(s: _Section) -> TunnelConfig:
    interface = _interface_name(s, "interface", s.get("interface", "vxlan0"), RESERVED_TUNNEL_NAMES)
    underlay = s.get("underlay_interface")
    if underlay is not None:
        underlay = _interface_name(s, "underlay_interface", underlay)
        if underlay == interface:
            raise ConfigError(f"{s.key('underlay_interface')}: must differ from tunnel.interface")
    local = s.get("local_address")
    local_address = None
    if local is not None:
        if not isinstance(local, str):
            raise ConfigError(f'{s.key("local_address")}: must be a string such as "198.18.0.10"')
        try:
            local_address = ipaddress.IPv4Address(local)
        except (ipaddress.AddressValueError, ValueError):
            raise ConfigError(
                f"{s.key('local_address')}: not an IPv4 address, got {_show(local)}"
            ) from None
        if (
            local_address.is_multicast
            or local_address.is_unspecified
            or local_address == ipaddress.IPv4Address("255.255.255.255")
        ):
            raise ConfigError(f"{s.key('local_address')}: must be a unicast address, got {local}")
    mtu_raw = s.get("mtu", 1500)
    mtu: int | Literal["auto"]
    if mtu_raw == "auto":
        mtu = "auto"
    elif isinstance(mtu_raw, int) and not isinstance(mtu_raw, bool):
        mtu = s.integer("mtu", 1500, MTU_MIN, MTU_MAX)
    else:
        raise ConfigError(f'{s.key("mtu")}: must be an integer or "auto", got {_show(mtu_raw)}')
    ports = s.get("source_port_range", [4789, 4789])
    if (
        not isinstance(ports, list)
        or len(ports) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports)
        or not 1 <= ports[0] <= ports[1] <= 65535
    ):
        raise ConfigError(
            f"{s.key('source_port_range')}: must be [low, high] with 1 <= low <= high <= 65535, "
            f"got {_show(ports)}"
        )
    cfg = TunnelConfig(
        interface=interface,
        underlay_interface=underlay,
        local_address=local_address,
        inner_address=_inner_address(s),
        mtu=mtu,
        source_port_range=(ports[0], ports[1]),
        destination_port=s.integer("destination_port", 4789, 1, 65535),
    )
    s.finish()
    return cfg


def _parse_kernel(s: _Section) -> KernelConfig:
    cfg = KernelConfig(
        neighbour_table_devices=s.integer("neighbour_table_devices", 50_000, 1_024, 4_000_000),
    )
    s.finish()
    return cfg


def _parse_agent(s: _Section) -> AgentConfig:
    state_file = s.string("state_file", str(AgentConfig.state_file))
    if not state_file.startswith("/"):
        raise ConfigError(f"{s.key('state_file')}: must be an absolute path, got {state_file!r}")
    cache = s.string("gate_cache", str(AgentConfig.gate_cache))
    if cache and not cache.startswith("/"):
        raise ConfigError(f'{s.key("gate_cache")}: must be an absolute path or "", got {cache!r}')
    cfg = AgentConfig(
        reconcile_interval=s.duration("reconcile_interval", 30.0, 1.0, 86_400.0),
        state_file=Path(state_file),
        gate_cache=Path(cache) if cache else None,
    )
    s.finish()
    return cfg


def _parse_devices(s: _Section) -> DevicesConfig:
    refresh = s.integer("sim_refresh_seconds", DEFAULT_SIM_REFRESH_S, 0, 86_400)
    if 0 < refresh < MIN_SIM_REFRESH_S:
        raise ConfigError(
            f"{s.key('sim_refresh_seconds')}: must be 0 (off) or at least {MIN_SIM_REFRESH_S}, "
            f"got {refresh}: each refresh pages through every SIM, within the API's rate limit"
        )
    cache = s.string("sim_cache", "")
    if cache and not cache.startswith("/"):
        raise ConfigError(f"{s.key('sim_cache')}: must be an absolute path, got {cache!r}")
    cfg = DevicesConfig(
        sim_refresh_seconds=refresh,
        sim_cache=Path(cache) if cache else None,
        metrics_top_n=s.integer("metrics_top_n", 10, 0, 1000),
    )
    s.finish()
    return cfg


def _parse_packet_path(s: _Section) -> PacketPathConfig:
    mode = s.get("mode", "route")
    if mode not in ("route", "nat"):
        raise ConfigError(f'{s.key("mode")}: must be "route" or "nat", got {_show(mode)}')
    allowed, names = _destinations(s)
    closed = s.boolean("closed", False)
    refresh = s.duration("destinations_refresh", 300.0, 30.0, 86_400.0)
    cache_raw = s.string("destinations_cache", str(PacketPathConfig.destinations_cache))
    if cache_raw and not cache_raw.startswith("/"):
        raise ConfigError(
            f'{s.key("destinations_cache")}: must be an absolute path or "", got {cache_raw!r}'
        )
    outside_vpc = s.get("outside_vpc", "masquerade")
    if outside_vpc not in ("masquerade", "route"):
        raise ConfigError(
            f'{s.key("outside_vpc")}: must be "masquerade" or "route", got {_show(outside_vpc)}'
        )
    if mode == "nat" and s.has("outside_vpc"):
        raise ConfigError(
            f"{s.key('outside_vpc')}: has no effect in nat mode (every device flow leaving by "
            'the underlay is masqueraded); remove it or set packet_path.mode = "route"'
        )
    vpc_cidrs = _prefixes(s, "vpc_cidrs")
    flowtable = s.get("flowtable", "auto")
    if flowtable != "auto" and not isinstance(flowtable, bool):
        raise ConfigError(
            f'{s.key("flowtable")}: must be true, false or "auto", got {_show(flowtable)}'
        )
    flows = s.integer("flows_per_device", 8, 1, 1024)
    cfg = PacketPathConfig(
        mode=mode,
        allowed_destinations=tuple(allowed),
        allowed_names=names,
        destinations_refresh=refresh,
        destinations_cache=Path(cache_raw) if cache_raw else None,
        closed=closed,
        flowtable=flowtable,
        flows_per_device=flows,
        host_services=_host_services(s),
        outside_vpc=outside_vpc,
        vpc_cidrs=vpc_cidrs,
        device_counters=s.boolean("device_counters", False),
    )
    s.finish()
    return cfg


# packet_path.allowed_destinations' AWS names (gatepeer.aws.destinations resolves them): a
# managed prefix list's id, an AWS-managed prefix list's name (com.amazonaws.<region>.<service>,
# or a global one such as com.amazonaws.global.cloudfront.origin-facing), a VPC endpoint's id.
PREFIX_LIST_ID = re.compile(r"pl-[0-9a-f]{8,17}")
ENDPOINT_ID = re.compile(r"vpce-[0-9a-f]{8,17}")
PREFIX_LIST_NAME = re.compile(r"com\.amazonaws\.[a-z0-9-]+\.[a-z0-9][a-z0-9.-]*")


def is_aws_name(entry: str) -> bool:
    """Whether an allowed_destinations entry names something in EC2 (else it is a prefix)."""
    return any(p.fullmatch(entry) for p in (PREFIX_LIST_ID, ENDPOINT_ID, PREFIX_LIST_NAME))


def _destinations(s: _Section) -> tuple[tuple[ipaddress.IPv4Network, ...], tuple[str, ...]]:
    """allowed_destinations: IPv4 prefixes, and AWS names resolved later through EC2
    (`pl-...`, `com.amazonaws.<region>.<service>`, `vpce-...`)."""
    key = "allowed_destinations"
    raw = s.get(key, [])
    if not isinstance(raw, list):
        raise ConfigError(
            f"{s.key(key)}: must be a list of IPv4 prefixes or AWS names, got {_show(raw)}"
        )
    prefixes: list[str] = []
    names: list[str] = []
    for item in raw:
        if isinstance(item, str) and is_aws_name(item):
            if item not in names:
                names.append(item)
        elif isinstance(item, str) and "/" not in item and item[:3] in ("pl-", "vpc", "com"):
            raise ConfigError(
                f"{s.key(key)}: not an IPv4 prefix, prefix list (pl-..., "
                f"com.amazonaws.REGION.SERVICE) or VPC endpoint id (vpce-...), got {_show(item)}"
            )
        else:
            prefixes.append(item)
    return _prefixes(s, key, prefixes), tuple(names)


def _prefixes(
    s: _Section, key: str, given: list[Any] | None = None
) -> tuple[ipaddress.IPv4Network, ...]:
    """A list of IPv4 prefix strings, ["198.18.0.0/16", ...]."""
    raw = s.get(key, []) if given is None else given
    if not isinstance(raw, list):
        raise ConfigError(f"{s.key(key)}: must be a list of IPv4 prefixes, got {_show(raw)}")
    found = []
    for item in raw:
        if not isinstance(item, str):
            raise ConfigError(f"{s.key(key)}: not an IPv4 prefix string, got {_show(item)}")
        try:
            found.append(ipaddress.IPv4Network(item))
        except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError, TypeError):
            raise ConfigError(
                f"{s.key(key)}: not an IPv4 prefix (host bits must be zero), got {_show(item)}"
            ) from None
    return tuple(found)


def _host_services(s: _Section) -> tuple[HostService, ...]:
    """`["tcp/22", "udp/53"]`; a bare port number means TCP. Sorted, duplicates dropped."""
    key = s.key("host_services")
    raw = s.get("host_services", [])
    if not isinstance(raw, list):
        raise ConfigError(f'{key}: must be a list such as ["tcp/22", "udp/53"], got {_show(raw)}')
    found: set[HostService] = set()
    for item in raw:
        if isinstance(item, int) and not isinstance(item, bool):
            proto, port = "tcp", item
        else:
            m = re.fullmatch(r"(tcp|udp)/(\d{1,5})", item) if isinstance(item, str) else None
            if m is None:
                raise ConfigError(
                    f'{key}: want "tcp/PORT", "udp/PORT" or a TCP port number, got {_show(item)}'
                )
            proto, port = m.group(1), int(m.group(2))
        if not 1 <= port <= 65535:
            raise ConfigError(f"{key}: port must be between 1 and 65535, got {_show(item)}")
        found.add((proto, port))  # type: ignore[arg-type]
    return tuple(sorted(found))


def _parse_metrics(s: _Section) -> MetricsConfig:
    listen = s.get("listen")
    if listen is not None:
        if not isinstance(listen, str):
            raise ConfigError(
                f'{s.key("listen")}: must be "ADDRESS:PORT" or "", got {_show(listen)}'
            )
        if listen:
            host, _, port = listen.rpartition(":")
            try:
                ipaddress.IPv4Address(host)
                port_ok = port.isdigit() and 1 <= int(port) <= 65535
            except ValueError:
                port_ok = False
            if not port_ok:
                raise ConfigError(
                    f'{s.key("listen")}: must be "IPv4ADDRESS:PORT" or "" (off), got {listen!r}'
                )
    cfg = MetricsConfig(listen=listen)
    s.finish()
    return cfg


def _parse_probes(s: _Section) -> ProbesConfig:
    cfg = ProbesConfig(
        interval=s.duration("interval", 5.0, 0.2, 3600.0),
        timeout=s.duration("timeout", 1.0, 0.05, 60.0),
    )
    if cfg.timeout >= cfg.interval:
        raise ConfigError(f"{s.key('timeout')}: must be shorter than probes.interval")
    s.finish()
    return cfg


def _parse_flow_log(s: _Section) -> FlowLogConfig:
    file = s.get("file")
    if file is not None and (not isinstance(file, str) or not file.startswith("/")):
        raise ConfigError(f"{s.key('file')}: must be an absolute path, got {_show(file)}")
    cfg = FlowLogConfig(
        enabled=s.boolean("enabled", False),
        file=Path(file) if file is not None else None,
        file_max_bytes=s.integer("file_max_bytes", 50_000_000, 100_000, 10_000_000_000),
        file_backups=s.integer("file_backups", 5, 0, 100),
        rate_per_second=s.integer("rate_per_second", 200, 1, 100_000),
    )
    s.finish()
    return cfg


_AWS_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-/:]{1,255}$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")


def _route_table_ids(s: _Section) -> tuple[str, ...]:
    tables_raw = s.get("route_tables", [])
    if not isinstance(tables_raw, list) or not all(isinstance(t, str) for t in tables_raw):
        raise ConfigError(
            f'{s.key("route_tables")}: must be a list of route table ids such as ["rtb-0a1b2c3d"]'
        )
    for table in tables_raw:
        if not ROUTE_TABLE_RE.match(table):
            raise ConfigError(f"{s.key('route_tables')}: not a route table id, got {table!r}")
    if len(set(tables_raw)) != len(tables_raw):
        raise ConfigError(f"{s.key('route_tables')}: lists a route table twice")
    return tuple(tables_raw)


def _parse_aws(s: _Section, packet_path: PacketPathConfig, ha: HaConfig | None) -> AwsConfig:
    def name(key: str, what: str) -> str | None:
        value = s.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not _AWS_NAME_RE.match(value):
            raise ConfigError(f"{s.key(key)}: not {what}, got {_show(value)}")
        return value

    endpoint = None
    if s.has("imds_endpoint"):
        endpoint = s.string("imds_endpoint", DEFAULT_IMDS_ENDPOINT).rstrip("/")
        if not IMDS_ENDPOINT_RE.fullmatch(endpoint):
            raise ConfigError(
                f"{s.key('imds_endpoint')}: must be http://ADDRESS[:PORT] "
                f'(default "{DEFAULT_IMDS_ENDPOINT}"), got {endpoint!r}'
            )
    tables = _route_table_ids(s)
    if tables and ha is not None:
        raise ConfigError(
            f"{s.key('route_tables')}: an HA pair moves routes with ha.route_tables (the master's "
            "claim); set only that one"
        )
    if tables and packet_path.mode != "route":
        raise ConfigError(
            f"{s.key('route_tables')}: routes the device subnet to this peer, which only route "
            f'mode forwards; set packet_path.mode = "route" or remove it'
        )
    region = s.get("region")
    if region is not None and (not isinstance(region, str) or not _REGION_RE.match(region)):
        raise ConfigError(f'{s.key("region")}: not an AWS region such as "ap-northeast-1"')
    cfg = AwsConfig(
        instance_facts=s.boolean("instance_facts", True),
        imds_endpoint=endpoint,
        imds_timeout=s.duration("imds_timeout", 1.0, 0.05, 30.0),
        region=region,
        disable_source_dest_check=s.boolean("disable_source_dest_check", False),
        autoscaling_group=name("autoscaling_group", "an Auto Scaling group name"),
        launch_lifecycle_hook=name("launch_lifecycle_hook", "a lifecycle hook name"),
        lifecycle_deadline=s.duration("lifecycle_deadline", 600.0, 10.0, 7_200.0),
        termination_lifecycle_hook=name("termination_lifecycle_hook", "a lifecycle hook name"),
        route_tables=tables,
        remove_stale_registrations=s.boolean("remove_stale_registrations", False),
    )
    hooks = [k for k in ("launch_lifecycle_hook", "termination_lifecycle_hook") if getattr(cfg, k)]
    if hooks and cfg.autoscaling_group is None:
        raise ConfigError(
            f"{s.key('autoscaling_group')}: missing; {s.key(hooks[0])} completes lifecycle "
            "actions of a group, name it"
        )
    if s.has("lifecycle_deadline") and not cfg.launch_lifecycle_hook:
        raise ConfigError(
            f"{s.key('lifecycle_deadline')}: has no effect without {s.key('launch_lifecycle_hook')}"
        )
    s.finish()
    return cfg


def check_against_system(cfg: Config) -> None:
    """Checks that need the host: the secret file's presence and mode, interface names. Both
    are checked; every problem is reported."""
    errors: list[ConfigError] = []
    key_file = cfg.soracom.auth_key_file
    if key_file is not None:
        try:
            _check_key_file(key_file)
        except ConfigError as exc:
            errors.append(exc)
    underlay = cfg.tunnel.underlay_interface
    if underlay is not None:
        try:
            socket.if_nametoindex(underlay)
        except OSError:
            errors.append(
                ConfigError(
                    f"tunnel.underlay_interface: no interface named {underlay!r} on this host"
                )
            )
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


def _check_key_file(key_file: Path) -> None:
    try:
        st = key_file.stat()
    except FileNotFoundError:
        raise ConfigError(f"soracom.auth_key_file: {key_file}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"soracom.auth_key_file: {key_file}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"soracom.auth_key_file: {key_file}: not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"soracom.auth_key_file: {key_file}: mode {stat.S_IMODE(st.st_mode):04o} lets "
            "others read the secret; chmod 0600 it"
        )
    if not os.access(key_file, os.R_OK):
        raise ConfigError(f"soracom.auth_key_file: {key_file}: not readable by this user")


def _parse_ha(s: _Section, tunnel: TunnelConfig, packet_path: PacketPathConfig | None) -> HaConfig:
    peer = _ha_address(s, "peer_address", required=True)
    assert peer is not None
    if peer == tunnel.local_address:
        raise ConfigError(f"{s.key('peer_address')}: is this host's tunnel.local_address ({peer})")
    advert = s.duration("advert_interval", 1.0, HA_ADVERT_MIN, HA_ADVERT_MAX)
    if abs(advert * 100 - round(advert * 100)) > 1e-6:
        raise ConfigError(
            f"{s.key('advert_interval')}: VRRPv3 counts in hundredths of a second, got {advert:g}s"
        )
    interface = s.get("interface")
    if interface is not None:
        interface = _interface_name(s, "interface", interface)
        if interface == tunnel.interface:
            raise ConfigError(
                f"{s.key('interface')}: VRRP runs on the underlay, not on tunnel.interface "
                f"({interface})"
            )
    vip = _ha_address(s, "virtual_address", required=False)
    if vip is not None and vip in (peer, tunnel.local_address):
        raise ConfigError(
            f"{s.key('virtual_address')}: {vip} is a VPC address; the virtual address is an "
            "inner address on the tunnel"
        )
    tables_raw = _route_table_ids(s)
    fifo = s.string("notify_fifo", str(HA_NOTIFY_FIFO))
    if not fifo.startswith("/"):
        raise ConfigError(f"{s.key('notify_fifo')}: must be an absolute path, got {fifo!r}")
    snat = _snat_address(s, peer, tunnel, vip, packet_path)
    sync = s.boolean("conntrack_sync", True)
    sync_port = s.integer("sync_port", HA_SYNC_PORT, 1, 65535)
    if sync_port in (tunnel.destination_port, *range(*_inclusive(tunnel.source_port_range))):
        raise ConfigError(
            f"{s.key('sync_port')}: {sync_port} is the tunnel's VXLAN port; pick another "
            f"(default {HA_SYNC_PORT})"
        )
    conntrackd_config = _absolute_path(s, "conntrackd_config", HA_CONNTRACKD_CONFIG)
    conntrackd_socket = _absolute_path(s, "conntrackd_socket", HA_CONNTRACKD_SOCKET)
    cfg = HaConfig(
        peer_address=peer,
        # 255 is reserved for the address owner and 0 for "leaving" (RFC 5798 5.2.4).
        priority=s.integer("priority", 254, 1, 254),
        advert_interval=round(advert, 2),
        virtual_router_id=s.integer("virtual_router_id", 51, 1, 255),
        nopreempt=s.boolean("nopreempt", True),
        interface=interface,
        virtual_address=vip,
        route_tables=tables_raw,
        check_interval=_whole_seconds(s, "check_interval", 1, 1, 60),
        check_timeout=_whole_seconds(s, "check_timeout", 3, 1, 60),
        check_fall=s.integer("check_fall", 2, 1, 100),
        check_rise=s.integer("check_rise", 2, 1, 100),
        notify_fifo=Path(fifo),
        snat_address=snat,
        conntrack_sync=sync,
        sync_port=sync_port,
        conntrackd_config=conntrackd_config,
        conntrackd_socket=conntrackd_socket,
    )
    s.finish()
    return cfg


def _snat_address(
    s: _Section,
    peer: ipaddress.IPv4Address,
    tunnel: TunnelConfig,
    vip: ipaddress.IPv4Address | None,
    packet_path: PacketPathConfig | None,
) -> ipaddress.IPv4Address | None:
    """The moving NAT address: a VPC address of its own. Whether it lies in the underlay's
    subnet is checked where the subnet is known (`desired_state`, from the host)."""
    snat = _ha_address(s, "snat_address", required=False)
    if snat is None:
        return None
    if snat == peer:
        raise ConfigError(
            f"{s.key('snat_address')}: {snat} is ha.peer_address; the NAT address is a third "
            "address in the peers' VPC subnet"
        )
    if snat == tunnel.local_address:
        raise ConfigError(
            f"{s.key('snat_address')}: {snat} is this host's tunnel.local_address; the NAT "
            "address is a third address in the peers' VPC subnet"
        )
    if snat == vip:
        raise ConfigError(
            f"{s.key('snat_address')}: {snat} is ha.virtual_address (an inner address on the "
            "tunnel); the NAT address is a VPC address"
        )
    cidrs = packet_path.vpc_cidrs if packet_path is not None else ()
    if cidrs and not any(snat in net for net in cidrs):
        raise ConfigError(
            f"{s.key('snat_address')}: {snat} is outside packet_path.vpc_cidrs "
            f"({', '.join(map(str, cidrs))}); it must be in the peers' VPC subnet"
        )
    return snat


def _inclusive(port_range: tuple[int, int]) -> tuple[int, int]:
    return port_range[0], port_range[1] + 1


def _absolute_path(s: _Section, key: str, default: Path) -> Path:
    value = s.string(key, str(default))
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise ConfigError(f"{s.key(key)}: must be an absolute path without spaces, got {value!r}")
    return Path(value)


def _ha_address(s: _Section, key: str, *, required: bool) -> ipaddress.IPv4Address | None:
    value = s.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{s.key(key)}: missing (the other peer's VPC address)")
        return None
    if not isinstance(value, str):
        raise ConfigError(f'{s.key(key)}: must be a string such as "198.18.0.11"')
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise ConfigError(f"{s.key(key)}: not an IPv4 address, got {_show(value)}") from None
    return _unicast(s, key, address)


def _unicast(s: _Section, key: str, address: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    """An address a host can own on a link: not multicast, 0.0.0.0, loopback, link-local or
    the broadcast address."""
    if (
        address.is_multicast
        or address.is_unspecified
        or address.is_loopback
        or address.is_link_local
        or address == ipaddress.IPv4Address("255.255.255.255")
    ):
        raise ConfigError(f"{s.key(key)}: must be a unicast address, got {address}")
    return address


def _whole_seconds(s: _Section, key: str, default: int, lo: int, hi: int) -> int:
    """keepalived's vrrp_script takes whole seconds: "2s", "1m" or 2."""
    seconds = s.duration(key, float(default), lo, hi)
    if seconds != int(seconds):
        raise ConfigError(f"{s.key(key)}: keepalived counts whole seconds, got {seconds:g}s")
    return int(seconds)
