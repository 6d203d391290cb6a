"""conntrackd for real: two peers in network namespaces, each running conntrackd from the file
gatepeer renders. A device-subnet flow on peer a reaches peer b's external cache (read through
gatepeer's SyncTracker), the master handover on b commits it into b's kernel table, and when a's
conntrackd stops, b hears nothing more.

Topology (TEST-NET-2 and the device range only, all in namespaces this test makes):

    PREFIX-a  sa0 198.51.100.1 ── veth ── sb0 198.51.100.2  PREFIX-b
              lo  198.19.128.9 (a device address: its flows are the device subnet's)
              d0  203.0.113.1/24 (a veth to nowhere: the flows' way out, so b never sees them)

Each namespace gets a one-rule nftables table that uses conntrack: without one, this kernel
tracks nothing in the namespace (conntrack hooks register on first use), and there is nothing
to sync. conntrackd's sockets, lock files and configs live in the test's tmp_path. Everything is
removed at the end, also on failure; conntrackd is stopped by the pids this test started.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import new_prefix

from gatepeer.config import HaConfig
from gatepeer.ha.conntrackd import (
    Conntrackd,
    SyncFacts,
    SyncReadError,
    SyncTracker,
    conntrackd_test,
    render,
)
from gatepeer.lab.network import netns

pytestmark = [pytest.mark.netns]

ADDRESSES = {"a": "198.51.100.1", "b": "198.51.100.2"}
DEVICE = "198.19.128.9"
DEVICE_SUBNET = ipaddress.IPv4Network("198.19.128.0/17")
FLOWS = 5
TARGET = "203.0.113.50"

if not shutil.which("conntrackd"):
    pytest.skip("conntrackd is not installed (Debian package conntrackd)", allow_module_level=True)


@dataclass
class Peer:
    name: str
    ns: str
    conf: Path
    ctl: Conntrackd
    process: subprocess.Popen[bytes] | None = None


def wait_for(what: str, probe: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def in_ns(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *args], check=True, capture_output=True, text=True, timeout=30
    )


def run_in(ns: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """conntrackd's client commands, run in the peer's namespace (its socket is a file, but
    `-c` and `-R` act on the kernel table of the namespace they run in: the daemon's)."""

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30
        )

    return run


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, Peer]]:
    prefix = new_prefix()
    peers = {
        name: Peer(name, f"{prefix}-{name}", tmp_path / f"{name}.conf", Conntrackd(Path()))
        for name in ADDRESSES
    }
    try:
        for p in peers.values():
            netns.run(["ip", "netns", "add", p.ns])
            netns.ip(p.ns, "link", "set", "lo", "up")
        a, b = peers["a"], peers["b"]
        netns.ip(a.ns, "link", "add", "sa0", "type", "veth", "peer", "sb0", "netns", b.ns)
        for p, dev in ((a, "sa0"), (b, "sb0")):
            netns.ip(p.ns, "addr", "add", f"{ADDRESSES[p.name]}/24", "dev", dev)
            netns.ip(p.ns, "link", "set", dev, "up")
            in_ns(p.ns, "nft", "add table inet t; add chain inet t out { type filter hook "
                  "output priority 0; }; add rule inet t out ct state new counter")  # fmt: skip
            other = next(q for q in peers.values() if q is not p)
            ha = HaConfig(
                peer_address=ipaddress.IPv4Address(ADDRESSES[other.name]),
                conntrackd_socket=tmp_path / f"{p.name}.ctl",
            )
            facts = SyncFacts(ipaddress.IPv4Address(ADDRESSES[p.name]), dev, DEVICE_SUBNET, 65536)
            text = render(ha, facts)
            assert conntrackd_test(text) is None
            p.conf.write_text(
                text
            )  # exactly the rendered file (no systemd here: notify is a no-op)
            p.ctl = Conntrackd(p.conf, run=run_in(p.ns))
        netns.ip(a.ns, "addr", "add", f"{DEVICE}/32", "dev", "lo")
        netns.ip(a.ns, "link", "add", "d0", "type", "veth", "peer", "d1")
        netns.ip(a.ns, "addr", "add", "203.0.113.1/24", "dev", "d0")
        for dev in ("d0", "d1"):
            netns.ip(a.ns, "link", "set", dev, "up")
        netns.ip(a.ns, "neigh", "add", TARGET, "lladdr", "02:00:00:00:00:01", "dev", "d0")
        for p in peers.values():
            p.process = subprocess.Popen(
                ["ip", "netns", "exec", p.ns, "conntrackd", "-C", str(p.conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for p in peers.values():
            wait_for(f"conntrackd in {p.ns}", lambda p=p: answers(p.ctl))
        yield peers
    finally:
        for p in peers.values():
            if p.process is not None and p.process.poll() is None:
                p.process.send_signal(signal.SIGTERM)
                try:
                    p.process.wait(10)
                except subprocess.TimeoutExpired:
                    p.process.kill()
                    p.process.wait(5)
        for p in peers.values():
            netns.run(["ip", "netns", "delete", p.ns], check=False)


def answers(ctl: Conntrackd) -> bool:
    try:
        ctl.stats()
    except SyncReadError:
        return False
    return True


def device_flows(ns: str, count: int) -> None:
    """`count` UDP flows from the device address to a host behind the dummy link (conntrack
    creates and reports each: real events, as forwarded device traffic makes)."""

    def send() -> None:
        for port in range(40000, 40000 + count):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((DEVICE, port))
                s.sendto(b"x", (TARGET, 9))

    netns.call_in_netns(ns, send)


def kernel_flows(ns: str) -> list[str]:
    out = in_ns(ns, "conntrack", "-L", "-s", DEVICE)
    return [line for line in out.stdout.splitlines() if f"src={DEVICE}" in line]


def test_a_flow_on_the_master_is_committed_on_the_backup(pair: dict[str, Peer]) -> None:
    a, b = pair["a"], pair["b"]
    tracker_b = SyncTracker(b.ctl.stats)
    first = tracker_b.update()
    assert first.error is None and first.external_entries == 0
    device_flows(a.ns, FLOWS)

    def external() -> bool:
        return (tracker_b.update().external_entries or 0) >= FLOWS

    wait_for("the flows in b's external cache", external)
    health = tracker_b.health()
    assert health is not None and health.last_message_at is not None and health.errors == 0
    assert kernel_flows(b.ns) == []  # a backup's kernel holds none of them yet
    assert b.ctl.handover("master") == []
    assert len(kernel_flows(b.ns)) == FLOWS
    after = tracker_b.update()
    # -R resynced b's internal cache with its kernel: b now owns the flows it will forward.
    assert (after.internal_entries or 0) >= FLOWS
    # a, now backup, asks b for a resync (-n) and shortens its own timers (-t).
    assert a.ctl.handover("backup") == []


def test_the_backup_hears_nothing_once_the_masters_conntrackd_stops(
    pair: dict[str, Peer],
) -> None:
    a, b = pair["a"], pair["b"]
    clock = [0.0]
    tracker_b = SyncTracker(b.ctl.stats, clock=lambda: clock[0])
    wait_for("an ALIVE message from a", lambda: (tracker_b.update().messages_received or 0) > 1)
    heard = tracker_b.health()
    assert heard is not None
    assert a.process is not None
    a.process.send_signal(signal.SIGTERM)
    a.process.wait(10)
    time.sleep(0.3)
    clock[0] = 50.0
    tracker_b.update()  # whatever was in flight when a stopped
    time.sleep(2.5)  # FTFW's idle ALIVE comes every second: two would have arrived
    clock[0] = 100.0
    silent = tracker_b.update()
    assert silent.error is None
    assert silent.last_message_at is not None and silent.last_message_at <= 50.0
    with contextlib.suppress(SyncReadError):
        a.ctl.stats()
        raise AssertionError("a's conntrackd still answers after SIGTERM")
