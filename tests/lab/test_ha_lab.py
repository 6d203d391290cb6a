"""High availability end to end: a two-peer lab (`lab up --peers 2`), `gatepeer run` and
keepalived in both gate peer namespaces (`lab ha start`), traffic from a device to the VPC host
while the master fails in the ways docs/ha.md lists. Each test measures what the traffic saw
(packets lost, the longest gap between answers) and prints it; the figures are never asserted
as limits, only that traffic resumes through the peer that holds the gateway.

The pair runs nat mode (the lab's VPC host routes the device subnet to peer 1 only). One lab
serves the whole module; each test starts by waiting for one master, one backup and the VPG's
redirection gateway on the master, whichever peer that is. Everything is stopped by pid and
removed at the end, also on failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from conftest import new_prefix
from helpers.ha_lab import HaLab

from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import VPC_HOST_ADDR, GatePeer, Layout
from gatepeer.lab.processes import ha_pair, vpc_routes
from gatepeer.lab.record import Paths

pytestmark = [pytest.mark.netns, pytest.mark.slow]

# A ping every 10 ms from a device to the VPC host: the outage's resolution.
PING_INTERVAL = 0.01


@dataclass
class Pair(HaLab):
    """The pair as helpers/ha_lab.py looks at it, and the route table once a test switched it
    to route mode."""

    route_table: vpc_routes.RouteTable | None = None


@dataclass
class Traffic:
    """What a run of pings saw: sent, answered, and the longest silence between answers."""

    sent: int
    received: int
    longest_gap: float  # seconds between two consecutive answers
    gap_started: float  # wall-clock time of the answer before the longest gap
    answers: list[float]

    @property
    def lost(self) -> int:
        return self.sent - self.received

    def answered_after(self, when: float) -> int:
        return sum(1 for t in self.answers if t > when)

    def line(self) -> str:
        return (
            f"{self.lost} of {self.sent} pings lost, longest gap {self.longest_gap:.3f} s "
            f"(one ping every {PING_INTERVAL * 1000:g} ms)"
        )


class Pinger:
    """ping -D from the first device to the VPC host, for at most `seconds`, in the background;
    its output goes to a file (a pipe nobody reads would fill and stall ping)."""

    def __init__(self, pair: Pair, seconds: float) -> None:
        device = str(pair.layout.devices[0])
        self.out = pair.paths.dir / f"ping-{time.monotonic_ns()}.txt"
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", pair.layout.dev_ns, "ping", "-D", "-n",
                 "-i", str(PING_INTERVAL), "-w", str(math.ceil(seconds)), "-I", device,
                 str(VPC_HOST_ADDR)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        time.sleep(1.0)  # a second of answers before the event

    def result(self) -> Traffic:
        """Waits for ping to finish (its deadline, or `stop`), then reads what it saw."""
        self.proc.wait(timeout=120)
        text = self.out.read_text()
        answers = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", text, re.M)]
        summary = re.search(r"(\d+) packets transmitted, (\d+) received", text)
        assert summary and answers, f"ping gave no answers:\n{text[-2000:]}"
        gaps = [(b - a, a) for a, b in zip(answers, answers[1:], strict=False)] or [(0.0, 0.0)]
        gap, start = max(gaps)
        return Traffic(int(summary[1]), int(summary[2]), gap, start, answers)

    def stop(self) -> None:
        """SIGINT: ping prints its summary and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    if shutil.which("keepalived") is None:
        pytest.skip("keepalived is not installed (Debian: keepalived)")
    if shutil.which("ping") is None:
        pytest.skip("ping is not installed (Debian: iputils-ping)")
    from gatepeer.lab import control

    layout = Layout(prefix=new_prefix(), peer_count=2)
    try:
        info = control.up(layout)
        handle = Pair(layout, info.paths)
        ha_pair.start_pair(layout, info.paths)
        yield handle
    finally:
        control.down(layout.prefix)
        left = control.lab_namespaces(layout.prefix)
        assert not left, f"namespaces left behind: {left}"
        assert not Paths.for_prefix(layout.prefix).dir.exists()


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[ha lab] {text}")


# ---- rendering ----------------------------------------------------------------------------


