"""The lab's shape: its address plan and the layout that decides what gets built. Pure values;
the lab's folder and the files in it are `gatepeer.lab.record`'s.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from gatepeer.lab.network.netns import LabError

DEFAULT_PREFIX = "gplab"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")

VPC_NET = ipaddress.IPv4Network("198.18.0.0/24")
FABRIC_VPC_ADDR = ipaddress.IPv4Address("198.18.0.1")
PEER_ADDR = ipaddress.IPv4Address("198.18.0.10")
# The second gate peer of an HA lab (`lab up --peers 2`), on the same VPC bridge.
PEER2_ADDR = ipaddress.IPv4Address("198.18.0.11")
MAX_PEERS = 2
# The HA pair's NAT address (`ha.snat_address`): a /32 the master's gatepeer holds on its eth0,
# what the VPC host sees as the devices' source in nat mode whichever peer is master.
PAIR_SNAT_ADDR = ipaddress.IPv4Address("198.18.0.12")
VPC_HOST_ADDR = ipaddress.IPv4Address("198.18.0.20")
SORACOM_NET = ipaddress.IPv4Network("198.18.1.0/24")
FABRIC_SORACOM_ADDR = ipaddress.IPv4Address("198.18.1.1")
DEVICE_LINKS_NET = ipaddress.IPv4Network("198.18.2.0/24")
# The lab's own plumbing; a device subnet must stay clear of it.
RESERVED_NET = ipaddress.IPv4Network("198.18.0.0/22")
API_ADDR = ipaddress.IPv4Address("203.0.113.10")
# The VPG's own way out (SORACOM's Canal peering or internet path): device traffic that Junction
# redirection does not send to a gate peer leaves endpoint N source-NATed to 198.18.3.(10+N),
# so a VPC host sees the VPG's address, not a device's or the gate peer's.
VPG_NAT_NET = ipaddress.IPv4Network("198.18.3.0/24")
VPG_NAT_TABLE = "gatepeer_lab_vpg"  # nftables table (family ip) in each endpoint namespace
# A stand-in for the internet, on the fabric router: Junction redirection (devices' traffic
# NATed out of the gate peer's ENI) can be tested against it. Nothing routes the device subnet
# back to the fabric, so only NATed traffic (the gate peer's or the VPG's) gets an answer.
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
# Routing table of the devices' traffic that leaves the device subnet: only the route to the
# Junction redirection gateway, when there is one.
RETURN_TABLE = "100"
RETURN_RULE_PREF = "100"
ZERO_MAC = "00:00:00:00:00:00"
# Link names: "to-" keeps them clear of iproute2 keywords ("dev", "peer").
DEVICES_LINK = "to-dev"  # in each VPG endpoint namespace


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
    nat_addr: ipaddress.IPv4Address  # the VPG's source NAT address on this endpoint's way out


@dataclass(frozen=True)
class GatePeer:
    """One gate peer instance of the lab: its namespace, VPC address and fabric port."""

    index: int  # 1-based; peer 1 is the lab's single peer when there is only one
    ns: str
    address: ipaddress.IPv4Address
    fabric_port: str  # its veth's end on the fabric's VPC bridge


@dataclass(frozen=True)
class Layout:
    """Everything that decides the lab's shape; equal layouts build identical labs."""

    prefix: str = DEFAULT_PREFIX
    vni: int = DEFAULT_VNI
    device_subnet: ipaddress.IPv4Network = DEFAULT_DEVICE_SUBNET
    endpoint_count: int = 2
    device_count: int = 4
    peer_count: int = 1  # 2: an HA pair (both register; keepalived elects)

    def __post_init__(self) -> None:
        if not PREFIX_RE.match(self.prefix):
            raise LabError(
                f"prefix {self.prefix!r}: 1-8 lowercase letters and digits, starting with a letter"
            )
        if not 1 <= self.vni <= 0xFFFFFF:
            raise LabError(f"VNI {self.vni}: must be between 1 and 16777215")
        if not 1 <= self.endpoint_count <= 8:
            raise LabError(f"endpoints {self.endpoint_count}: must be between 1 and 8")
        if not 1 <= self.peer_count <= MAX_PEERS:
            raise LabError(f"peers {self.peer_count}: must be 1 or {MAX_PEERS}")
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
    def gate_peers(self) -> list[GatePeer]:
        peers = [GatePeer(1, self.peer_ns, PEER_ADDR, "to-peer")]
        if self.peer_count >= 2:
            peers.append(GatePeer(2, self.ns("peer2"), PEER2_ADDR, "to-peer2"))
        return peers

    @property
    def namespaces(self) -> list[str]:
        return [
            self.fabric_ns,
            *(p.ns for p in self.gate_peers),
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
                    nat_addr=VPG_NAT_NET.network_address + 10 + i,
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
            peer_count=int(d.get("peer_count", 1)),  # lab.json of a lab made before HA
        )


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise LabError(f"device subnet {text!r}: {exc}") from None
