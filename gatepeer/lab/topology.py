"""The lab: the SORACOM side of a gate peer, built from network namespaces on one host.

```
 {p}-vpc  198.18.0.20 ──┐                 ┌── 198.18.1.11 {p}-vpg1 ─ 198.18.2.0/30 ─┐
                        ├─ vpcbr {p}-fabric sorabr ─┤     (VXLAN VNI, proxy ARP)      ├─ {p}-dev
 {p}-peer 198.18.0.10 ──┘ 198.18.0.1  198.18.1.1 └── 198.18.1.12 {p}-vpg2 ─ 198.18.2.4/30 ─┘
                         API 203.0.113.10:8080 on lo
```

- fabric: the VPC router. 198.18.0.0/24 is the VPC subnet, 198.18.1.0/24 stands for the VPC
  peering path to SORACOM's VPG, the API emulator listens on 203.0.113.10:8080, and
  198.51.100.1 plays a host on the internet.
- peer: the gate peer instance (eth0 is its ENI). The agent, or the hand-made baseline, runs here.
- vpc: a VPC host whose route table sends the device subnet to the gate peer.
- vpgN: one VPG tunnel endpoint each: vxlan0 with one all-zero-MAC FDB entry per registered
  customer gate peer (kept in step with the emulator by `sync_peers`), proxy ARP for the devices,
  and policy routing that sends the devices' traffic back through the tunnel.
- dev: the devices (SIMs): /32 addresses in the upper half of the device subnet.

Only 198.18.0.0/15 and the TEST-NET ranges are used, and only inside the lab's namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gatepeer.lab import netns
from gatepeer.lab.netns import LabError, bridge, bridge_json, ip, ip_json

DEFAULT_PREFIX = "gplab"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
RUN_ROOT = Path("/run/gatepeer-lab")

VPC_NET = ipaddress.IPv4Network("198.18.0.0/24")
FABRIC_VPC_ADDR = ipaddress.IPv4Address("198.18.0.1")
PEER_ADDR = ipaddress.IPv4Address("198.18.0.10")
VPC_HOST_ADDR = ipaddress.IPv4Address("198.18.0.20")
SORACOM_NET = ipaddress.IPv4Network("198.18.1.0/24")
FABRIC_SORACOM_ADDR = ipaddress.IPv4Address("198.18.1.1")
DEVICE_LINKS_NET = ipaddress.IPv4Network("198.18.2.0/24")
# The lab's own plumbing; a device subnet must stay clear of it.
RESERVED_NET = ipaddress.IPv4Network("198.18.0.0/22")
API_ADDR = ipaddress.IPv4Address("203.0.113.10")
# A stand-in for the internet, on the fabric router: Junction redirection (devices' traffic
# NATed out of the gate peer's ENI) can be tested against it. Nothing routes the device subnet
# back to the fabric, so only NATed traffic gets an answer.
INTERNET_ADDR = ipaddress.IPv4Address("198.51.100.1")
API_PORT = 8080
DEFAULT_VNI = 10
DEFAULT_DEVICE_SUBNET = ipaddress.IPv4Network("198.19.0.0/16")
DEFAULT_HOST_PORT = 18080
ALLOWED_NETS = tuple(
    ipaddress.IPv4Network(n)
    for n in ("198.18.0.0/15", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)

VXLAN_PORT = 4789
# EC2 ENIs carry 9001; the lab's underlay does too, so 1550-byte encapsulated frames fit.
UNDERLAY_MTU = 9001
# SORACOM's side of the tunnel and the devices' links carry ordinary 1500-byte packets.
OVERLAY_MTU = 1500
RETURN_TABLE = "100"
RETURN_RULE_PREF = "100"
ZERO_MAC = "00:00:00:00:00:00"
# Link names: "to-" keeps them clear of iproute2 keywords ("dev", "peer").
DEVICES_LINK = "to-dev"  # in each VPG endpoint namespace

BASELINE_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "handmade_gate_init.sh"


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Endpoint:
    """One VPG tunnel endpoint and its link to the devices namespace."""

    index: int  # 1-based
    ns: str
    outer: ipaddress.IPv4Address
    inner: ipaddress.IPv4Address
    link_addr: ipaddress.IPv4Address  # the endpoint's side of its devices link
    dev_link_addr: ipaddress.IPv4Address  # the devices namespace's side
    dev_ifname: str  # the link's name in the devices namespace


@dataclass(frozen=True)
class Layout:
    """Everything that decides the lab's shape; equal layouts build identical labs."""

    prefix: str = DEFAULT_PREFIX
    vni: int = DEFAULT_VNI
    device_subnet: ipaddress.IPv4Network = DEFAULT_DEVICE_SUBNET
    endpoint_count: int = 2
    device_count: int = 4

    def __post_init__(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise LabError(
                f"prefix {self.prefix!r}: 1-8 lowercase letters and digits, starting with a letter"
            )
        if not 1 <= self.vni <= 0xFFFFFF:
            raise LabError(f"VNI {self.vni}: must be between 1 and 16777215")
        if not 1 <= self.endpoint_count <= 8:
            raise LabError(f"endpoints {self.endpoint_count}: must be between 1 and 8")
        net = self.device_subnet
        if not any(net.subnet_of(allowed) for allowed in ALLOWED_NETS):
            allowed = ", ".join(str(n) for n in ALLOWED_NETS)
            raise LabError(f"device subnet {net}: must lie inside one of {allowed}")
        if net.overlaps(RESERVED_NET) or API_ADDR in net or INTERNET_ADDR in net:
            raise LabError(
                f"device subnet {net}: overlaps the lab's own addresses "
                f"({RESERVED_NET}, {API_ADDR}, {INTERNET_ADDR})"
            )
        if net.prefixlen > 28:
            raise LabError(f"device subnet {net}: too small, use a /28 or larger")
        lower, upper = net.subnets(1)
        if not 1 <= self.device_count <= min(upper.num_addresses - 2, 250):
            raise LabError(
                f"devices {self.device_count}: between 1 and "
                f"{min(upper.num_addresses - 2, 250)} fit in {upper}"
            )
        if self.endpoint_count + 2 > lower.num_addresses - 2:
            raise LabError(f"device subnet {net}: no room for the endpoints' inner addresses")

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    @property
    def fabric_ns(self) -> str:
        return self.ns("fabric")

    @property
    def peer_ns(self) -> str:
        return self.ns("peer")

    @property
    def vpc_ns(self) -> str:
        return self.ns("vpc")

    @property
    def dev_ns(self) -> str:
        return self.ns("dev")

    @property
    def namespaces(self) -> list[str]:
        return [
            self.fabric_ns,
            self.peer_ns,
            self.vpc_ns,
            *(ep.ns for ep in self.endpoints),
            self.dev_ns,
        ]

    @property
    def endpoints(self) -> list[Endpoint]:
        out = []
        for i in range(1, self.endpoint_count + 1):
            link = list(DEVICE_LINKS_NET.subnets(new_prefix=30))[i - 1]
            out.append(
                Endpoint(
                    index=i,
                    ns=self.ns(f"vpg{i}"),
                    outer=SORACOM_NET.network_address + 10 + i,
                    inner=self.device_subnet.network_address + i,
                    link_addr=link.network_address + 1,
                    dev_link_addr=link.network_address + 2,
                    dev_ifname=f"to-vpg{i}",
                )
            )
        return out

    @property
    def device_half(self) -> ipaddress.IPv4Network:
        """The devices live in the upper half; the endpoints and gate peers in the lower."""
        return list(self.device_subnet.subnets(1))[1]

    @property
    def devices(self) -> list[ipaddress.IPv4Address]:
        base = self.device_half.network_address
        return [base + i for i in range(1, self.device_count + 1)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["device_subnet"] = str(self.device_subnet)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        return cls(
            prefix=str(d["prefix"]),
            vni=int(d["vni"]),
            device_subnet=ipaddress.IPv4Network(d["device_subnet"]),
            endpoint_count=int(d["endpoint_count"]),
            device_count=int(d["device_count"]),
        )


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise LabError(f"device subnet {text!r}: {exc}") from None


@dataclass(frozen=True)
class Paths:
    """The lab's folder: credentials, the agent's config, the emulator's pid, log and URLs."""

    dir: Path

    @classmethod
    def for_prefix(cls, prefix: str) -> Paths:
        return cls(RUN_ROOT / prefix)

    @property
    def lab_json(self) -> Path:
        return self.dir / "lab.json"

    @property
    def auth_key(self) -> Path:
        return self.dir / "auth-key"

    @property
    def config(self) -> Path:
        return self.dir / "gatepeer.toml"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def gate_cache(self) -> Path:
        return self.dir / "gate.json"

    @property
    def emulator_pid(self) -> Path:
        return self.dir / "emulator.pid"

    @property
    def emulator_log(self) -> Path:
        return self.dir / "emulator.log"

    @property
    def emulator_json(self) -> Path:
        return self.dir / "emulator.json"

    @property
    def iperf_pid(self) -> Path:
        return self.dir / "iperf3.pid"


@dataclass(frozen=True)
class Credentials:
    operator_id: str
    auth_key_id: str
    vpg_id: str

    @classmethod
    def generate(cls) -> Credentials:
        return cls(
            operator_id=f"OP{secrets.randbelow(10**10):010d}",
            auth_key_id=f"keyId-{secrets.token_hex(16)}",
            vpg_id=str(uuid.uuid4()),
        )


@dataclass(frozen=True)
class LabRecord:
    """What lab.json holds: the layout, the public half of the credentials, the host port."""

    layout: Layout
    credentials: Credentials
    host_port: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "layout": self.layout.to_dict(),
                "credentials": asdict(self.credentials),
                "host_port": self.host_port,
            },
            indent=2,
        )

    @classmethod
    def load(cls, path: Path) -> LabRecord | None:
        try:
            d = json.loads(path.read_text())
            return cls(
                layout=Layout.from_dict(d["layout"]),
                credentials=Credentials(**d["credentials"]),
                host_port=int(d["host_port"]),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, LabError) as exc:
            raise LabError(f"{path}: unreadable lab record ({exc}); run `lab down` first") from None


