"""Failover that keeps connections (issue 18, "Must show" 1-6), on the two-peer lab exactly as a
user starts it: `lab up --peers 2`, `lab ha start` (nat mode, `ha.snat_address` and conntrackd's
sync on by default). A device holds connections to an echo server on the VPC host
(helpers/flow_probe.py, started and stopped by pid) while the master fails.

What is asserted: the connections survive (every byte sent comes back, no reset), the NAT address
moves with the master, the tables agree. What is reported, never asserted: the longest stall and
the datagrams lost (figures in docs/ha.md). One lab serves the module; it is removed at the end,
also on failure.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import new_prefix
from helpers.failover_traffic import PORT, Client, ProbeResult, Process, echo_server
from helpers.ha_lab import HaLab

from gatepeer.config import load
from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import VPC_HOST_ADDR, GatePeer, Layout
from gatepeer.lab.processes import ha_pair, vpc_routes
from gatepeer.lab.record import Paths

pytestmark = [pytest.mark.netns, pytest.mark.slow]

VPC_HOST = str(VPC_HOST_ADDR)
# A folder to copy the pair's logs to before the lab is removed (tracing a slow takeover).
KEEP_LOGS = "GATEPEER_HA_KEEP_LOGS"


@pytest.fixture(scope="module")
def lab() -> Iterator[HaLab]:
    for tool, package in (("keepalived", "keepalived"), ("conntrackd", "conntrackd")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: {package})")
    from gatepeer.lab import control

    layout = Layout(prefix=new_prefix(), peer_count=2)
    try:
        info = control.up(layout)
        ha_pair.start_pair(layout, info.paths)
        pair = HaLab(layout, info.paths)
        yield pair
    finally:
        if os.environ.get(KEEP_LOGS) and "pair" in locals():
            pair.keep_logs(Path(os.environ[KEEP_LOGS]))
        control.down(layout.prefix)
        left = control.lab_namespaces(layout.prefix)
        assert not left, f"namespaces left behind: {left}"
        assert not Paths.for_prefix(layout.prefix).dir.exists()


@pytest.fixture(scope="module")
def server(lab: HaLab) -> Iterator[Process]:
    with echo_server(lab.layout.vpc_ns, VPC_HOST, lab.paths.dir) as s:
        yield s


@pytest.fixture(scope="module")
def snat(lab: HaLab) -> str:
    ha = load(lab.paths.peer_config(1)).ha
    assert ha is not None and ha.snat_address is not None, "the lab pair sets ha.snat_address"
    return str(ha.snat_address)


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[ha failover] {text}")


def client(lab: HaLab, device: int, **kwargs: float) -> Client:
    """A flow probe client on one of the lab's device addresses."""
    source = str(lab.layout.devices[device])
    return Client(lab.layout.dev_ns, source, VPC_HOST, lab.paths.dir, **kwargs)  # type: ignore[arg-type]


def wait_synced(lab: HaLab, master: GatePeer, backup: GatePeer, count: int) -> float:
    """Until the backup's external cache holds the master's `count` flows to the echo port."""
    return lab.wait(
        lambda: len(lab.external_flows(backup, PORT) & lab.kernel_flows(master, PORT)) >= count,
        30,
        f"{count} flows in the backup's external cache",
    )


