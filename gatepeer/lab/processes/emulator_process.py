"""The lab's background processes (the emulator, a demo's iperf3 server): start, find by pid
file (checked against the command line), stop by pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gatepeer.lab.network import netns
from gatepeer.lab.network.netns import LabError
from gatepeer.lab.processes.pids import pid_alive, proc_cmdline, read_pid, stop_pid
from gatepeer.lab.record import Paths

# The emulator's process entry; also how its command line is recognised.
EMULATOR_MODULE = "gatepeer.lab.emulator"


def emulator_pid(paths: Paths) -> int | None:
    """The emulator's pid if its pid file names a live process that is this lab's emulator
    (a stale pid file, or a pid reused by something else, gives None)."""
    pid = read_pid(paths.emulator_pid)
    if pid is None or not pid_alive(pid):
        return None
    cmdline = proc_cmdline(pid)
    if EMULATOR_MODULE in cmdline and "--lab-dir" in cmdline and str(paths.dir) in cmdline:
        return pid
    return None


def stop_emulator(paths: Paths) -> int | None:
    """Stop this lab's emulator (by the pid in its pid file, after checking its cmdline)."""
    pid = emulator_pid(paths)
    if pid is not None:
        stop_pid(pid)
    for stale in (paths.emulator_pid, paths.emulator_json):
        stale.unlink(missing_ok=True)
    return pid


def _netns_inode(name: str) -> int | None:
    try:
        return (netns.NETNS_DIR / name).stat().st_ino
    except OSError:
        return None


def stop_recorded_iperf(paths: Paths, layout_prefix: str) -> int | None:
    """The demo's iperf3 server, if a crashed demo left it: only when the pid is an iperf3
    running in this lab's devices namespace."""
    pid = read_pid(paths.iperf_pid)
    if pid is None or not pid_alive(pid):
        return None
    cmdline = proc_cmdline(pid)
    dev_ino = _netns_inode(f"{layout_prefix}-dev")
    try:
        pid_ino = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None
    if cmdline and Path(cmdline[0]).name == "iperf3" and dev_ino == pid_ino:
        stop_pid(pid, timeout=2.0)
        return pid
    return None


def start_emulator(paths: Paths, timeout: float = 20.0) -> dict[str, Any]:
    """Start the emulator in the background and wait until it listens; return emulator.json."""
    paths.emulator_json.unlink(missing_ok=True)
    with open(paths.emulator_log, "ab") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", EMULATOR_MODULE, "--lab-dir", str(paths.dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    # The launcher forks the emulator off and exits, so nobody here has to reap it later.
    try:
        rc = launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait()
        raise LabError(f"emulator launcher hung; see {paths.emulator_log}") from None
    if rc != 0:
        raise LabError(f"emulator failed to start (exit {rc}):\n{_log_tail(paths)}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_emulator_json(paths)
        if info is not None and emulator_pid(paths) == info.get("pid"):
            return info
        pid = read_pid(paths.emulator_pid)
        if pid is not None and not pid_alive(pid):
            break
        time.sleep(0.05)
    stop_emulator(paths)
    raise LabError(f"emulator did not come up:\n{_log_tail(paths)}")


def read_emulator_json(paths: Paths) -> dict[str, Any] | None:
    try:
        return dict(json.loads(paths.emulator_json.read_text()))
    except (OSError, ValueError):
        return None


def _log_tail(paths: Paths, lines: int = 20) -> str:
    try:
        return "\n".join(paths.emulator_log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