def default_host_port(prefix: str) -> int:
    """18080 for the default lab, a stable port per prefix otherwise (the emulator falls back to
    any free port when this one is taken and writes the one it got to emulator.json)."""
    if prefix == DEFAULT_PREFIX:
        return DEFAULT_HOST_PORT
    return DEFAULT_HOST_PORT + 1 + zlib.crc32(prefix.encode()) % 2000


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 from the start (the key must never be readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def render_config(paths: Paths, creds: Credentials) -> str:
    """The agent's configuration for this lab (TOML, keys as in the project's config spec)."""
    return (
        "# Written by `gatepeer lab up`: the agent in the lab's gate peer namespace uses this.\n"
        "[soracom]\n"
        f'endpoint = "http://{API_ADDR}:{API_PORT}"\n'
        f'auth_key_id = "{creds.auth_key_id}"\n'
        f'auth_key_file = "{paths.auth_key}"\n'
        f'vpg_id = "{creds.vpg_id}"\n'
        "\n"
        "[tunnel]\n"
        'interface = "vxlan0"\n'
        'underlay_interface = "eth0"\n'
        f'local_address = "{PEER_ADDR}"\n'
        "\n"
        "[agent]\n"
        'reconcile_interval = "30s"\n'
        f'state_file = "{paths.state_file}"\n'
        f'gate_cache = "{paths.gate_cache}"\n'
    )


# ----------------------------------------------------------------------------- building


@dataclass
class BuildReport:
    """What `ensure_topology` did; `fabric_created` means a running emulator must restart
    (its socket lives in the old fabric namespace), `vxlan_recreated` that FDBs need a resync."""

    created: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    fabric_created: bool = False
    vxlan_recreated: bool = False


def _ensure_veth(a_ns: str, a_name: str, b_ns: str, b_name: str, report: BuildReport) -> None:
    """A veth pair created straight into its two namespaces (the root namespace never holds it).
    A lone end (its partner's namespace was deleted, or a half-done build) is replaced."""
    a = netns.link_exists(a_ns, a_name)
    b = netns.link_exists(b_ns, b_name)
    if a and b:
        return
    if a:
        ip(a_ns, "link", "del", "dev", a_name)
    if b:
        ip(b_ns, "link", "del", "dev", b_name)
    ip(a_ns, "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b_ns)
    (report.repaired if a or b else report.created).append(f"{a_ns}:{a_name}<->{b_ns}:{b_name}")


def _ensure_bridge(ns: str, name: str, report: BuildReport) -> None:
    if not netns.link_exists(ns, name):
        ip(ns, "link", "add", name, "type", "bridge")
        report.created.append(f"{ns}:{name}")


def _up(ns: str, name: str, mtu: int | None = None, master: str | None = None) -> None:
    args = ["link", "set", "dev", name]
    if mtu is not None:
        args += ["mtu", str(mtu)]
    if master is not None:
        args += ["master", master]
    ip(ns, *args, "up")


def _vxlan_matches(details: Mapping[str, Any] | None, vni: int, local: str) -> bool:
    if details is None:
        return False
    info = details.get("linkinfo", {})
    data = info.get("info_data", {})
    return (
        info.get("info_kind") == "vxlan"
        and data.get("id") == vni
        and data.get("port") == VXLAN_PORT
        and data.get("local") == local
        and data.get("link") == "eth0"
        and data.get("learning") is False
    )


def _ensure_vpg_vxlan(ep: Endpoint, layout: Layout, report: BuildReport) -> None:
    details = netns.link_details(ep.ns, "vxlan0")
    if _vxlan_matches(details, layout.vni, str(ep.outer)):
        return
    if details is not None:
        ip(ep.ns, "link", "del", "dev", "vxlan0")
        report.repaired.append(f"{ep.ns}:vxlan0 (attributes differed)")
    else:
        report.created.append(f"{ep.ns}:vxlan0")
    # nolearning: the endpoint sends only where its all-zero-MAC entries say, that is to the
    # registered gate peers, so unregistering a peer really cuts it off.
    ip(
        ep.ns, "link", "add", "vxlan0", "type", "vxlan", "id", str(layout.vni),
        "dstport", str(VXLAN_PORT), "local", str(ep.outer), "dev", "eth0", "nolearning",
    )  # fmt: skip
    report.vxlan_recreated = True


def _has_rule(ns: str, iif: str, table: str) -> bool:
    return any(
        r.get("iif") == iif and str(r.get("table")) == table for r in ip_json(ns, "rule", "show")
    )


def _has_default(ns: str, table: str) -> bool:
    # An empty table does not exist yet, and `ip route show table N` then fails.
    proc = ip(ns, "-j", "route", "show", "default", "table", table, check=False)
    return proc.returncode == 0 and bool(json.loads(proc.stdout or "[]"))


def ensure_topology(layout: Layout) -> BuildReport:
    """Create what is missing and repair what differs; what is already right stays untouched
    (re-running on a built lab changes nothing that carries traffic)."""
    report = BuildReport()
    for name in layout.namespaces:
        if netns.add_netns(name):
            report.created.append(name)
            if name == layout.fabric_ns:
                report.fabric_created = True
    base_sysctls = {
        # No IPv6 chatter (router solicitations, MLD) on the lab's links: the tests count packets.
        "net.ipv6.conf.all.disable_ipv6": 1,
        "net.ipv6.conf.default.disable_ipv6": 1,
    }
    for name in layout.namespaces:
        netns.write_sysctls(name, base_sysctls)
        ip(name, "link", "set", "dev", "lo", "up")

    fab = layout.fabric_ns
    netns.write_sysctls(fab, {"net.ipv4.ip_forward": 1})
    _ensure_bridge(fab, "vpcbr", report)
    _ensure_bridge(fab, "sorabr", report)
    _ensure_veth(fab, "to-peer", layout.peer_ns, "eth0", report)
    _ensure_veth(fab, "to-vpc", layout.vpc_ns, "eth0", report)
    for ep in layout.endpoints:
        _ensure_veth(fab, f"to-vpg{ep.index}", ep.ns, "eth0", report)
        _ensure_veth(ep.ns, DEVICES_LINK, layout.dev_ns, ep.dev_ifname, report)
    for port in ("to-peer", "to-vpc"):
        _up(fab, port, UNDERLAY_MTU, "vpcbr")
    for ep in layout.endpoints:
        _up(fab, f"to-vpg{ep.index}", UNDERLAY_MTU, "sorabr")
    _up(fab, "vpcbr", UNDERLAY_MTU)
    _up(fab, "sorabr", UNDERLAY_MTU)
    ip(fab, "addr", "replace", f"{FABRIC_VPC_ADDR}/{VPC_NET.prefixlen}", "dev", "vpcbr")
    ip(fab, "addr", "replace", f"{FABRIC_SORACOM_ADDR}/{SORACOM_NET.prefixlen}", "dev", "sorabr")
    ip(fab, "addr", "replace", f"{API_ADDR}/32", "dev", "lo")
    ip(fab, "addr", "replace", f"{INTERNET_ADDR}/32", "dev", "lo")

    # The gate peer: only its ENI. Forwarding, vxlan0 and the rest are the agent's job.
    peer = layout.peer_ns
    _up(peer, "eth0", UNDERLAY_MTU)
    ip(peer, "addr", "replace", f"{PEER_ADDR}/{VPC_NET.prefixlen}", "dev", "eth0")
    ip(peer, "route", "replace", "default", "via", str(FABRIC_VPC_ADDR), "dev", "eth0")

    vpc = layout.vpc_ns
    _up(vpc, "eth0", UNDERLAY_MTU)
    ip(vpc, "addr", "replace", f"{VPC_HOST_ADDR}/{VPC_NET.prefixlen}", "dev", "eth0")
    ip(vpc, "route", "replace", "default", "via", str(FABRIC_VPC_ADDR), "dev", "eth0")
    # The VPC route table sends the device subnet to the gate peer instance.
    ip(vpc, "route", "replace", str(layout.device_subnet), "via", str(PEER_ADDR), "dev", "eth0")

    for ep in layout.endpoints:
        _build_endpoint(ep, layout, report)

    dev = layout.dev_ns
    netns.write_sysctls(
        dev, {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
    )
    for addr in layout.devices:
        ip(dev, "addr", "replace", f"{addr}/32", "dev", "lo")
    for ep in layout.endpoints:
        _up(dev, ep.dev_ifname, OVERLAY_MTU)
        ip(dev, "addr", "replace", f"{ep.dev_link_addr}/30", "dev", ep.dev_ifname)
        # Replies leave through the first endpoint; the second takes over if its link goes.
        ip(
            dev, "route", "replace", "default", "via", str(ep.link_addr),
            "dev", ep.dev_ifname, "metric", str(100 * ep.index),
        )  # fmt: skip
    return report


def _build_endpoint(ep: Endpoint, layout: Layout, report: BuildReport) -> None:
    ns = ep.ns
    netns.write_sysctls(
        ns,
        {
            "net.ipv4.ip_forward": 1,
            # Device traffic arrives on vxlan0 from VPC addresses that route out of eth0.
            "net.ipv4.conf.all.rp_filter": 2,
            "net.ipv4.conf.default.rp_filter": 2,
        },
    )
    _up(ns, "eth0", UNDERLAY_MTU)
    ip(ns, "addr", "replace", f"{ep.outer}/{SORACOM_NET.prefixlen}", "dev", "eth0")
    ip(ns, "route", "replace", "default", "via", str(FABRIC_SORACOM_ADDR), "dev", "eth0")

    _ensure_vpg_vxlan(ep, layout, report)
    _up(ns, "vxlan0", OVERLAY_MTU)
    ip(ns, "addr", "replace", f"{ep.inner}/{layout.device_subnet.prefixlen}", "dev", "vxlan0")
    netns.write_sysctls(
        ns,
        {
            # The endpoint answers ARP for the devices, which it routes via its devices link,
            # as SORACOM's VPG does; at once (the default waits up to 0.8 s per request).
            "net.ipv4.conf.vxlan0.proxy_arp": 1,
            "net.ipv4.neigh.vxlan0.proxy_delay": 0,
            "net.ipv4.conf.vxlan0.rp_filter": 2,
        },
    )

    _up(ns, DEVICES_LINK, OVERLAY_MTU)
    ip(ns, "addr", "replace", f"{ep.link_addr}/30", "dev", DEVICES_LINK)
    ip(
        ns, "route", "replace", str(layout.device_half),
        "via", str(ep.dev_link_addr), "dev", DEVICES_LINK,
    )  # fmt: skip
    # The devices' traffic goes back through the tunnel to the gate peer, while the outer path
    # to the VPC (198.18.0.0/24 via eth0) stays as it is: policy routing on the input link.
    if not _has_rule(ns, DEVICES_LINK, RETURN_TABLE):
        ip(ns, "rule", "add", "pref", RETURN_RULE_PREF, "iif", DEVICES_LINK, "lookup", RETURN_TABLE)
    if not _has_default(ns, RETURN_TABLE):
        # Until a gate peer registers, device traffic has nowhere to go (never the outer path).
        ip(ns, "route", "replace", "unreachable", "default", "table", RETURN_TABLE)


# ----------------------------------------------------------------------------- peers


def _peer_field(peer: Any, *names: str) -> str | None:
    for name in names:
        value = peer.get(name) if isinstance(peer, Mapping) else getattr(peer, name, None)
        if value:
            return str(value)
    return None


def customer_peers(peers: Iterable[Any]) -> list[tuple[str, str]]:
    """(outer, inner) of each customer gate peer, in the order given. Accepts objects with
    outer_ip/inner_ip attributes, dicts with the same keys, or API-shaped dicts."""
    out: list[tuple[str, str]] = []
    for peer in peers:
        owned = (
            peer.get("ownedByCustomer", True)
            if isinstance(peer, Mapping)
            else getattr(peer, "owned_by_customer", True)
        )
        if owned is False:
            continue
        outer = _peer_field(peer, "outer_ip", "outerIpAddress")
        inner = _peer_field(peer, "inner_ip", "innerIpAddress")
        if outer and inner and (outer, inner) not in out:
            out.append((outer, inner))
    return out


def endpoint_fdb(ns: str) -> list[str]:
    """Destinations of the all-zero-MAC (flood) entries on the endpoint's vxlan0."""
    return [
        str(e["dst"])
        for e in bridge_json(ns, "fdb", "show", "dev", "vxlan0")
        if e.get("mac") == ZERO_MAC and e.get("dst")
    ]


def sync_peers(layout: Layout, peers: Sequence[tuple[str, str]]) -> list[str]:
    """Point every VPG endpoint at exactly these customer gate peers (outer, inner): add and
    remove flood entries as a set difference, and route device return traffic to the first
    peer. Returns what changed, as iproute2 commands."""
    changes: list[str] = []
    wanted = [outer for outer, _ in peers]
    for ep in layout.endpoints:
        if not netns.link_exists(ep.ns, "vxlan0"):
            continue
        have = endpoint_fdb(ep.ns)
        for dst in [d for d in wanted if d not in have]:
            args = ("fdb", "append", ZERO_MAC, "dev", "vxlan0", "dst", dst)
            bridge(ep.ns, *args)
            changes.append(f"bridge -n {ep.ns} {' '.join(args)}")
        for dst in [d for d in have if d not in wanted]:
            args = ("fdb", "del", ZERO_MAC, "dev", "vxlan0", "dst", dst)
            bridge(ep.ns, *args)
            changes.append(f"bridge -n {ep.ns} {' '.join(args)}")
        route: tuple[str, ...] = ("unreachable", "default")
        if peers:
            route = ("default", "via", peers[0][1], "dev", "vxlan0", "onlink")
        ip(ep.ns, "route", "replace", *route, "table", RETURN_TABLE)
        # A re-created peer vxlan0 has a new MAC: forget old answers instead of waiting ~30 s.
        ip(ep.ns, "neigh", "flush", "dev", "vxlan0", check=False)
    return changes


# ----------------------------------------------------------------------------- processes


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def emulator_pid(paths: Paths) -> int | None:
    """The emulator's pid if its pid file names a live process that is this lab's emulator
    (a stale pid file, or a pid reused by something else, gives None)."""
    pid = _read_pid(paths.emulator_pid)
    if pid is None or not _pid_alive(pid):
        return None
    cmdline = _proc_cmdline(pid)
    if "gatepeer.lab.run_emulator" in cmdline and str(paths.dir) in cmdline:
        return pid
    return None


def _stop_pid(pid: int, timeout: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_emulator(paths: Paths) -> int | None:
    """Stop this lab's emulator (by the pid in its pid file, after checking its cmdline)."""
    pid = emulator_pid(paths)
    if pid is not None:
        _stop_pid(pid)
    for stale in (paths.emulator_pid, paths.emulator_json):
        stale.unlink(missing_ok=True)
    return pid


def _netns_inode(name: str) -> int | None:
    try:
        return (netns.NETNS_DIR / name).stat().st_ino
    except OSError:
        return None


def _stop_recorded_iperf(paths: Paths, layout_prefix: str) -> int | None:
    """The demo's iperf3 server, if a crashed demo left it: only when the pid is an iperf3
    running in this lab's devices namespace."""
    pid = _read_pid(paths.iperf_pid)
    if pid is None or not _pid_alive(pid):
        return None
    cmdline = _proc_cmdline(pid)
    dev_ino = _netns_inode(f"{layout_prefix}-dev")
    try:
        pid_ino = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None
    if cmdline and Path(cmdline[0]).name == "iperf3" and dev_ino == pid_ino:
        _stop_pid(pid, timeout=2.0)
        return pid
    return None


def start_emulator(paths: Paths, timeout: float = 20.0) -> dict[str, Any]:
    """Start the emulator in the background and wait until it listens; return emulator.json."""
    paths.emulator_json.unlink(missing_ok=True)
    with open(paths.emulator_log, "ab") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "gatepeer.lab.run_emulator", "--lab-dir", str(paths.dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    # The launcher forks the emulator off and exits, so nobody here has to reap it later.
    try:
        rc = launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait()
        raise LabError(f"emulator launcher hung; see {paths.emulator_log}") from None
    if rc != 0:
        raise LabError(f"emulator failed to start (exit {rc}):\n{_log_tail(paths)}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _read_emulator_json(paths)
        if info is not None and emulator_pid(paths) == info.get("pid"):
            return info
        pid = _read_pid(paths.emulator_pid)
        if pid is not None and not _pid_alive(pid):
            break
        time.sleep(0.05)
    stop_emulator(paths)
    raise LabError(f"emulator did not come up:\n{_log_tail(paths)}")


def _read_emulator_json(paths: Paths) -> dict[str, Any] | None:
    try:
        return dict(json.loads(paths.emulator_json.read_text()))
    except (OSError, ValueError):
        return None


def _log_tail(paths: Paths, lines: int = 20) -> str:
    try:
        return "\n".join(paths.emulator_log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------- API client


class LabApi:
    """Just enough of the SORACOM API (stdlib only) for the baseline and `lab status`."""

    def __init__(self, base_url: str, creds: Credentials, auth_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.creds = creds
        self.auth_key = auth_key
        self.headers: dict[str, str] = {}

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        for k, v in self.headers.items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise LabError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise LabError(f"{method} {path}: {exc}") from None
        return json.loads(raw) if raw.strip() else None

    def auth(self) -> None:
        body = {"authKeyId": self.creds.auth_key_id, "authKey": self.auth_key}
        answer = self._request("POST", "/v1/auth", body)
        self.headers = {"X-Soracom-API-Key": answer["apiKey"], "X-Soracom-Token": answer["token"]}

    def _vpg(self, suffix: str = "") -> str:
        return f"/v1/virtual_private_gateways/{self.creds.vpg_id}{suffix}"

    def get_vpg(self) -> dict[str, Any]:
        return dict(self._request("GET", self._vpg()))

    def list_gate_peers(self) -> list[dict[str, Any]]:
        return list(self._request("GET", self._vpg("/gate/peers")))

    def register_gate_peer(self, outer_ip: str) -> dict[str, Any]:
        return dict(self._request("POST", self._vpg("/gate/peers"), {"outerIpAddress": outer_ip}))

    def unregister_gate_peer(self, outer_ip: str) -> None:
        self._request("DELETE", self._vpg(f"/gate/peers/{outer_ip}"))


def lab_api(paths: Paths, record: LabRecord, host_url: str) -> LabApi:
    api = LabApi(host_url, record.credentials, paths.auth_key.read_text().strip())
    api.auth()
    return api


# ----------------------------------------------------------------------------- up / down


@dataclass
class LabInfo:
    """A running lab, as `up` leaves it and `status` finds it."""

    layout: Layout
    paths: Paths
    credentials: Credentials
    emulator_pid: int | None
    host_url: str | None
    lab_url: str = f"http://{API_ADDR}:{API_PORT}"
    notes: list[str] = field(default_factory=list)
    gate_peer: dict[str, Any] | None = None


GatePeerBringUp = Callable[[LabInfo], dict[str, Any]]


def resolve_layout(
    prefix: str,
    *,
    vni: int | None = None,
    device_subnet: str | None = None,
    endpoints: int | None = None,
    devices: int | None = None,
) -> Layout:
    """The layout `up` builds: the given options over the existing lab's, over the defaults."""
    layout = Layout(prefix=prefix)
    record = LabRecord.load(Paths.for_prefix(prefix).lab_json)
    if record is not None:
        layout = record.layout
    changes: dict[str, Any] = {}
    if vni is not None:
        changes["vni"] = vni
    if device_subnet is not None:
        changes["device_subnet"] = parse_subnet(device_subnet)
    if endpoints is not None:
        changes["endpoint_count"] = endpoints
    if devices is not None:
        changes["device_count"] = devices
    return replace(layout, **changes) if changes else layout


def lab_namespaces(prefix: str) -> list[str]:
    """Every existing namespace of this lab (`{prefix}-*`), expected or not."""
    return [n for n in netns.list_netns() if n.startswith(f"{prefix}-")]


def up(
    layout: Layout,
    *,
    host_port: int | None = None,
    gate_peer: GatePeerBringUp | None = None,
) -> LabInfo:
    """Build or repair the lab, start its emulator, and optionally bring the gate peer up."""
    paths = Paths.for_prefix(layout.prefix)
    notes: list[str] = []
    record = LabRecord.load(paths.lab_json)
    if record is not None and record.layout != layout:
        notes.append("layout changed: rebuilt the lab")
        down(layout.prefix)
        record = None
    elif record is None and lab_namespaces(layout.prefix):
        # Left by a crash before lab.json was written: its shape is unknown, start clean.
        notes.append("removed leftovers of an earlier lab")
        down(layout.prefix)

    paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(paths.dir, 0o700)
    port_changed = record is not None and host_port is not None and record.host_port != host_port
    if record is None or port_changed:
        creds = record.credentials if record else Credentials.generate()
        port = host_port if host_port is not None else default_host_port(layout.prefix)
        record = LabRecord(layout=layout, credentials=creds, host_port=port)
    # Written before building so that a crash half-way leaves a lab `up` can repair.
    _write_private(paths.lab_json, record.to_json() + "\n")
    if not paths.auth_key.exists():
        _write_private(paths.auth_key, f"secret-{secrets.token_urlsafe(32)}\n")
    os.chmod(paths.auth_key, 0o600)
    _write_private(paths.config, render_config(paths, record.credentials))

    report = ensure_topology(layout)
    if report.created:
        notes.append(f"created {len(report.created)} namespaces/links")
    notes += [f"repaired {r}" for r in report.repaired]
    if not report.created and not report.repaired:
        notes.append("topology already up: kept as it was")

    pid = emulator_pid(paths)
    info = _read_emulator_json(paths)
    if pid is not None and (report.fabric_created or port_changed or info is None):
        # Its lab socket would sit in the old fabric namespace, or on the old host port.
        notes.append("restarting the emulator (fabric namespace re-created or new port)")
        stop_emulator(paths)
        pid = None
    if pid is None or info is None:
        stop_emulator(paths)  # clears a stale pid file
        info = start_emulator(paths)
        pid = int(info["pid"])
        notes.append(f"started the emulator (pid {pid})")
    else:
        notes.append(f"emulator already running (pid {pid}): kept")
        _follow_emulator(layout, str(info["host_url"]), paths, record, report)
    lab = LabInfo(
        layout=layout,
        paths=paths,
        credentials=record.credentials,
        emulator_pid=pid,
        host_url=str(info["host_url"]),
        notes=notes,
    )
    if gate_peer is not None:
        lab.gate_peer = gate_peer(lab)
    return lab


def _follow_emulator(
    layout: Layout, host_url: str, paths: Paths, record: LabRecord, report: BuildReport
) -> None:
    """A kept emulator holds the truth: re-point re-created endpoints at its peers, and keep
    them down while its Gate is closed (ensure_topology brought every vxlan0 up)."""
    if report.vxlan_recreated:
        api = lab_api(paths, record, host_url)
        sync_peers(layout, customer_peers(api.list_gate_peers()))
    with urllib.request.urlopen(f"{host_url}/_emulator/state", timeout=10) as resp:
        state = json.loads(resp.read())
    if state.get("settings", {}).get("gate_opened") is False:
        for ep in layout.endpoints:
            ip(ep.ns, "link", "set", "dev", "vxlan0", "down")


@dataclass
class DownReport:
    removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def down(prefix: str) -> DownReport:
    """Remove the lab whatever state it is in: emulator, namespaces, folder. Idempotent."""
    if not PREFIX_RE.match(prefix):
        raise LabError(f"prefix {prefix!r}: 1-8 lowercase letters and digits")
    paths = Paths.for_prefix(prefix)
    report = DownReport()
    pid = stop_emulator(paths)
    if pid is not None:
        report.removed.append(f"emulator (pid {pid})")
    iperf = _stop_recorded_iperf(paths, prefix)
    if iperf is not None:
        report.removed.append(f"iperf3 server (pid {iperf})")
    for name in lab_namespaces(prefix):
        pids = netns.netns_pids(name)
        if pids:
            # Not ours to kill: they keep the namespace alive after it is unlinked.
            report.warnings.append(
                f"{name}: processes still inside (pids {' '.join(map(str, pids))}); "
                "they keep its links alive until they exit"
            )
        netns.delete_netns(name)
        report.removed.append(name)
    if paths.dir.exists():
        shutil.rmtree(paths.dir)
        report.removed.append(str(paths.dir))
    with contextlib.suppress(OSError):
        RUN_ROOT.rmdir()  # only when no other lab is left
    return report


# ----------------------------------------------------------------------------- status


@dataclass
class Status:
    prefix: str
    namespaces: list[str]
    missing: list[str]
    layout: Layout | None
    emulator_pid: int | None
    host_url: str | None
    peers: list[dict[str, Any]] | None
    peer_error: str | None
    endpoint_fdb: dict[str, list[str]]
    gate_peer_vxlan: bool

    @property
    def exists(self) -> bool:
        return bool(self.namespaces) or self.layout is not None or self.emulator_pid is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "namespaces": self.namespaces,
            "missing": self.missing,
            "layout": self.layout.to_dict() if self.layout else None,
            "emulator": {"pid": self.emulator_pid, "host_url": self.host_url},
            "peers": self.peers,
            "peer_error": self.peer_error,
            "endpoint_fdb": self.endpoint_fdb,
            "gate_peer_vxlan": self.gate_peer_vxlan,
        }


def status(prefix: str) -> Status:
    paths = Paths.for_prefix(prefix)
    present = lab_namespaces(prefix)
    record = LabRecord.load(paths.lab_json)
    layout = record.layout if record else None
    missing = [n for n in layout.namespaces if n not in present] if layout else []
    pid = emulator_pid(paths)
    info = _read_emulator_json(paths) if pid is not None else None
    host_url = str(info["host_url"]) if info else None
    peers: list[dict[str, Any]] | None = None
    peer_error = None
    if record is not None and host_url is not None:
        try:
            peers = lab_api(paths, record, host_url).list_gate_peers()
        except (LabError, OSError, KeyError) as exc:
            peer_error = str(exc)
    fdb: dict[str, list[str]] = {}
    for ep in layout.endpoints if layout else []:
        if ep.ns in present and netns.link_exists(ep.ns, "vxlan0"):
            fdb[ep.ns] = endpoint_fdb(ep.ns)
    peer_vxlan = bool(
        layout and layout.peer_ns in present and netns.link_exists(layout.peer_ns, "vxlan0")
    )
    return Status(
        prefix=prefix,
        namespaces=present,
        missing=missing,
        layout=layout,
        emulator_pid=pid,
        host_url=host_url,
        peers=peers,
        peer_error=peer_error,
        endpoint_fdb=fdb,
        gate_peer_vxlan=peer_vxlan,
    )


# ----------------------------------------------------------------------------- baseline


def _prefixlen(netmask: Any, fallback: int) -> int:
    if not netmask:
        return fallback
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    except ValueError:
        return fallback


def baseline_gate_peer(lab: LabInfo) -> dict[str, Any]:
    """Bring the gate peer up the hand-made way: register it through the API (as a person
    would with soracom-cli), then run bench/handmade_gate_init.sh in the peer namespace."""
    if not BASELINE_SCRIPT.exists():
        raise LabError(f"{BASELINE_SCRIPT}: the baseline script is not there (source tree only)")
    assert lab.host_url is not None
    record = LabRecord(lab.layout, lab.credentials, 0)
    api = lab_api(lab.paths, record, lab.host_url)
    outer = str(PEER_ADDR)
    mine = [p for p in api.list_gate_peers() if p.get("outerIpAddress") == outer]
    if not mine:
        api.register_gate_peer(outer)
    peers = api.list_gate_peers()
    me = next(p for p in peers if p.get("outerIpAddress") == outer)
    inner = str(me["innerIpAddress"])
    plen = _prefixlen(me.get("netmask"), lab.layout.device_subnet.prefixlen)
    endpoints = [str(p["outerIpAddress"]) for p in peers if p.get("ownedByCustomer") is False]
    vpg = api.get_vpg()
    vni = int(vpg.get("gateVxlanId") or lab.layout.vni)
    cmd = ["bash", str(BASELINE_SCRIPT), "eth0", outer, f"{inner}/{plen}", str(vni), *endpoints]
    netns.run(netns.exec_in(lab.layout.peer_ns, cmd))
    # The VPG side may still hold the MAC of an earlier vxlan0 of this peer.
    for ep in lab.layout.endpoints:
        ip(ep.ns, "neigh", "flush", "dev", "vxlan0", check=False)
    return {
        "method": "baseline",
        "script": str(BASELINE_SCRIPT),
        "outer": outer,
        "inner": f"{inner}/{plen}",
        "vni": vni,
        "endpoints": endpoints,
        "command": " ".join(netns.exec_in(lab.layout.peer_ns, cmd)),
    }


def agent_command(paths: Paths, *args: str) -> list[str]:
    """`gatepeer ARGS...` with this lab's config, as this interpreter runs it."""
    return [sys.executable, "-m", "gatepeer", *args, "--config", str(paths.config)]


def agent_gate_peer(lab: LabInfo) -> dict[str, Any]:
    """Bring the gate peer up with the real agent: one `gatepeer apply` in the peer namespace
    with the lab's config (registers through the emulator, builds vxlan0, loads its nftables
    table, tunes the kernel, verifies). One-shot: nothing keeps it converged afterwards, which
    is `gatepeer run`'s job."""
    cmd = netns.exec_in(lab.layout.peer_ns, agent_command(lab.paths, "apply"))
    proc = netns.run(cmd, check=False, timeout=120)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise LabError(
            f"gatepeer apply in {lab.layout.peer_ns} failed (exit {proc.returncode}):\n{detail}"
        )
    try:
        gate = json.loads(lab.paths.state_file.read_text())["gate"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LabError(
            f"{lab.paths.state_file}: no gate view after gatepeer apply ({exc})"
        ) from None
    # A vxlan0 the agent had to create anew (after a hand-made one) has another MAC than the
    # one the VPG side may remember.
    for ep in lab.layout.endpoints:
        ip(ep.ns, "neigh", "flush", "dev", "vxlan0", check=False)
    return {
        "method": "agent, one-shot `gatepeer apply`",
        "outer": str(gate["outer"]),
        "inner": str(gate["inner"]),
        "vni": int(gate["vni"]),
        "endpoints": [str(e["outer"]) for e in gate["endpoints"]],
        "command": " ".join(cmd),
        "output": proc.stdout.splitlines(),
    }


# ----------------------------------------------------------------------------- demo


@dataclass
class DemoStep:
    name: str
    ok: bool
    detail: str


def _ping(ns: str, target: str, count: int = 3) -> tuple[bool, str]:
    proc = netns.run(
        netns.exec_in(ns, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", target]),
        check=False,
    )
    summary = [ln for ln in proc.stdout.splitlines() if "packets transmitted" in ln or "rtt" in ln]
    return proc.returncode == 0, "; ".join(summary) or (proc.stderr.strip() or "no output")


def start_iperf_server(layout: Layout, paths: Paths, bind: str) -> subprocess.Popen[bytes]:
    """iperf3 server in the devices namespace, recorded by pid so `lab down` can stop it."""
    server = subprocess.Popen(
        netns.exec_in(layout.dev_ns, ["iperf3", "-s", "-1", "-B", bind]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    paths.iperf_pid.write_text(f"{server.pid}\n")
    # Ready when it listens on 5201 inside the devices namespace.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.poll() is None:
        out = netns.run(
            netns.exec_in(layout.dev_ns, ["ss", "-Htln", "sport", "= :5201"]), check=False
        )
        if out.stdout.strip():
            break
        time.sleep(0.05)
    return server


def stop_iperf_server(server: subprocess.Popen[bytes], paths: Paths) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    paths.iperf_pid.unlink(missing_ok=True)


def iperf(layout: Layout, paths: Paths, target: str, seconds: int = 2) -> tuple[bool, str]:
    """A short TCP transfer from the VPC host to a device; (ok, summary)."""
    server = start_iperf_server(layout, paths, target)
    try:
        proc = netns.run(
            netns.exec_in(layout.vpc_ns, ["iperf3", "-c", target, "-t", str(seconds), "-J"]),
            check=False,
            timeout=seconds + 20,
        )
    finally:
        stop_iperf_server(server, paths)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        return False, (proc.stderr or proc.stdout).strip()[:300] or "iperf3 gave no output"
    if result.get("error"):
        return False, str(result["error"])
    end = result.get("end", {})
    sent = end.get("sum_sent", {})
    received = end.get("sum_received", {})
    rate = float(received.get("bits_per_second", 0.0))
    nbytes = int(received.get("bytes", 0))
    ok = proc.returncode == 0 and nbytes > 0
    detail = (
        f"{nbytes / 1e6:.1f} MB in {float(received.get('seconds', 0)):.1f} s, "
        f"{rate / 1e6:.0f} Mbit/s, {int(sent.get('retransmits', 0))} retransmits"
    )
    return ok, detail


def demo_traffic(lab: LabInfo) -> list[DemoStep]:
    """Traffic from the VPC host to the devices through the gate peer's tunnel."""
    layout = lab.layout
    steps: list[DemoStep] = []
    device = str(layout.devices[0])
    before = netns.link_stats(layout.peer_ns, "vxlan0")
    ok, detail = _ping(layout.vpc_ns, device)
    steps.append(DemoStep(f"ping {device} from the VPC host ({VPC_HOST_ADDR})", ok, detail))
    after = netns.link_stats(layout.peer_ns, "vxlan0")
    grew = after["tx_packets"] > before["tx_packets"] and after["rx_packets"] > before["rx_packets"]
    steps.append(
        DemoStep(
            "the packets went through the gate peer's vxlan0",
            grew,
            f"tx +{after['tx_packets'] - before['tx_packets']} packets, "
            f"rx +{after['rx_packets'] - before['rx_packets']} packets",
        )
    )
    for ep in layout.endpoints:
        ok, detail = _ping(layout.peer_ns, str(ep.inner), count=2)
        steps.append(
            DemoStep(f"ping VPG endpoint {ep.index} inner {ep.inner} from the peer", ok, detail)
        )
    if shutil.which("iperf3"):
        ok, detail = iperf(layout, lab.paths, device)
        steps.append(DemoStep(f"TCP transfer (iperf3, 2 s) VPC host -> {device}", ok, detail))
    else:
        steps.append(
            DemoStep("TCP transfer", False, "iperf3 is not installed (apt-get install iperf3)")
        )
    return steps