def vpc_sees(lab: HaLab) -> set[str]:
    """Source addresses of the established connections at the VPC host's echo port."""
    out = netns.run(
        netns.exec_in(lab.layout.vpc_ns, ["ss", "-Htn", "state", "established",
                                          f"( sport = :{PORT} )"]),
    ).stdout  # fmt: skip
    return {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def when(result: ProbeResult, *events: float) -> str:
    """When the first TCP error came, relative to the test's events (wall clock)."""
    at = result.raw["tcp"].get("first_error_at")
    if at is None:
        return "no TCP error"
    return "first TCP error at " + ", ".join(f"{at - e:+.3f} s" for e in events)


class Probes:
    """The flow probe clients of one test: each finished by the test, or killed by its pid if
    the test fails first (see `probes`)."""

    def __init__(self, lab: HaLab) -> None:
        self.lab = lab
        self.running: list[Client] = []

    def start(self, device: int, **kwargs: float) -> Client:
        started = client(self.lab, device, **kwargs)
        self.running.append(started)
        return started

    def finish(self, *clients: Client | None) -> list[ProbeResult]:
        results = []
        for c in clients:
            if c is not None:
                results.append(c.finish())
                self.running.remove(c)
        return results


@contextmanager
def probes(lab: HaLab) -> Iterator[Probes]:
    """Probe clients for a block; those it has not finished are killed if it raises."""
    started = Probes(lab)
    try:
        yield started
    except BaseException:
        for c in started.running:
            c.kill()
        raise


# ---- the lab's defaults ---------------------------------------------------------------------


def test_the_lab_pair_moves_a_nat_address_and_syncs_by_default(
    lab: HaLab, snat: str, server: Process
) -> None:
    master, backup = lab.settled()
    for p in lab.peers:
        ha = load(lab.paths.peer_config(p.index)).ha
        assert ha is not None and ha.conntrack_sync and str(ha.snat_address) == snat
        assert ha_pair.runs_conntrackd(lab.paths, p.index), f"no conntrackd in {p.ns}"
    lab.wait(lambda: lab.nat_holders(snat) == [master], 10, "the NAT address on the master")
    echo = client(lab, 0)
    try:
        wait_synced(lab, master, backup, 1)
        assert vpc_sees(lab) == {snat}
    finally:
        echo.finish()


# ---- 1-3: hard failover: TCP echo, 1,000 connections, a UDP flow ----------------------------


@pytest.mark.parametrize("advert", [1.0, 0.1], ids=["advert-1s", "advert-100ms"])
def test_hard_failover_keeps_tcp_and_udp(
    lab: HaLab, snat: str, server: Process, advert: float, capsys: pytest.CaptureFixture[str]
) -> None:
    lab.set_advert(advert)
    master, backup = lab.settled()
    try:
        with probes(lab) as probe:
            echo = probe.start(0, interval=0.02)  # 32 bytes every 20 ms
            udp = probe.start(1, tcp=0, udp_interval=0.01)  # a datagram every 10 ms
            # 1,000 connections, each echoing 32 bytes every second: with the fast adverts only,
            # to keep the module's time down.
            many = probe.start(2, tcp=1000, interval=1.0) if advert < 1 else None
            wait_synced(lab, master, backup, 2 + (1000 if many else 0))
            cut, cut_at = time.monotonic(), time.time()
            lab.cut(master)
            took = lab.wait(
                lambda: lab.holder() == backup and lab.nat_holders(snat) == [backup],
                10 + 10 * advert,
                "gateway and NAT address on the new master",
            )
            # The claim is recorded a moment after the VPG has moved.
            lab.wait(lambda: lab.ha_times(backup)[1] is not None, 5, "the claim recorded")
            takeover = lab.timeline(backup, cut_at)
            time.sleep(1.0)
            results = probe.finish(echo, udp, many)
    finally:
        lab.mend(master)
    tcp, dgram = results[0], results[1]
    assert dgram.udp is not None
    report(
        capsys,
        f"hard failover, {advert:g} s adverts: gateway and NAT address moved {took:.3f} s after "
        f"the cut ({time.monotonic() - cut:.1f} s ago; {takeover}); "
        f"echo: {tcp.line()}; {dgram.line()}"
        + (f"; 1,000 connections: {results[2].line()}" if many else ""),
    )
    assert (tcp.survived, tcp.resets) == (1, 0), tcp.line()
    assert dgram.udp["received_after_longest_gap"] > 0, "the UDP flow did not resume"
    if many:
        assert results[2].resets == 0, results[2].line()
        assert results[2].survived == 1000, results[2].line()
    new_master, _ = lab.settled()
    assert new_master == backup


# ---- 4: graceful stop, and the returning peer resyncs ---------------------------------------


def graceful_stop(lab: HaLab, master: GatePeer, backup: GatePeer) -> None:
    """As `lab ha stop` (and a host's shutdown) does: keepalived, gatepeer, conntrackd."""
    ha_pair.stop_peer(lab.paths, master.index)
    lab.wait(lambda: lab.holder() == backup, 10, "gateway moved")


def test_graceful_stop_udp_and_the_returning_peer_resyncs(
    lab: HaLab, snat: str, server: Process, capsys: pytest.CaptureFixture[str]
) -> None:
    lab.set_advert(0.1)
    master, backup = lab.settled()
    try:
        with probes(lab) as probe:
            udp = probe.start(1, tcp=0, udp_interval=0.01)
            wait_synced(lab, master, backup, 1)
            graceful_stop(lab, master, backup)
            time.sleep(0.5)
            (dgram,) = probe.finish(udp)
            # The peer returns: it must hold the new master's flows before it could take over.
            echo = probe.start(0, interval=0.02)
            returned = time.monotonic()
            ha_pair.start_peer(lab.paths, master)
            as_backup = lab.wait(lambda: lab.role(master) == "backup", 20, "the returning backup")
            resynced = wait_synced(lab, backup, master, 1)
            # Proof: fail the new master; the connection survives through the returned peer.
            lab.cut(backup)
            lab.wait(lambda: lab.nat_holders(snat) == [master], 10, "the NAT address back")
            time.sleep(1.0)
            (tcp,) = probe.finish(echo)
    finally:
        lab.mend(backup)
    assert dgram.udp is not None
    report(
        capsys,
        f"graceful stop, 0.1 s adverts: {dgram.line()}; the returning peer was backup "
        f"{as_backup:.2f} s after its start and held the flows {resynced:.2f} s later "
        f"({time.monotonic() - returned:.1f} s ago); then a hard failover back to it: "
        f"echo {tcp.line()}",
    )
    # 0 lost: the new master takes the NAT address only after conntrackd's commit, and until
    # then the old one, still forwarding, gets the replies (docs/ha.md).
    assert dgram.udp["lost"] == 0, dgram.line()
    assert dgram.udp["received_after_longest_gap"] > 0, "the UDP flow did not resume"
    assert (tcp.survived, tcp.resets) == (1, 0), tcp.line()
    lab.settled()


def test_graceful_stop_keeps_a_tcp_connection(
    lab: HaLab, server: Process, capsys: pytest.CaptureFixture[str]
) -> None:
    lab.set_advert(0.1)
    master, backup = lab.settled()
    try:
        with probes(lab) as probe:
            echo = probe.start(0, interval=0.02)
            wait_synced(lab, master, backup, 1)
            stopped_at = time.time()
            graceful_stop(lab, master, backup)
            time.sleep(1.0)
            (tcp,) = probe.finish(echo)
    finally:
        ha_pair.start_peer(lab.paths, master)
    report(capsys, f"graceful stop, 0.1 s adverts: echo {tcp.line()}; {when(tcp, stopped_at)}")
    lab.settled()
    assert (tcp.survived, tcp.resets) == (1, 0), tcp.line()


# ---- the daemon dies on the master -----------------------------------------------------------


def test_daemon_killed_on_the_master_hands_over_the_nat_address(
    lab: HaLab, snat: str, server: Process, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL to the master's `gatepeer run`: keepalived's check fails on the dead pid, the
    backup takes the role, and keepalived itself removes the NAT address from the old master
    (its daemon is not there to), so one peer holds it, and the connection survives."""
    lab.set_advert(0.1)
    master, backup = lab.settled()
    try:
        with probes(lab) as probe:
            echo = probe.start(0, interval=0.02)
            wait_synced(lab, master, backup, 1)
            killed = time.monotonic()
            lab.kill_agent(master)
            took = lab.wait(
                lambda: lab.holder() == backup and lab.nat_holders(snat) == [backup],
                20,
                "gateway and NAT address on the backup alone",
            )
            time.sleep(1.0)
            (tcp,) = probe.finish(echo)
    finally:
        ha_pair.stop_peer(lab.paths, master.index)  # its keepalived and conntrackd
        ha_pair.start_peer(lab.paths, master)
    report(
        capsys,
        f"daemon killed on the master, 0.1 s adverts: gateway and NAT address on the backup "
        f"alone {took:.2f} s later ({time.monotonic() - killed:.1f} s ago); echo {tcp.line()}",
    )
    assert (tcp.survived, tcp.resets) == (1, 0), tcp.line()
    lab.settled()


# ---- 6: split brain and heal ----------------------------------------------------------------


def test_split_brain_heals_to_one_nat_holder_and_agreeing_tables(
    lab: HaLab, snat: str, server: Process, capsys: pytest.CaptureFixture[str]
) -> None:
    lab.set_advert(0.1)
    master, backup = lab.settled()
    try:
        with probes(lab) as probe:
            echo = probe.start(0, interval=0.02)
            wait_synced(lab, master, backup, 1)
            for p in lab.peers:
                lab.block_vrrp(p)
            lab.wait(lambda: lab.role(master) == lab.role(backup) == "master", 10, "both masters")
            both = lab.nat_holders(snat)
            time.sleep(1.0)
            for p in lab.peers:
                lab.unblock_vrrp(p)
            healed, healed_at = time.monotonic(), time.time()
            final_master, final_backup = lab.settled(timeout=45)

            def converged() -> bool:
                """One master (the same one) holding the gateway and the NAT address alone, and
                its table of the echo's flows equal to the backup's external cache."""
                if lab.role(final_master) != "master" or lab.role(final_backup) != "backup":
                    return False
                if lab.holder() != final_master or lab.nat_holders(snat) != [final_master]:
                    return False
                kernel = lab.kernel_flows(final_master, PORT)
                return bool(kernel) and kernel == lab.external_flows(final_backup, PORT)

            def settled_and_converged() -> bool:
                nonlocal final_master, final_backup
                # After healing the role can still move once (the lower priority stepping down
                # at an advert that crossed); follow it.
                master = next((p for p in lab.peers if lab.role(p) == "master"), None)
                if master is not None and master != final_master:
                    final_master, final_backup = master, final_master
                return converged()

            agreed = lab.wait(settled_and_converged, 45, "one master, one NAT holder, tables agree")
            took = time.monotonic() - healed
            time.sleep(1.0)
            assert converged(), "the pair did not stay converged for a second"
            time.sleep(0.5)
            (tcp,) = probe.finish(echo)
    finally:
        for p in lab.peers:
            lab.unblock_vrrp(p)
    heard = (lab.state(final_master)["ha"].get("peer_lower_priority_at") or 0) >= healed_at
    report(
        capsys,
        f"split brain, 0.1 s adverts: NAT address on {[p.ns for p in both]} during the split; "
        f"after healing {final_master.ns} alone holds it, tables agreed {took:.2f} s after "
        f"healing ({agreed:.2f} s after the first single master; the winner "
        f"{'heard' if heard else 'did not hear'} MASTER_RX_LOWER_PRI); echo through it all: "
        f"{tcp.line()}",
    )
    assert lab.nat_holders(snat) == [final_master]


# ---- 5: route mode holds no connection state ------------------------------------------------


def test_route_mode_tcp_survives_hard_failover(
    lab: HaLab, server: Process, capsys: pytest.CaptureFixture[str]
) -> None:
    """Last: it turns the pair to route mode (the VPC route table's stand-in moves the VPC
    host's route for the device subnet to the master)."""
    table = vpc_routes.start(lab.layout, lab.paths)
    ha_pair.stop_pair(lab.paths, len(lab.peers))
    for p in lab.peers:
        config = lab.paths.peer_config(p.index)
        text = config.read_text().replace('mode = "nat"', 'mode = "route"')
        # [ha] is the last section: its keys go at the end, then [aws].
        text += f'route_tables = ["{table.table_id}"]\n\n[aws]\nregion = "{vpc_routes.REGION}"\n'
        config.write_text(text)
    ha_pair.start_pair(lab.layout, lab.paths, env=vpc_routes.ENV)

    def vpc_router() -> str | None:
        routes = netns.ip_json(lab.layout.vpc_ns, "route", "show", str(lab.layout.device_subnet))
        return str(routes[0].get("gateway")) if routes else None

    master, backup = lab.settled()
    lab.wait(lambda: vpc_router() == str(master.address), 15, "the VPC router on the master")
    try:
        with probes(lab) as probe:
            echo = probe.start(0, interval=0.02)
            assert vpc_sees(lab) == {str(lab.layout.devices[0])}  # no NAT between VPC and device
            lab.cut(master)
            took = lab.wait(
                lambda: lab.holder() == backup and vpc_router() == str(backup.address),
                10 + 10 * lab.advert,
                "gateway and VPC route moved",
            )
            time.sleep(1.0)
            (tcp,) = probe.finish(echo)
    finally:
        lab.mend(master)
    report(
        capsys,
        f"route mode hard failover, {lab.advert:g} s adverts: gateway and VPC route moved "
        f"{took:.3f} s after the cut; echo {tcp.line()}",
    )
    assert (tcp.survived, tcp.resets) == (1, 0), tcp.line()
