"""The NAT address in keepalived's no_accept mode, for real: keepalived (from gatepeer's
rendering) holds `ha.snat_address` on a peer that source-NATs a device's flows to it. A NATed TCP
echo still works (its replies are rewritten in prerouting and forwarded), while a packet for
the address that no connection knows is dropped: no reset, and no conntrack entry that would
clash with one conntrackd commits later. That is the window between keepalived taking the
address on a new master and conntrackd's commit.

Topology (the device range and TEST-NET-2, all in namespaces this test makes):

    PREFIX-d (device)  d0 198.19.128.9 ── m0 198.19.128.1    PREFIX-m (the peer)
    PREFIX-m           m1 198.51.100.10 ── h0 198.51.100.20  PREFIX-h (a VPC host)
    the peer source-NATs the device's flows to 198.51.100.12, keepalived's /32 on m1

keepalived's unicast peer (198.51.100.99) does not exist, so it becomes master by itself.
Everything is removed at the end, also on failure; processes are stopped by their pids.
"""

from __future__ import annotations

import ipaddress
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import new_prefix

from gatepeer.config import HaConfig
from gatepeer.ha.keepalived import HaFacts, render
from gatepeer.lab.network import netns

pytestmark = [pytest.mark.netns]

SNAT = "198.51.100.12"
HOST = "198.51.100.20"
DEVICE = "198.19.128.9"
TEST = shutil.which("test") or "/usr/bin/test"

if not shutil.which("keepalived"):
    pytest.skip("keepalived is not installed (Debian package keepalived)", allow_module_level=True)


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[dict[str, str]]:
    prefix = new_prefix()
    ns = {n: f"{prefix}-{n}" for n in ("d", "m", "h")}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name in ns.values():
            netns.run(["ip", "netns", "add", name])
            netns.ip(name, "link", "set", "lo", "up")
        netns.ip(ns["d"], "link", "add", "d0", "type", "veth", "peer", "m0", "netns", ns["m"])
        netns.ip(ns["m"], "link", "add", "m1", "type", "veth", "peer", "h0", "netns", ns["h"])
        for name, dev, address in (
            (ns["d"], "d0", f"{DEVICE}/24"),
            (ns["m"], "m0", "198.19.128.1/24"),
            (ns["m"], "m1", "198.51.100.10/24"),
            (ns["h"], "h0", f"{HOST}/24"),
        ):
            netns.ip(name, "addr", "add", address, "dev", dev)
            netns.ip(name, "link", "set", dev, "up")
        netns.ip(ns["d"], "route", "add", "default", "via", "198.19.128.1")
        netns.run(["ip", "netns", "exec", ns["m"], "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        netns.run(
            ["ip", "netns", "exec", ns["m"], "nft",
             "add table ip t; add chain ip t post { type nat hook postrouting priority 100; }; "
             f"add rule ip t post ip saddr 198.19.128.0/24 oifname m1 snat to {SNAT}"]
        )  # fmt: skip
        ha = HaConfig(
            peer_address=ipaddress.IPv4Address("198.51.100.99"),
            advert_interval=0.1,
            snat_address=ipaddress.IPv4Address(SNAT),
            conntrack_sync=False,  # keepalived alone here
            check_rise=1,
            notify_fifo=tmp_path / "ka.fifo",
        )
        flag = tmp_path / "healthy"
        flag.touch()
        facts = HaFacts(
            ipaddress.IPv4Address("198.51.100.10"), "m1", "m1", (TEST, "-e", str(flag)), "m1"
        )
        conf = tmp_path / "keepalived.conf"
        conf.write_text(render(ha, facts).replace("    unicast_fault_no_peer\n", ""))
        processes.append(
            subprocess.Popen(
                ["ip", "netns", "exec", ns["m"], "keepalived", "-n", "-l", "-D", "-f", str(conf),
                 "-p", str(tmp_path / "ka.pid"), "-r", str(tmp_path / "vrrp.pid")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while SNAT not in netns.ip(ns["m"], "-4", "addr", "show", "dev", "m1").stdout:
            if time.monotonic() > deadline:
                raise AssertionError("keepalived did not take the NAT address")
            time.sleep(0.1)
        processes.append(
            subprocess.Popen(
                ["ip", "netns", "exec", ns["h"], "python3", "-c", ECHO_SERVER],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        yield ns
    finally:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for name in ns.values():
            netns.run(["ip", "netns", "delete", name], check=False)


ECHO_SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{HOST}", 7))
s.listen()
while True:
    c, _ = s.accept()
    with c:
        while data := c.recv(100):
            c.sendall(data)
"""


def echo_through_nat() -> tuple[str, int]:
    deadline = time.monotonic() + 5
    while True:
        try:
            with socket.create_connection((HOST, 7), timeout=2) as s:
                s.sendall(b"x" * 32)
                return s.getpeername()[0], len(s.recv(100))
        except ConnectionRefusedError:
            if time.monotonic() > deadline:  # the server may still be starting
                raise
            time.sleep(0.1)


def connect_to_snat() -> str:
    s = socket.socket()
    s.settimeout(1.5)
    try:
        s.connect((SNAT, 5555))
        return "connected"
    except ConnectionRefusedError:
        return "reset"
    except TimeoutError:
        return "dropped"
    finally:
        s.close()


def test_nat_works_and_unknown_packets_for_the_nat_address_are_dropped(
    peer: dict[str, str],
) -> None:
    assert netns.call_in_netns(peer["d"], echo_through_nat) == (HOST, 32)
    # From the VPC host's side: no connection knows this one, and no reset comes back.
    assert netns.call_in_netns(peer["h"], connect_to_snat) == "dropped"
    listed = netns.run(["ip", "netns", "exec", peer["m"], "conntrack", "-L", "-p", "tcp"])
    assert "dport=5555" not in listed.stdout  # no entry left to clash with a commit
    # The check can fail: without keepalived's table the peer's own stack answers with a reset.
    netns.run(["ip", "netns", "exec", peer["m"], "nft", "delete", "table", "ip", "keepalived"])
    assert netns.call_in_netns(peer["h"], connect_to_snat) == "reset"
