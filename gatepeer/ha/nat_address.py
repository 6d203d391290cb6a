"""`ha.snat_address` on this host's underlay: held by gatepeer while this peer is master, and
taken only once conntrackd has committed the other peer's connections into the kernel.

Why gatepeer and not keepalived: keepalived adds its virtual addresses and sends gratuitous ARP
the moment it becomes master, before it tells anyone (the notify FIFO comes after), so the VPC
hosts' replies reached the new master a few milliseconds before conntrackd's commit, found no
connection and were dropped: UDP datagrams lost on every graceful stop (docs/ha.md). Holding
the address here puts it after the commit: until then the replies keep going to the old master,
which still forwards them (its table and tunnel stay up while the VPG moves).

Holding: the address as a /32 on the underlay (the source of NATed flows, never a route), then
gratuitous ARP so the VPC hosts' neighbour entries move here at once. Releasing: the address
goes (backup, fault, keepalived stopped). Both are idempotent. On EC2 the claim also moves the
address to this ENI (AssignPrivateIpAddresses): the VPC fabric itself learns nothing from ARP.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address

log = logging.getLogger(__name__)

# Frames per announcement: ARP has no retransmission, and a lost frame leaves a VPC host
# sending to the old master until its neighbour entry is probed again (seconds).
ANNOUNCEMENTS = 3
ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


class NatAddressError(OSError):
    """The address could not be added, removed or announced; the message says which and why."""


def gratuitous_arp(mac: bytes, address: IPv4Address) -> bytes:
    """A gratuitous ARP request (sender and target are the address; RFC 5227's announcement):
    a Linux neighbour that already has an entry for the address takes the new MAC from it."""
    if len(mac) != 6:
        raise ValueError(f"not an Ethernet address: {mac.hex(':')}")
    ip = address.packed
    header = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
    return header + arp


class NatAddress:
    """The NAT address on one interface (a callable: the underlay is known only after the
    daemon's first reconcile). `hold`/`release` return their failures, one line each."""

    def __init__(self, address: IPv4Address, interface: Callable[[], str | None]) -> None:
        self.address = address
        self.interface = interface

    def hold(self) -> list[str]:
        try:
            name, index, mac = self._link()
            added = self._change("add", index)
            self._announce(name, mac)
        except NatAddressError as exc:
            log.error("%s", exc)
            return [str(exc)]
        if added:
            log.info("holding ha.snat_address %s on %s (announced)", self.address, name)
        return []

    def release(self) -> list[str]:
        try:
            name, index, _ = self._link()
            removed = self._change("del", index)
        except NatAddressError as exc:
            log.error("%s", exc)
            return [str(exc)]
        if removed:
            log.info("released ha.snat_address %s from %s", self.address, name)
        return []

    def _link(self) -> tuple[str, int, bytes]:
        from pyroute2 import IPRoute  # the daemon has it loaded; `gatepeer check` never gets here

        name = self.interface()
        if not name:
            raise NatAddressError(
                f"ha.snat_address {self.address}: the underlay interface is not known yet"
            )
        with IPRoute() as ipr:
            links = ipr.get_links(ifname=name)
        if not links:
            raise NatAddressError(f"ha.snat_address {self.address}: no interface {name}")
        mac = str(links[0].get_attr("IFLA_ADDRESS") or "")
        return name, int(links[0]["index"]), bytes.fromhex(mac.replace(":", ""))

    def _change(self, command: str, index: int) -> bool:
        """True when the kernel changed (the address was missing / present)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with IPRoute() as ipr:
                ipr.addr(command, index=index, address=str(self.address), prefixlen=32)
        except NetlinkError as exc:
            if (command, exc.code) in (("add", errno.EEXIST), ("del", errno.EADDRNOTAVAIL)):
                return False
            what = "adding" if command == "add" else "removing"
            raise NatAddressError(
                f"ha.snat_address {self.address}: {what} it failed: {exc.args[-1]}"
            ) from None
        return True

    def _announce(self, interface: str, mac: bytes) -> None:
        frame = gratuitous_arp(mac, self.address)
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
                s.bind((interface, 0))
                for _ in range(ANNOUNCEMENTS):
                    s.send(frame)
        except OSError as exc:
            raise NatAddressError(
                f"ha.snat_address {self.address}: gratuitous ARP on {interface} failed: {exc}"
            ) from None
