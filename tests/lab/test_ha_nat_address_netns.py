"""`ha.snat_address` held by gatepeer (gatepeer/ha/nat_address.py), for real: two peers and a
VPC host on one bridge. The peer that holds the address answers for it; when the other takes it,
its gratuitous ARP moves the VPC host's neighbour entry at once (no probe, no traffic needed);
releasing removes it. Both are idempotent. That is what lets the new master take the address
only after conntrackd's commit and still draw the replies within milliseconds.

Topology (TEST-NET-2, all in namespaces this test makes):

    PREFIX-a  a0 198.51.100.10 ──┐
    PREFIX-b  b0 198.51.100.11 ──┤ br0 in PREFIX-s
    PREFIX-h  h0 198.51.100.20 ──┘
    the NAT address: 198.51.100.12

Everything is removed at the end, also on failure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from conftest import new_prefix

from gatepeer.ha.nat_address import NatAddress
from gatepeer.lab.network import netns

pytestmark = [pytest.mark.netns]

SNAT = IPv4Address("198.51.100.12")
PEERS = {"a": "198.51.100.10", "b": "198.51.100.11", "h": "198.51.100.20"}


@pytest.fixture
def segment() -> Iterator[dict[str, str]]:
    prefix = new_prefix()
    ns = {n: f"{prefix}-{n}" for n in ("s", *PEERS)}
    try:
        for name in ns.values():
            netns.run(["ip", "netns", "add", name])
            netns.ip(name, "link", "set", "lo", "up")
        netns.ip(ns["s"], "link", "add", "br0", "type", "bridge")
        netns.ip(ns["s"], "link", "set", "br0", "up")
        for short, address in PEERS.items():
            dev = f"{short}0"
            netns.ip(ns["s"], "link", "add", f"p{short}", "type", "veth", "peer", dev,
                     "netns", ns[short])  # fmt: skip
            netns.ip(ns["s"], "link", "set", f"p{short}", "master", "br0", "up")
            netns.ip(ns[short], "addr", "add", f"{address}/24", "dev", dev)
            netns.ip(ns[short], "link", "set", dev, "up")
        yield ns
    finally:
        for name in ns.values():
            netns.run(["ip", "netns", "delete", name], check=False)


def mac(ns: str, dev: str) -> str:
    return str(netns.ip_json(ns, "link", "show", "dev", dev)[0]["address"])


def addresses(ns: str, dev: str) -> list[str]:
    links = netns.ip_json(ns, "-4", "addr", "show", "dev", dev)
    return [f"{a['local']}/{a['prefixlen']}" for link in links for a in link["addr_info"]]


def host_sees(ns: str) -> str | None:
    """The MAC the VPC host's neighbour table has for the NAT address."""
    entries = netns.ip_json(ns, "neigh", "show", str(SNAT))
    return str(entries[0]["lladdr"]) if entries and "lladdr" in entries[0] else None


def wait_for(predicate: object, what: str, timeout: float = 3.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.02)


def test_hold_answers_and_a_takeover_moves_the_neighbour_entry_at_once(
    segment: dict[str, str],
) -> None:
    a = NatAddress(SNAT, lambda: "a0")
    b = NatAddress(SNAT, lambda: "b0")
    assert netns.call_in_netns(segment["a"], a.hold) == []
    assert netns.call_in_netns(segment["a"], a.hold) == []  # idempotent
    assert addresses(segment["a"], "a0") == ["198.51.100.10/24", f"{SNAT}/32"]
    # The VPC host reaches the address: its neighbour entry names a0.
    netns.run(netns.exec_in(segment["h"], ["ping", "-c", "1", "-W", "2", str(SNAT)]))
    assert host_sees(segment["h"]) == mac(segment["a"], "a0")

    # b takes over (a has released, as a backup does): the host's entry follows b's gratuitous
    # ARP without sending anything itself.
    assert netns.call_in_netns(segment["a"], a.release) == []
    assert netns.call_in_netns(segment["a"], a.release) == []  # idempotent
    assert addresses(segment["a"], "a0") == ["198.51.100.10/24"]
    assert netns.call_in_netns(segment["b"], b.hold) == []
    wait_for(
        lambda: host_sees(segment["h"]) == mac(segment["b"], "b0"),
        f"the host still sends {SNAT} to {host_sees(segment['h'])}",
    )
    netns.run(netns.exec_in(segment["h"], ["ping", "-c", "1", "-W", "2", str(SNAT)]))


def test_an_unknown_interface_is_a_failure_line_not_an_exception(
    segment: dict[str, str],
) -> None:
    missing = NatAddress(SNAT, lambda: "nope0")
    assert netns.call_in_netns(segment["a"], missing.hold) == [
        f"ha.snat_address {SNAT}: no interface nope0"
    ]
    unknown = NatAddress(SNAT, lambda: None)
    assert netns.call_in_netns(segment["a"], unknown.release) == [
        f"ha.snat_address {SNAT}: the underlay interface is not known yet"
    ]
