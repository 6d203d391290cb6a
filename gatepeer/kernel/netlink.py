"""The tunnel's link, address and FDB entries, read and changed through rtnetlink (pyroute2).

One `IPRoute` socket per `Netlink` object, used from one thread. pyroute2 drops keyword
arguments it does not know without a word, so every change is read back by the caller.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gatepeer.desired_state import (
    HostFacts,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    ObservedLink,
    ObservedState,
    Sysctl,
)
from gatepeer.kernel import sysctl
from gatepeer.plan import (
    ZERO_MAC,
    Action,
    AddAddress,
    AddFdb,
    CreateLink,
    DeleteLink,
    RemoveAddress,
    RemoveFdb,
    SetMtu,
    SetSysctl,
    SetUp,
)

IFA_F_SECONDARY = 0x01
IFF_UP = 0x1
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80


class KernelError(RuntimeError):
    """A netlink request failed; the message carries the kernel's own reason."""


def _reason(exc: NetlinkError) -> str:
    code = exc.code if isinstance(exc.code, int) else 0
    text = errno.errorcode.get(code, str(code))
    return f"{exc.args[1] if len(exc.args) > 1 else text} ({text})"


class Netlink:
    def __init__(self) -> None:
        self.ipr = IPRoute(ext_ack=True, strict_check=True)

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- facts -------------------------------------------------------------------------

    def index(self, name: str) -> int | None:
        found = self.ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def default_route_interface(self) -> str | None:
        for route in self.ipr.route("dump", family=socket.AF_INET):
            if route["dst_len"] == 0 and route.get_attr("RTA_TABLE") == 254:
                oif = route.get_attr("RTA_OIF")
                if oif is not None:
                    return str(self.ipr.link("get", index=oif)[0].get_attr("IFLA_IFNAME"))
        return None

    def interface_with_mac(self, mac: str) -> str | None:
        """The name of the link with this MAC (EC2: the primary ENI that IMDS names)."""
        for link in self.ipr.get_links():
            if str(link.get_attr("IFLA_ADDRESS") or "").lower() == mac.lower():
                return str(link.get_attr("IFLA_IFNAME"))
        return None

    def primary_ipv4(self, index: int) -> IPv4Address | None:
        for addr in self.ipr.addr("dump", family=socket.AF_INET, index=index):
            if not addr["flags"] & IFA_F_SECONDARY:
                return IPv4Address(addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS"))
        return None

    def host_facts(self, underlay: str | None, local: IPv4Address | None) -> HostFacts:
        """Resolve the underlay and local address, from config or from the default route."""
        if underlay is None:
            underlay = self.default_route_interface()
            if underlay is None:
                raise KernelError(
                    "tunnel.underlay_interface: not set and this host has no IPv4 default route"
                )
        index = self.index(underlay)
        if index is None:
            raise KernelError(f"tunnel.underlay_interface: no interface named {underlay!r}")
        if local is None:
            local = self.primary_ipv4(index)
            if local is None:
                raise KernelError(
                    f"tunnel.local_address: not set and {underlay} has no IPv4 address"
                )
        mtu = int(self.ipr.link("get", index=index)[0].get_attr("IFLA_MTU"))
        prefix = self.connected_prefix(index, local)
        return HostFacts(
            underlay=underlay,
            underlay_index=index,
            underlay_mtu=mtu,
            local_address=local,
            vpc_networks=(prefix,) if prefix else (),
            vpc_networks_source="underlay" if prefix else None,
        )

    def connected_prefix(self, index: int, local: IPv4Address) -> IPv4Network | None:
        """The prefix of `local` on the interface (else its primary address's): the last
        guess at the VPC's networks, when neither config nor IMDS tells them."""
        found = None
        for addr in self.ipr.addr("dump", family=socket.AF_INET, index=index):
            address = IPv4Address(addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS"))
            network = IPv4Network(f"{address}/{addr['prefixlen']}", strict=False)
            if address == local:
                return network
            if found is None and not addr["flags"] & IFA_F_SECONDARY:
                found = network
        return found

    # ---- observe -----------------------------------------------------------------------

    def observe_link(self, name: str) -> ObservedLink | None:
        index = self.index(name)
        if index is None:
            return None
        msg = self.ipr.link("get", index=index)[0]
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        data = info.get_attr("IFLA_INFO_DATA") if info is not None else None

        def attr(key: str) -> Any:
            return data.get_attr(key) if data is not None and kind == "vxlan" else None

        local = attr("IFLA_VXLAN_LOCAL")
        ports = attr("IFLA_VXLAN_PORT_RANGE")
        learning = attr("IFLA_VXLAN_LEARNING")
        return ObservedLink(
            index=index,
            name=name,
            kind=kind,
            vni=attr("IFLA_VXLAN_ID"),
            local=IPv4Address(local) if local else None,
            underlay_index=attr("IFLA_VXLAN_LINK"),
            dst_port=attr("IFLA_VXLAN_PORT"),
            src_port_range=(int(ports["low"]), int(ports["high"])) if ports else None,
            learning=bool(learning) if learning is not None else None,
            mtu=int(msg.get_attr("IFLA_MTU")),
            admin_up=bool(msg["flags"] & IFF_UP),
            oper_state=str(msg.get_attr("IFLA_OPERSTATE")),
        )

    def observe_addresses(self, index: int) -> frozenset[IPv4Interface]:
        return frozenset(
            IPv4Interface(
                f"{a.get_attr('IFA_LOCAL') or a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            )
            for a in self.ipr.addr("dump", family=socket.AF_INET, index=index)
        )

    def observe_fdb(self, index: int) -> frozenset[IPv4Address]:
        found = set()
        for entry in self.ipr.fdb("dump", ifindex=index):
            if entry["ifindex"] != index:
                continue  # older kernels ignore the filter
            if entry.get_attr("NDA_LLADDR") == ZERO_MAC and entry.get_attr("NDA_DST"):
                found.add(IPv4Address(entry.get_attr("NDA_DST")))
        return frozenset(found)

    def observe(self, name: str, sysctls: tuple[Sysctl, ...]) -> ObservedState:
        link = self.observe_link(name)
        if link is not None and link.kind == "vxlan":
            addresses = self.observe_addresses(link.index)
            fdb = self.observe_fdb(link.index)
        else:
            addresses, fdb = frozenset(), frozenset()
        return ObservedState(
            link=link,
            addresses=addresses,
            fdb=fdb,
            sysctls=tuple((s.path, sysctl.read_writable(s.path)) for s in sysctls),
        )

    # ---- apply -------------------------------------------------------------------------

    def apply(self, action: Action) -> None:
        try:
            self._apply(action)
        except NetlinkError as exc:
            raise KernelError(f"{action.command()}: {_reason(exc)}") from None
        except OSError as exc:
            raise KernelError(f"{action.command()}: {exc.strerror or exc}") from None

    def _require(self, name: str) -> int:
        index = self.index(name)
        if index is None:
            raise KernelError(f"{name}: link vanished while being configured")
        return index

    def _apply(self, action: Action) -> None:
        match action:
            case CreateLink(spec=s):
                extra = {"address": s.mac} if s.mac else {}
                self.ipr.link(
                    "add",
                    ifname=s.name,
                    **extra,
                    kind="vxlan",
                    vxlan_id=s.vni,
                    vxlan_link=s.underlay_index,
                    vxlan_local=str(s.local),
                    vxlan_port=s.dst_port,
                    vxlan_port_range={"low": s.src_port_range[0], "high": s.src_port_range[1]},
                    vxlan_learning=1 if s.learning else 0,
                )
                self.ipr.link("set", index=self._require(s.name), mtu=s.mtu)
            case DeleteLink(name=name):
                self.ipr.link("del", index=self._require(name))
            case SetMtu(name=name, mtu=mtu):
                self.ipr.link("set", index=self._require(name), mtu=mtu)
            case SetUp(name=name):
                self.ipr.link("set", index=self._require(name), state="up")
            case AddAddress(name=name, address=a):
                self.ipr.addr(
                    "add",
                    index=self._require(name),
                    address=str(a.ip),
                    prefixlen=a.network.prefixlen,
                )
            case RemoveAddress(name=name, address=a):
                self.ipr.addr(
                    "del",
                    index=self._require(name),
                    address=str(a.ip),
                    prefixlen=a.network.prefixlen,
                )
            case AddFdb(name=name, dst=dst):
                self.ipr.fdb("append", ifindex=self._require(name), lladdr=ZERO_MAC, dst=str(dst))
            case RemoveFdb(name=name, dst=dst):
                index = self._require(name)
                self.ipr.fdb("del", ifindex=index, lladdr=ZERO_MAC, dst=str(dst))
                self._forget_endpoint(index, str(dst))
            case SetSysctl(setting=setting):
                sysctl.write(setting.path, setting.value)

    def _forget_endpoint(self, index: int, dst: str) -> None:
        """Drop what was learned through a removed endpoint, so devices behind it re-resolve
        at once through a surviving endpoint instead of waiting tens of seconds for their
        neighbour entries to fail. A neighbour entry is kept only when its MAC is known to sit
        behind a surviving endpoint; the rest re-resolve with one ARP round (a rare event)."""
        entries = [e for e in self.ipr.fdb("dump", ifindex=index) if e["ifindex"] == index]
        survivors = {e.get_attr("NDA_DST") for e in entries if e.get_attr("NDA_LLADDR") == ZERO_MAC}
        keep = set()
        for entry in entries:
            mac, where = entry.get_attr("NDA_LLADDR"), entry.get_attr("NDA_DST")
            if mac == ZERO_MAC:
                continue
            if where == dst:
                with contextlib.suppress(NetlinkError):  # it may have aged out meanwhile
                    self.ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst)
            elif where in survivors:
                keep.add(mac)
        for neigh in self.ipr.neigh("dump", ifindex=index, family=socket.AF_INET):
            if neigh["ifindex"] != index or neigh["state"] & (NUD_PERMANENT | NUD_NOARP):
                continue
            if neigh.get_attr("NDA_LLADDR") not in keep:
                with contextlib.suppress(NetlinkError):  # it may have expired meanwhile
                    self.ipr.neigh("del", ifindex=index, dst=neigh.get_attr("NDA_DST"))

    def delete_link(self, name: str) -> bool:
        index = self.index(name)
        if index is None:
            return False
        try:
            self.ipr.link("del", index=index)
        except NetlinkError as exc:
            raise KernelError(f"ip link del {name}: {_reason(exc)}") from None
        return True
