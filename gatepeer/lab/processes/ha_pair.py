"""The HA pair of a two-peer lab (`lab up --peers 2`): `gatepeer run`, conntrackd and keepalived
in each gate peer namespace, as the unit files order them on a real host (gatepeer first: it
makes the notify FIFO and knows the device subnet; conntrackd next, with the config `gatepeer
ha render --conntrackd` wrote, so that the connections sync before any role is taken;
keepalived last, with the config `gatepeer ha render` wrote). conntrackd runs only when the
peer's config says `ha.conntrack_sync` (the lab's configs do). Every process is recorded by pid
in the lab's folder and stopped by that pid only, after checking that the pid still runs the
command we started (pids are reused).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import GatePeer, Layout
from gatepeer.lab.network.netns import LabError
from gatepeer.lab.processes.gate_peer import agent_command
from gatepeer.lab.processes.pids import read_pid, runs, stop_pid
from gatepeer.lab.record import Paths

# The first reconcile registers through the emulator; on a loaded host that takes seconds.
AGENT_READY_S = 60.0
KEEPALIVED_START_S = 10.0
CONNTRACKD_START_S = 10.0
# init_fail's rise, then a master-down interval at the slowest adverts (10 s): well within.
MASTER_S = 60.0
STOP_WAIT_S = 15.0


def keepalived_binary() -> str:
    found = shutil.which("keepalived") or "/usr/sbin/keepalived"
    if not Path(found).exists():
        raise LabError("keepalived is not installed (Debian: keepalived)")
    return found


def conntrackd_binary() -> str:
    found = shutil.which("conntrackd") or "/usr/sbin/conntrackd"
    if not Path(found).exists():
        raise LabError("conntrackd is not installed (Debian: conntrackd)")
    return found


def syncs(paths: Paths, index: int) -> bool:
    """Whether this peer's config asks for conntrackd (`ha.conntrack_sync`)."""
    from gatepeer.config import load

    ha = load(paths.peer_config(index)).ha
    return bool(ha is not None and getattr(ha, "conntrack_sync", False))


def agent_state(paths: Paths, index: int) -> dict[str, Any] | None:
    try:
        return dict(json.loads(paths.peer_state_file(index).read_text()))
    except (OSError, ValueError):
        return None


def start_agent(
    paths: Paths, peer: GatePeer, *, wait: bool = True, env: dict[str, str] | None = None
) -> int:
    """`gatepeer run` in the peer's namespace (with `env` added to its environment: route
    mode's EC2 stand-in); waits for its first healthy reconcile."""
    log = paths.peer_file(peer.index, "gatepeer.log")
    cmd = netns.exec_in(peer.ns, agent_command(paths, "run", index=peer.index))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
    # `ip netns exec` execs in place: this is the daemon's own pid.
    paths.peer_file(peer.index, "gatepeer.pid").write_text(f"{proc.pid}\n")
    if wait:
        deadline = time.monotonic() + AGENT_READY_S
        while True:
            state = agent_state(paths, peer.index) or {}
            if state.get("pid") == proc.pid and state.get("health") == "ok":
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise LabError(f"gatepeer run in {peer.ns} did not become healthy:\n{tail}")
            time.sleep(0.1)
    return proc.pid


def render_keepalived(paths: Paths, peer: GatePeer) -> Path:
    """`gatepeer ha render -o FILE` in the peer's namespace (it runs `keepalived -t` first)."""
    conf = paths.peer_file(peer.index, "keepalived.conf")
    cmd = agent_command(paths, "ha", "render", "-o", str(conf), index=peer.index)
    proc = netns.run(netns.exec_in(peer.ns, cmd), check=False, timeout=60)
    if proc.returncode != 0:
        raise LabError(f"gatepeer ha render in {peer.ns} failed: {proc.stderr.strip()}")
    return conf


