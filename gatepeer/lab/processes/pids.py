"""Processes by pid, the one way the lab stops anything: read a pid file, check the process is
alive and still the one we started (its command line), stop it (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

POLL_S = 0.02  # how often a stop looks whether the process is gone
KILL_WAIT_S = 2.0  # after SIGKILL, how long to wait for it to go


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def runs(pid: int | None, *needles: str) -> bool:
    """`pid` is alive and its command line still holds every needle (our program, our file)."""
    if pid is None or not pid_alive(pid):
        return False
    cmdline = " ".join(proc_cmdline(pid))
    return all(n in cmdline for n in needles)


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, up to `timeout` seconds to exit, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_S
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(POLL_S)
