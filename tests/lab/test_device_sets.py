"""The device sets read over netlink (`kernel.device_sets`) give what nft's own listing gives
(`nftables.device_traffic`, `nft -j list set`): the same addresses, the same counters each way,
the same ages to nft's whole seconds. In a namespace of the test's own: the packet path's
device table, with a probe chain that counts the namespace's own loopback packets (no
forwarding needed), elements added without traffic, one with a timeout of its own, and enough
elements that the kernel answers in many messages."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from helpers.ruleset_specs import spec

from gatepeer.kernel import device_sets
from gatepeer.kernel import nftables as nf
from gatepeer.ruleset import DEVICES_FROM_SET, DEVICES_TO_SET, device_table

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables (`nft` not found)"),
]

MANY = 3000  # elements per set: hundreds of netlink messages, several reads of the socket
FIRST = int(IPv4Address("198.19.128.1"))


def _run(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"gtds{secrets.token_hex(4)}"
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def _nft(ns: str, script: str) -> None:
    _run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=script)


def test_no_device_table_reads_empty(namespace: str) -> None:
    assert len(device_sets.device_reading(namespace)) == 0
    _nft(namespace, "table inet other {\n}\n")  # another table is no device table
    assert len(device_sets.device_reading(namespace)) == 0


def test_an_absent_namespace_is_said() -> None:
    with pytest.raises(device_sets.DeviceSetsError, match="does not exist"):
        device_sets.device_reading(f"gtds-absent-{secrets.token_hex(4)}")


def test_the_netlink_reading_is_nfts_listing(namespace: str) -> None:
    ns = namespace
    nf.load(spec(device_counters=True), ns)
    table = device_table(spec(device_counters=True))
    # Counted by a probe chain: 127.0.0.2 both ways, 127.0.0.3 and .1 only "to".
    rule = f"add rule inet {table} probe ip daddr"
    _nft(
        ns,
        f"add chain inet {table} probe {{ type filter hook output priority filter; }}\n"
        f"{rule} 127.0.0.2 update @{DEVICES_FROM_SET} {{ ip daddr }}\n"
        f"{rule} 127.0.0.0/8 update @{DEVICES_TO_SET} {{ ip daddr }}\n",
    )
    for target, count in (("127.0.0.2", 3), ("127.0.0.3", 2)):
        _run("ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.1", target)
    many = ", ".join(str(IPv4Address(FIRST + i)) for i in range(MANY))
    _nft(
        ns,
        f"add element inet {table} {DEVICES_FROM_SET} {{ {many} }}\n"
        f"add element inet {table} {DEVICES_TO_SET} {{ {many} }}\n"
        # An element with a timeout of its own: laid out otherwise by the kernel.
        f"add element inet {table} {DEVICES_TO_SET} {{ 198.19.200.1 timeout 2h expires 100s }}\n",
    )
    time.sleep(1.2)  # the pings' elements a second old
    listed = nf.device_traffic(ns)
    read = device_sets.device_reading(ns)
    got = read.traffic()
    assert len(got) == MANY + 4 == len(listed)
    assert list(got) == sorted(got)  # by address
    for address, want in listed.items():
        have = got[address]
        counts = (have.packets_from_device, have.bytes_from_device)
        counts += (have.packets_to_device, have.bytes_to_device)
        assert counts == (
            want.packets_from_device,
            want.bytes_from_device,
            want.packets_to_device,
            want.bytes_to_device,
        ), address
        assert have.last_packet_age_s is not None and want.last_packet_age_s is not None
        if address != IPv4Address("198.19.200.1"):  # nft takes every timeout as the set's
            assert abs(have.last_packet_age_s - want.last_packet_age_s) <= 1.5, address
    two, three = got[IPv4Address("127.0.0.2")], got[IPv4Address("127.0.0.3")]
    assert (two.packets_from_device, two.bytes_from_device) == (3, 3 * 84)
    assert (two.packets_to_device, two.bytes_to_device) == (3, 3 * 84)
    assert (three.packets_from_device, three.packets_to_device) == (0, 2)
    assert three.last_packet_age_s is not None and 1.0 <= three.last_packet_age_s <= 5.0
    # Its own timeout (2 h) less the 100 s it was given: about 7,100 s since its "last packet".
    own = got[IPv4Address("198.19.200.1")].last_packet_age_s
    assert own is not None and 7099 <= own <= 7110