def start_keepalived(paths: Paths, peer: GatePeer) -> int:
    """keepalived in the foreground of its own session, logging to the lab's folder, with
    pid files of its own (two instances on one host must not share /run/keepalived.pid)."""
    conf = render_keepalived(paths, peer)
    i = peer.index
    cmd = netns.exec_in(
        peer.ns,
        [
            keepalived_binary(), "--dont-fork", "--log-console", "--no-syslog", "--log-detail",
            "-f", str(conf),
            "-p", str(paths.peer_file(i, "keepalived-main.pid")),
            "-r", str(paths.peer_file(i, "keepalived-vrrp.pid")),
            "-c", str(paths.peer_file(i, "keepalived-checkers.pid")),
        ],
    )  # fmt: skip
    with open(paths.peer_file(i, "keepalived.log"), "ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    paths.peer_file(i, "keepalived.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + KEEPALIVED_START_S
    while read_pid(paths.peer_file(i, "keepalived-vrrp.pid")) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            log = paths.peer_file(i, "keepalived.log").read_text(errors="replace")[-2000:]
            raise LabError(f"keepalived in {peer.ns} did not start its VRRP process:\n{log}")
        time.sleep(0.02)
    return proc.pid


def render_conntrackd(paths: Paths, peer: GatePeer) -> Path:
    """`gatepeer ha render --conntrackd -o FILE` in the peer's namespace (checked by conntrackd's
    own parser first). The control socket and lock file it names are the lab's, per peer."""
    conf = paths.peer_file(peer.index, "conntrackd.conf")
    cmd = agent_command(paths, "ha", "render", "--conntrackd", "-o", str(conf), index=peer.index)
    proc = netns.run(netns.exec_in(peer.ns, cmd), check=False, timeout=60)
    if proc.returncode != 0:
        raise LabError(
            f"gatepeer ha render --conntrackd in {peer.ns} failed: {proc.stderr.strip()}"
        )
    return conf


def start_conntrackd(paths: Paths, peer: GatePeer) -> int:
    """conntrackd in the foreground of its own session; ready when its control socket answers
    (`conntrackd -s`). A peer restarted while its conntrackd kept running (it is a unit of its
    own on a host) keeps that one: a second would answer through the first one's socket, and
    the first would outlive the lab."""
    i = peer.index
    if runs_conntrackd(paths, i):
        running = read_pid(paths.peer_file(i, "conntrackd.pid"))
        assert running is not None
        return running
    conf = render_conntrackd(paths, peer)
    binary = conntrackd_binary()
    with open(paths.peer_file(i, "conntrackd.log"), "ab") as out:
        proc = subprocess.Popen(
            netns.exec_in(peer.ns, [binary, "-C", str(conf)]),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    paths.peer_file(i, "conntrackd.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + CONNTRACKD_START_S
    while True:
        answer = netns.run(netns.exec_in(peer.ns, [binary, "-C", str(conf), "-s"]), check=False)
        if answer.returncode == 0 and proc.poll() is None:
            return proc.pid
        if proc.poll() is not None or time.monotonic() > deadline:
            log = paths.peer_file(i, "conntrackd.log").read_text(errors="replace")[-2000:]
            raise LabError(
                f"conntrackd in {peer.ns} did not answer on its socket: {answer.stderr.strip()}"
                f"\n{log}"
            )
        time.sleep(0.05)


def runs_conntrackd(paths: Paths, index: int) -> bool:
    """The conntrackd we recorded for this peer is alive."""
    pid = read_pid(paths.peer_file(index, "conntrackd.pid"))
    return runs(pid, "conntrackd", str(paths.peer_file(index, "conntrackd.conf")))


def stop_conntrackd(paths: Paths, index: int) -> int | None:
    """SIGTERM to the conntrackd we recorded (it removes its socket and lock file)."""
    pid = read_pid(paths.peer_file(index, "conntrackd.pid"))
    stopped = None
    if runs(pid, "conntrackd", str(paths.peer_file(index, "conntrackd.conf"))):
        assert pid is not None
        stop_pid(pid, STOP_WAIT_S)
        stopped = pid
    paths.peer_file(index, "conntrackd.pid").unlink(missing_ok=True)
    return stopped


def stop_keepalived(paths: Paths, index: int) -> int | None:
    """SIGTERM to the keepalived we recorded (it sends a priority-0 advert and drops its
    addresses); its VRRP child is killed too if it outlives the parent. Returns the pid."""
    conf = str(paths.peer_file(index, "keepalived.conf"))
    pid = read_pid(paths.peer_file(index, "keepalived.pid"))
    child = read_pid(paths.peer_file(index, "keepalived-vrrp.pid"))
    stopped = None
    if runs(pid, "keepalived", conf):
        assert pid is not None
        stop_pid(pid, STOP_WAIT_S)
        stopped = pid
    if runs(child, "keepalived", conf):
        assert child is not None
        stop_pid(child, 2.0)
    for name in ("keepalived.pid", "keepalived-vrrp.pid", "keepalived-main.pid"):
        paths.peer_file(index, name).unlink(missing_ok=True)
    return stopped


def stop_agent(paths: Paths, index: int) -> int | None:
    """SIGTERM to the `gatepeer run` we recorded (the data path stays, as on a real host)."""
    pid = read_pid(paths.peer_file(index, "gatepeer.pid"))
    stopped = None
    if runs(pid, "gatepeer", str(paths.peer_config(index))):
        assert pid is not None
        stop_pid(pid, STOP_WAIT_S)
        stopped = pid
    paths.peer_file(index, "gatepeer.pid").unlink(missing_ok=True)
    return stopped


def start_peer(paths: Paths, peer: GatePeer, env: dict[str, str] | None = None) -> dict[str, int]:
    """gatepeer first (it makes the FIFO keepalived writes to), conntrackd (with the sync on),
    then keepalived."""
    started = {"gatepeer": start_agent(paths, peer, env=env)}
    if syncs(paths, peer.index):
        started["conntrackd"] = start_conntrackd(paths, peer)
    started["keepalived"] = start_keepalived(paths, peer)
    return started


def stop_peer(paths: Paths, index: int) -> list[str]:
    """keepalived first (the role goes to the other peer while this one's tunnel is still
    up), then gatepeer (which hands its conntrackd the STOP transition), then conntrackd."""
    out = []
    pid = stop_keepalived(paths, index)
    if pid is not None:
        out.append(f"keepalived (pid {pid})")
    pid = stop_agent(paths, index)
    if pid is not None:
        out.append(f"gatepeer run (pid {pid})")
    pid = stop_conntrackd(paths, index)
    if pid is not None:
        out.append(f"conntrackd (pid {pid})")
    return out


def start_pair(
    layout: Layout, paths: Paths, env: dict[str, str] | None = None
) -> dict[str, dict[str, int]]:
    if layout.peer_count < 2:
        raise LabError(f"lab {layout.prefix} has one gate peer: make it with `lab up --peers 2`")
    keepalived_binary()
    started: dict[str, dict[str, int]] = {}
    first, *others = layout.gate_peers
    # Peer 1 (priority 254) first, and master before peer 2 starts: with nopreempt whoever is
    # master first stays master, and a head start alone was a race (both peers sit at
    # priority 1 until their conntrackds hear each other).
    started[first.ns] = start_peer(paths, first, env)
    deadline = time.monotonic() + MASTER_S
    while ((agent_state(paths, first.index) or {}).get("ha") or {}).get("role") != "master":
        if time.monotonic() > deadline:
            log = paths.peer_file(first.index, "keepalived.log").read_text(errors="replace")
            raise LabError(
                f"{first.ns} did not become master within {MASTER_S:g} s:\n{log[-2000:]}"
            )
        time.sleep(0.1)
    for peer in others:
        started[peer.ns] = start_peer(paths, peer, env)
    return started


def stop_pair(paths: Paths, peers: int) -> list[str]:
    out = []
    for index in range(1, peers + 1):
        out += stop_peer(paths, index)
    return out