def test_each_peer_runs_keepalived_from_the_config_gatepeer_rendered(pair: Pair) -> None:
    master, backup = pair.settled()
    for p in pair.peers:
        conf = pair.paths.peer_file(p.index, "keepalived.conf")
        text = conf.read_text()
        other = next(q for q in pair.peers if q != p)
        assert f"unicast_src_ip {p.address}\n" in text, text
        assert f"unicast_peer {{\n        {other.address}\n" in text, text
        checked = subprocess.run(
            ["keepalived", "-t", "-f", str(conf)], capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, checked.stderr
    # Peer 1 is master before peer 2 starts (start_pair waits): only it claimed.
    assert master.index == 1 and pair.claims(master) >= 1 and pair.claims(backup) == 0
    # With [ha], soracom.redirection = "self" does not make the backup post: no degraded
    # finding about the gateway being elsewhere, and it stays on the master.
    assert pair.state(backup)["health"] == "ok", pair.state(backup)["reasons"]


# ---- hard failure: the master's underlay goes down ----------------------------------------


@pytest.mark.parametrize("advert", [1.0, 0.1], ids=["advert-1s", "advert-100ms"])
def test_hard_failure_traffic_moves_to_the_backup(
    pair: Pair, advert: float, capsys: pytest.CaptureFixture[str]
) -> None:
    pair.set_advert(advert)
    master, backup = pair.settled()
    pinger = Pinger(pair, 1 + 4 * advert + 3)
    try:
        cut = time.time()
        # The VPC side of the master's ENI: its carrier goes, its own routes stay (taking its
        # eth0 down would flush them, and nothing here plays the VPC's DHCP to restore them).
        netns.ip(pair.layout.fabric_ns, "link", "set", "dev", master.fabric_port, "down")
        took = pair.wait(lambda: pair.holder() == backup, 10 + 10 * advert, "gateway moved")
        traffic = pinger.result()
    finally:
        pinger.stop()
        netns.ip(pair.layout.fabric_ns, "link", "set", "dev", master.fabric_port, "up")
    assert pair.role(backup) == "master"
    assert traffic.answered_after(cut + took) > 0, "no traffic through the new master"
    report(
        capsys,
        f"hard failure, {advert:g} s adverts: gateway moved {took:.3f} s after the cut; "
        + traffic.line(),
    )
    # The old master comes back as backup (nopreempt), and the gateway stays.
    new_master, _ = pair.settled()
    assert new_master == backup


# ---- graceful stop and return ---------------------------------------------------------------


def test_graceful_stop_and_return_keeps_the_new_master(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    pair.set_advert(0.1)
    master, backup = pair.settled()
    pinger = Pinger(pair, 4)
    try:
        # As `lab ha stop` (and a host's shutdown) does: keepalived, then gatepeer, by pid.
        began, began_wall = time.monotonic(), time.time()
        assert ha_pair.stop_keepalived(pair.paths, master.index) is not None
        stopped = time.monotonic() - began  # keepalived's own exit
        pair.wait(lambda: pair.holder() == backup, 10, "gateway moved")
        # The backup's daemon read MASTER from its FIFO, then its claim was answered (wall
        # clock, from its state.json): keepalived's own exit takes longer than both.
        ha = pair.state(backup)["ha"]
        became, took = ha["since"] - began_wall, ha["claimed_at"] - began_wall
        assert ha_pair.stop_agent(pair.paths, master.index) is not None
        traffic = pinger.result()
    finally:
        pinger.stop()
    report(
        capsys,
        f"graceful stop (keepalived then gatepeer), 0.1 s adverts: after keepalived's SIGTERM "
        f"it exited in {stopped:.3f} s, the backup read MASTER at {became:.3f} s and had "
        f"claimed at {took:.3f} s; " + traffic.line(),
    )
    claims_before = pair.claims(backup)
    # Its conntrackd kept running (a unit of its own on a host): the return keeps that one
    # rather than starting a second that would outlive the lab.
    syncing = pair.paths.peer_file(master.index, "conntrackd.pid")
    kept = syncing.read_text().strip() if syncing.exists() else None
    started = ha_pair.start_peer(pair.paths, master)
    if kept is not None:
        assert str(started["conntrackd"]) == kept
    pair.wait(lambda: pair.role(master) == "backup", 20, "the returning peer as backup")
    time.sleep(3 * 0.1 + 2.0)  # past the time a pre-empting peer would take over
    assert (pair.role(master), pair.role(backup)) == ("backup", "master")
    assert pair.holder() == backup and pair.claims(backup) == claims_before


# ---- split brain ----------------------------------------------------------------------------


def test_split_brain_converges_to_one_master_and_one_gateway(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    pair.set_advert(0.1)
    master, backup = pair.settled()
    pinger = Pinger(pair, 60)  # stopped once healed
    try:
        for p in pair.peers:
            pair.block_vrrp(p)
        split = pair.wait(
            lambda: pair.role(master) == pair.role(backup) == "master", 10, "both masters"
        )
        # Both claimed; the last writer holds the gateway: the peer that just became master.
        pair.wait(lambda: pair.holder() == backup, 5, "the new master's claim")
        time.sleep(1.0)
        healed_at = time.time()
        for p in pair.peers:
            pair.unblock_vrrp(p)
        # One master again at the first advert heard. The one stepping down sends an advert at
        # its lower priority first (higher_prio_send_advert), so the winner hears
        # MASTER_RX_LOWER_PRI and claims again at once, rather than at its next refresh
        # (reconcile_interval, 10 s in the HA lab), which found the gateway on the backup.
        final_master, final_backup = pair.settled(timeout=45)
        healed = time.time() - healed_at
        time.sleep(0.5)  # traffic through the one master
        pinger.stop()
        traffic = pinger.result()
    finally:
        pinger.stop()
        for p in pair.peers:
            pair.unblock_vrrp(p)
    assert pair.holder() == final_master
    ha = pair.state(final_master)["ha"]
    heard = (ha.get("peer_lower_priority_at") or 0) >= healed_at
    how = "MASTER_RX_LOWER_PRI" if heard else "its next refresh"
    report(
        capsys,
        f"split brain, 0.1 s adverts: both master {split:.3f} s after VRRP was cut; gateway "
        f"went to the last writer ({backup.ns}); after healing, {final_master.ns} master and "
        f"holds the gateway {healed:.3f} s later (re-claimed on {how}); traffic: " + traffic.line(),
    )
    assert traffic.answered_after(healed_at + healed) > 0
    if final_master != backup:  # the gateway had to come back: the winner heard the loser
        assert heard, "the winner claimed back only at its next refresh"


def test_the_master_takes_back_a_gateway_written_after_its_claim(pair: Pair) -> None:
    """A late claim of a peer that was master only briefly (or a person) points the VPG at the
    backup after the master's claim. The master's next refresh sees it and claims again; the
    backup never posts. (SIGHUP makes the refresh come now instead of after 10 s.)"""
    from gatepeer.lab import control

    master, backup = pair.settled()
    claims = pair.claims(master)
    control.redirect(pair.layout.prefix, pair.inner(backup))
    assert pair.holder() == backup
    agent = int(pair.paths.peer_file(master.index, "gatepeer.pid").read_text())
    os.kill(agent, signal.SIGHUP)
    pair.wait(lambda: pair.holder() == master, 15, "the master claiming its gateway back")
    pair.wait(lambda: pair.claims(master) == claims + 1, 5, "the claim recorded")
    log = pair.paths.peer_file(master.index, "gatepeer.log").read_text()
    assert "claiming the gateway again" in log


# ---- a broken tunnel on the master ----------------------------------------------------------


def test_a_deleted_tunnel_on_the_master_hands_the_role_over(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    """vxlan0 deleted while its repair is blocked (the master's gatepeer is paused): keepalived
    tracks the tunnel and goes to FAULT; the backup claims. Resumed, gatepeer rebuilds the
    tunnel and the peer comes back as backup."""
    pair.set_advert(0.1)
    master, backup = pair.settled()
    agent = int(pair.paths.peer_file(master.index, "gatepeer.pid").read_text())
    pinger = Pinger(pair, 4)
    try:
        os.kill(agent, signal.SIGSTOP)
        netns.ip(master.ns, "link", "del", "dev", "vxlan0")
        took = pair.wait(lambda: pair.holder() == backup, 10, "gateway moved")
        traffic = pinger.result()
    finally:
        pinger.stop()
        os.kill(agent, signal.SIGCONT)
    # Resumed, the daemon reads keepalived's FAULT from the FIFO's backlog.
    pair.wait(lambda: pair.role(master) in ("fault", "backup"), 10, "the old master's FAULT")
    report(
        capsys,
        f"tunnel deleted on the master, 0.1 s adverts: gateway moved {took:.3f} s later; "
        + traffic.line(),
    )
    pair.wait(lambda: netns.link_exists(master.ns, "vxlan0"), 15, "gatepeer rebuilding vxlan0")
    new_master, _ = pair.settled()
    assert new_master == backup


def test_a_closed_vpg_path_fails_the_check_and_hands_the_role_over(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    """The master's tunnel traffic to and from the VPG is dropped (the link stays up): its
    probes stop being answered, the check verdict fails `fall` times, keepalived goes FAULT."""
    pair.set_advert(0.1)
    master, backup = pair.settled()
    table = "halab_vpgpath"
    ruleset = (
        f"table ip {table} {{\n"
        "  chain input { type filter hook input priority -10; udp dport 4789 drop; }\n"
        "  chain output { type filter hook output priority -10; udp dport 4789 drop; }\n"
        "}\n"
    )
    pinger = Pinger(pair, 15)
    try:
        closed = time.time()
        netns.run(netns.exec_in(master.ns, ["nft", "-f", "-"]), input=ruleset)
        took = pair.wait(lambda: pair.holder() == backup, 30, "gateway moved")
        time.sleep(1.5)  # traffic through the new master
        pinger.stop()
        traffic = pinger.result()
    finally:
        pinger.stop()
        netns.run(netns.exec_in(master.ns, ["nft", "delete", "table", "ip", table]), check=False)
    assert pair.role(master) == "fault"
    report(
        capsys,
        f"VPG path closed on the master (probes 1 s, check 1 s x fall 2): gateway moved "
        f"{took:.3f} s later; " + traffic.line(),
    )
    assert traffic.answered_after(closed + took) > 0
    new_master, _ = pair.settled()
    assert new_master == backup


def test_state_shows_the_role_for_status(pair: Pair) -> None:
    """state.json's "ha" is what `gatepeer status` and the metrics read (RoleView JSON)."""
    master, backup = pair.settled()
    for p, role in ((master, "master"), (backup, "backup")):
        ha = pair.state(p)["ha"]
        assert ha["role"] == role and ha["since"] is not None and ha["transitions"] >= 1
        assert json.dumps(ha)  # plain JSON values


# ---- vip mode: keepalived moves a virtual inner address; gatepeer leaves it alone --------

VIP = "198.19.0.100"  # in the device subnet's lower half, clear of what the emulator assigns


def restart_pair(pair: Pair, edit: Callable[[str], str]) -> None:
    ha_pair.stop_pair(pair.paths, len(pair.peers))
    for p in pair.peers:
        config = pair.paths.peer_config(p.index)
        config.write_text(edit(config.read_text()))
    ha_pair.start_pair(pair.layout, pair.paths)


def vip_holders(pair: Pair) -> list[GatePeer]:
    return [
        p
        for p in pair.peers
        if any(
            a.get("local") == VIP
            for link in netns.ip_json(p.ns, "addr", "show", "dev", "vxlan0")
            for a in link.get("addr_info", [])
        )
    ]


def test_vip_mode_moves_the_virtual_address_and_gatepeer_keeps_it(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    # [ha] is the last section of each config: the key goes at the end.
    restart_pair(pair, lambda text: text + f'virtual_address = "{VIP}"\n')
    try:
        pair.wait(lambda: pair.gateway() == VIP, 20, "the VIP as redirection gateway")
        master = next(p for p in pair.peers if pair.role(p) == "master")
        backup = next(p for p in pair.peers if p != master)
        pair.wait(lambda: vip_holders(pair) == [master], 10, "the VIP on the master only")
        # A reconcile (SIGHUP reloads and reconciles) leaves keepalived's address alone.
        before = pair.state(master)["counters"]["reconciles"]
        agent = int(pair.paths.peer_file(master.index, "gatepeer.pid").read_text())
        os.kill(agent, signal.SIGHUP)
        pair.wait(lambda: pair.state(master)["counters"]["reconciles"] > before, 10, "a reconcile")
        assert vip_holders(pair) == [master]
        assert pair.state(master)["owned_addresses"] == [pair.state(master)["gate"]["inner"]]
        pinger = Pinger(pair, 1 + 4 * pair.advert + 3)
        try:
            cut = time.time()
            netns.ip(pair.layout.fabric_ns, "link", "set", "dev", master.fabric_port, "down")
            took = pair.wait(
                lambda: vip_holders(pair)[-1:] == [backup] and pair.role(backup) == "master",
                10 + 10 * pair.advert,
                "the VIP on the new master",
            )
            traffic = pinger.result()
        finally:
            pinger.stop()
            netns.ip(pair.layout.fabric_ns, "link", "set", "dev", master.fabric_port, "up")
        assert pair.gateway() == VIP  # the gateway never changed; its owner did
        assert traffic.answered_after(cut + took) > 0, "no traffic through the new master"
        report(
            capsys,
            f"vip mode hard failure, {pair.advert:g} s adverts: VIP on the backup "
            f"{took:.3f} s after the cut; " + traffic.line(),
        )
        pair.wait(lambda: vip_holders(pair) == [backup], 20, "the VIP on the new master only")
    finally:
        restart_pair(pair, lambda text: text.replace(f'virtual_address = "{VIP}"\n', ""))


# ---- route mode: the VPC route table follows the master (EC2 stand-in) --------------------


def to_route_mode(pair: Pair, table: vpc_routes.RouteTable) -> None:
    """Both configs to route mode with the stand-in's route table; the pair restarted (the
    daemons read [ha] at start) with the stand-in's endpoint in their environment."""
    ha_pair.stop_pair(pair.paths, len(pair.peers))
    for p in pair.peers:
        config = pair.paths.peer_config(p.index)
        text = config.read_text().replace('mode = "nat"', 'mode = "route"')
        # [ha] is the last section: its keys go at the end, then [aws].
        text += f'route_tables = ["{table.table_id}"]\n\n[aws]\nregion = "{vpc_routes.REGION}"\n'
        config.write_text(text)
    ha_pair.start_pair(pair.layout, pair.paths, env=vpc_routes.ENV)


@pytest.mark.parametrize("advert", [1.0, 0.1], ids=["advert-1s", "advert-100ms"])
def test_route_mode_hard_failure_moves_the_route_and_the_gateway(
    pair: Pair, advert: float, capsys: pytest.CaptureFixture[str]
) -> None:
    if pair.route_table is None:
        pair.route_table = vpc_routes.start(pair.layout, pair.paths)
        to_route_mode(pair, pair.route_table)
    table = pair.route_table
    eni_of = {addr: eni for eni, addr in table.eni_addresses.items()}

    def route_holder() -> str | None:
        return table.eni_addresses.get(vpc_routes.route_target(pair.layout, table.table_id) or "")

    def vpc_router() -> str | None:
        routes = netns.ip_json(pair.layout.vpc_ns, "route", "show", str(pair.layout.device_subnet))
        return str(routes[0].get("gateway")) if routes else None

    pair.set_advert(advert)
    master, backup = pair.settled()
    pair.wait(lambda: route_holder() == str(master.address), 10, "the route on the master")
    pair.wait(lambda: vpc_router() == str(master.address), 5, "the VPC router following")
    pinger = Pinger(pair, 1 + 4 * advert + 3)
    try:
        cut = time.time()
        netns.ip(pair.layout.fabric_ns, "link", "set", "dev", master.fabric_port, "down")
        took = pair.wait(
            lambda: pair.holder() == backup and vpc_router() == str(backup.address),
            10 + 10 * advert,
            "gateway and VPC route moved",
        )
        traffic = pinger.result()
    finally:
        pinger.stop()
        netns.ip(pair.layout.fabric_ns, "link", "set", "dev", master.fabric_port, "up")
    assert route_holder() == str(backup.address)
    # The new master's own claim moved it (ReplaceRoute through the stand-in), found its ENI
    # by its VPC address (no IMDS here), and the lab's VPC router followed.
    claimed = pair.paths.peer_file(backup.index, "gatepeer.log").read_text()
    assert f"{table.table_id} {pair.layout.device_subnet} -> {eni_of[str(backup.address)]}" in (
        claimed
    )
    assert traffic.answered_after(cut + took) > 0, "no traffic through the new master"
    report(
        capsys,
        f"route mode hard failure, {advert:g} s adverts: gateway and VPC route moved "
        f"{took:.3f} s after the cut; " + traffic.line(),
    )
    new_master, _ = pair.settled()
    assert new_master == backup
