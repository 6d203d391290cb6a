"""Building the lab's namespaces and links (see `gatepeer.lab` for the picture): create what is
missing, repair what differs, leave alone what is right."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import (
    API_ADDR,
    DEVICES_LINK,
    FABRIC_SORACOM_ADDR,
    FABRIC_VPC_ADDR,
    INTERNET_ADDR,
    OVERLAY_MTU,
    PEER_ADDR,
    RETURN_RULE_PREF,
    RETURN_TABLE,
    SORACOM_NET,
    UNDERLAY_MTU,
    VPC_HOST_ADDR,
    VPC_NET,
    VPG_NAT_TABLE,
    VXLAN_PORT,
    Endpoint,
    Layout,
)
from gatepeer.lab.network.netns import ip, ip_json


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


def render_vpg_nat(ep: Endpoint) -> str:
    """The endpoint's own way out: what leaves eth0 from the devices is source-NATed to the
    VPG's address, as SORACOM's VPG does on its Canal and internet paths. A device's reply to a
    connection that came in through the tunnel cannot be NATed (conntrack NATs a connection's
    first packet only; a reply that this endpoint did not see come in, e.g. through the other
    endpoint, is invalid to it), and on SORACOM it would reach the opener from the VPG's
    address, which the opener ignores: here it is dropped and counted, the same "no reply".
    Loaded as one transaction (add and delete first: nft 1.0.6 has no `destroy`)."""
    return (
        f"add table ip {VPG_NAT_TABLE}\n"
        f"delete table ip {VPG_NAT_TABLE}\n"
        f"table ip {VPG_NAT_TABLE} {{\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        f'\t\tiifname "{DEVICES_LINK}" oifname "eth0" ct direction reply counter drop\n'
        f'\t\tiifname "{DEVICES_LINK}" oifname "eth0" ct state invalid counter drop\n'
        "\t}\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        f'\t\tiifname "{DEVICES_LINK}" oifname "eth0" counter snat to {ep.nat_addr}\n'
        "\t}\n"
        "}\n"
    )


def _ensure_vpg_nat(ep: Endpoint, report: BuildReport) -> None:
    proc = netns.run(
        netns.exec_in(ep.ns, ["nft", "list", "table", "ip", VPG_NAT_TABLE]), check=False
    )
    listed = proc.stdout if proc.returncode == 0 else ""
    if f"snat to {ep.nat_addr}" in listed and "ct state invalid" in listed:
        return
    netns.run(netns.exec_in(ep.ns, ["nft", "-f", "-"]), input=render_vpg_nat(ep))
    (report.repaired if proc.returncode == 0 else report.created).append(
        f"{ep.ns}: nftables table ip {VPG_NAT_TABLE}"
    )


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
    for gp in layout.gate_peers:
        _ensure_veth(fab, gp.fabric_port, gp.ns, "eth0", report)
    _ensure_veth(fab, "to-vpc", layout.vpc_ns, "eth0", report)
    for ep in layout.endpoints:
        _ensure_veth(fab, f"to-vpg{ep.index}", ep.ns, "eth0", report)
        _ensure_veth(ep.ns, DEVICES_LINK, layout.dev_ns, ep.dev_ifname, report)
    for port in (*(gp.fabric_port for gp in layout.gate_peers), "to-vpc"):
        _up(fab, port, UNDERLAY_MTU, "vpcbr")
    for ep in layout.endpoints:
        _up(fab, f"to-vpg{ep.index}", UNDERLAY_MTU, "sorabr")
    _up(fab, "vpcbr", UNDERLAY_MTU)
    _up(fab, "sorabr", UNDERLAY_MTU)
    ip(fab, "addr", "replace", f"{FABRIC_VPC_ADDR}/{VPC_NET.prefixlen}", "dev", "vpcbr")
    ip(fab, "addr", "replace", f"{FABRIC_SORACOM_ADDR}/{SORACOM_NET.prefixlen}", "dev", "sorabr")
    ip(fab, "addr", "replace", f"{API_ADDR}/32", "dev", "lo")
    ip(fab, "addr", "replace", f"{INTERNET_ADDR}/32", "dev", "lo")
    for ep in layout.endpoints:
        # Answers to the VPG's NAT address go back to the endpoint that made them.
        ip(fab, "route", "replace", f"{ep.nat_addr}/32", "via", str(ep.outer), "dev", "sorabr")

    # The gate peers: only their ENI. Forwarding, vxlan0 and the rest are the agent's job.
    for gp in layout.gate_peers:
        _up(gp.ns, "eth0", UNDERLAY_MTU)
        ip(gp.ns, "addr", "replace", f"{gp.address}/{VPC_NET.prefixlen}", "dev", "eth0")
        ip(gp.ns, "route", "replace", "default", "via", str(FABRIC_VPC_ADDR), "dev", "eth0")

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
    # Where the devices' traffic goes, as on SORACOM: inside the device subnet over the tunnel
    # (the connected route of vxlan0: ARP finds the peer that owns the address), so first the
    # main table without its default; outside it to the Junction redirection gateway, which
    # `vpg.sync_redirection` puts as the only route of RETURN_TABLE; without one (or before
    # the emulator has said) by the main default out of eth0, source-NATed to the VPG's address.
    if not _has_rule(ns, DEVICES_LINK, "main"):
        ip(
            ns, "rule", "add", "pref", str(int(RETURN_RULE_PREF) - 1), "iif", DEVICES_LINK,
            "lookup", "main", "suppress_prefixlength", "0",
        )  # fmt: skip
    if not _has_rule(ns, DEVICES_LINK, RETURN_TABLE):
        ip(ns, "rule", "add", "pref", RETURN_RULE_PREF, "iif", DEVICES_LINK, "lookup", RETURN_TABLE)
    _ensure_vpg_nat(ep, report)
