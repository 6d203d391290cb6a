"""keepalived for real: two peers in network namespaces, each running keepalived from our
rendered config and our FIFO reader feeding a coordinator with a fake claim. The master's
underlay goes down; the backup's reader reports MASTER and claims. Measured with 1 s and 0.1 s
adverts (printed; docs/ha.md has the figures; never asserted as a limit).

Topology (198.18.0.0/24 only, all in namespaces this test makes):

    PREFIX-a  eth0 198.18.0.10 ─┐
                                ├─ PREFIX-sw  br0   (a switch: a's link going down does not
    PREFIX-b  eth0 198.18.0.11 ─┘                    take b's carrier with it)

Each peer also has vxlan0 (tracked by keepalived, as the tunnel is). The health check is
`test -e FLAG` here (healthy while the flag file exists): `gatepeer check` needs a whole gate
peer; tests/unit/test_ha_check.py covers it.
Everything is removed at the end, also on failure; keepalived is stopped by the pids we started.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import new_prefix

from gatepeer.config import HaConfig
from gatepeer.ha.fifo import NotifyFifo
from gatepeer.ha.keepalived import HaFacts, render
from gatepeer.ha.role import Coordinator, follow

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ADDRESSES = {"a": "198.18.0.10", "b": "198.18.0.11"}
TEST = shutil.which("test") or "/usr/bin/test"


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


def in_ns(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args)


@dataclass
class Peer:
    name: str
    ns: str
    address: str
    fifo_path: Path
    log_path: Path
    claims: list[float] = field(default_factory=list)  # monotonic time of each claim
    conf: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    coordinator: Coordinator | None = None

    @property
    def healthy(self) -> Path:
        return self.fifo_path.with_name(f"healthy-{self.name}")

    def claim(self) -> None:
        self.claims.append(time.monotonic())

    @property
    def role(self) -> str:
        assert self.coordinator is not None
        return self.coordinator.view().role


@contextlib.contextmanager
def two_peers(
    tmp_path: Path, advert: float, start: tuple[str, ...] = ("a", "b")
) -> Iterator[dict[str, Peer]]:
    prefix = new_prefix()
    sw = f"{prefix}-sw"
    peers = {
        n: Peer(n, f"{prefix}-{n}", a, tmp_path / f"{n}.fifo", tmp_path / f"keepalived-{n}.log")
        for n, a in ADDRESSES.items()
    }
    stop = threading.Event()
    threads: list[threading.Thread] = []
    fifos: list[NotifyFifo] = []
    try:
        sh("ip", "netns", "add", sw)
        in_ns(sw, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(sw, "ip", "link", "set", "br0", "up")
        for p in peers.values():
            sh("ip", "netns", "add", p.ns)
            host_side = f"{prefix}{p.name}"
            in_ns(sw, "ip", "link", "add", host_side, "type", "veth", "peer", "eth0", "netns", p.ns)
            in_ns(sw, "ip", "link", "set", host_side, "master", "br0", "up")
            in_ns(p.ns, "ip", "link", "set", "lo", "up")
            in_ns(p.ns, "ip", "addr", "add", f"{p.address}/24", "dev", "eth0")
            in_ns(p.ns, "ip", "link", "set", "eth0", "up")
            in_ns(p.ns, "ip", "link", "add", "vxlan0", "type", "vxlan", "id", "10", "local",
                  p.address, "dev", "eth0", "dstport", "4789")  # fmt: skip
            in_ns(p.ns, "ip", "link", "set", "vxlan0", "up")
        for p in peers.values():
            other = next(q for q in peers.values() if q is not p)
            ha = HaConfig(
                peer_address=ipaddress.IPv4Address(other.address),
                priority=150 if p.name == "a" else 100,
                advert_interval=advert,
                check_rise=1,
                notify_fifo=p.fifo_path,
                conntrack_sync=False,  # keepalived alone here (no sync script, no conntrackd)
            )
            # The health check: healthy while the peer's flag file exists.
            p.healthy.touch()
            check = (TEST, "-e", str(p.healthy))
            facts = HaFacts(ipaddress.IPv4Address(p.address), "eth0", "vxlan0", check)
            conf = tmp_path / f"keepalived-{p.name}.conf"
            conf.write_text(render(ha, facts))
            # Our reader first, as the daemon starts before keepalived: we own the FIFO.
            fifo = NotifyFifo(p.fifo_path)
            fifo.open()
            fifos.append(fifo)
            p.coordinator = Coordinator(p.claim)
            thread = threading.Thread(
                target=follow, args=(fifo.read, p.coordinator, stop, 0.02), daemon=True
            )
            thread.start()
            threads.append(thread)
            p.conf = conf
        for name in start:
            start_keepalived(peers[name])
        yield peers
    finally:
        for p in peers.values():
            stop_keepalived(p)
        stop.set()
        for thread in threads:
            thread.join(5)
        for fifo in fifos:
            fifo.close()
        for ns in [*(p.ns for p in peers.values()), sw]:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        left = set(sh("ip", "netns", "list").stdout.split()) & {sw, *(p.ns for p in peers.values())}
        assert not left, f"namespaces left behind: {left}"


def start_keepalived(p: Peer) -> None:
    assert p.conf is not None and p.proc is None
    run = p.conf.parent / f"run-{p.name}"
    run.mkdir(exist_ok=True)
    with open(p.log_path, "ab") as log:
        p.proc = subprocess.Popen(
            ["ip", "netns", "exec", p.ns, "keepalived", "--dont-fork", "--log-console",
             "--no-syslog", "--log-detail", "-f", str(p.conf),
             "-p", str(run / "keepalived.pid"), "-r", str(run / "vrrp.pid")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def stop_keepalived(p: Peer) -> None:
    """SIGTERM to the keepalived we started (`ip netns exec` execs in place: proc.pid is it);
    its VRRP child, whose pid it wrote, is killed too if it outlives the parent."""
    if p.proc is None or p.conf is None:
        return
    child = None
    with contextlib.suppress(OSError, ValueError):
        child = int((p.conf.parent / f"run-{p.name}" / "vrrp.pid").read_text().strip())
    if p.proc.poll() is None:
        p.proc.send_signal(signal.SIGTERM)
        try:
            p.proc.wait(10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait(5)
    if child is not None and Path(f"/proc/{child}").exists():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"keepalived" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    p.proc = None


def wait_for(predicate: object, timeout: float, what: str, peers: dict[str, Peer]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    logs = "\n".join(f"--- {p.name}\n{p.log_path.read_text()[-2500:]}" for p in peers.values())
    roles = {n: p.role for n, p in peers.items()}
    raise AssertionError(f"{what} not reached within {timeout} s; roles {roles}\n{logs}")


def failover(tmp_path: Path, advert: float, failure: str = "link down") -> float:
    with two_peers(tmp_path, advert) as peers:
        a, b = peers["a"], peers["b"]
        wait_for(
            lambda: {a.role, b.role} == {"master", "backup"},
            10 + 10 * advert,
            "one master and one backup",
            peers,
        )
        master, backup = (a, b) if a.role == "master" else (b, a)
        assert len(master.claims) == 1 and backup.claims == []
        cut_at = time.monotonic()
        if failure == "link down":  # the underlay, as when the instance or its ENI fails
            in_ns(master.ns, "ip", "link", "set", "eth0", "down")
        elif failure == "tunnel deleted":  # track_interface
            in_ns(master.ns, "ip", "link", "delete", "vxlan0")
        else:  # the health check starts failing (vrrp_script, fall times)
            master.healthy.unlink()
        wait_for(lambda: backup.role == "master" and backup.claims, 10 + 10 * advert,
                 "the backup taking over", peers)  # fmt: skip
        took = backup.claims[0] - cut_at
        wait_for(lambda: master.role == "fault", 5, "the old master in FAULT", peers)
        assert len(master.claims) == 1  # the old master never claimed again
        # Both sides saw the change through their FIFO, in order, with a timestamp.
        assert backup.coordinator is not None and backup.coordinator.view().transitions >= 2
        return took


@pytest.mark.parametrize("advert", [1.0, 0.1], ids=["advert-1s", "advert-100ms"])
def test_backup_takes_over_when_the_masters_link_goes_down(
    tmp_path: Path, advert: float, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("keepalived") is None:
        pytest.skip("keepalived is not installed")
    took = failover(tmp_path, advert)
    with capsys.disabled():
        print(f"\nfailover with {advert:g} s adverts: link down -> backup's claim {took:.3f} s")
    # VRRP's own bound: the backup waits 3 adverts plus a skew under one advert. Only a
    # sanity bound against a broken chain, not a performance limit.
    assert took < 3 * advert + advert + 5


def test_graceful_stop_hands_over_and_the_returning_peer_stays_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keepalived stopping sends a priority-0 advert: the backup takes over without waiting
    out three adverts. The higher-priority peer coming back stays backup (nopreempt)."""
    if shutil.which("keepalived") is None:
        pytest.skip("keepalived is not installed")
    advert = 0.1
    with two_peers(tmp_path, advert, start=("a",)) as peers:
        a, b = peers["a"], peers["b"]  # a has priority 150, b 100
        wait_for(lambda: a.role == "master", 10, "a alone becoming master", peers)
        start_keepalived(b)
        wait_for(lambda: b.role == "backup", 10, "b joining as backup", peers)
        stopped_at = time.monotonic()
        stop_keepalived(a)
        wait_for(lambda: b.role == "master" and b.claims, 10, "b taking over", peers)
        took = b.claims[0] - stopped_at
        wait_for(lambda: a.role == "stopped", 5, "a's STOP through its FIFO", peers)
        start_keepalived(a)
        wait_for(lambda: a.role == "backup", 10, "a back as backup", peers)
        # Well past the time a pre-empting peer would take (3 adverts + skew + check rise).
        time.sleep(3 * advert + 1.5)
        assert (a.role, b.role) == ("backup", "master")
        assert len(a.claims) == 1 and len(b.claims) == 1
    with capsys.disabled():
        print(f"\ngraceful stop with {advert:g} s adverts: SIGTERM -> backup's claim {took:.3f} s")


@pytest.mark.parametrize("failure", ["tunnel deleted", "check failing"])
def test_a_broken_master_hands_the_role_over(
    tmp_path: Path, failure: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("keepalived") is None:
        pytest.skip("keepalived is not installed")
    took = failover(tmp_path, 0.1, failure)
    with capsys.disabled():
        print(f"\n{failure} on the master, 0.1 s adverts: -> backup's claim {took:.3f} s")
    assert took < 10
