"""Is `gatepeer run` alive? The pid state.json records, checked against /proc."""

from __future__ import annotations

from pathlib import Path


def daemon_pid(pid: int | None, proc: Path = Path("/proc")) -> int | None:
    """`pid` when it is a live `gatepeer run` (not a zombie, not a reused pid)."""
    if pid is None:
        return None
    try:
        stat = (proc / str(pid) / "stat").read_text()
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return None
    args = [a.decode(errors="replace") for a in argv if a]
    is_gatepeer = any(Path(a).name == "gatepeer" or a in ("gatepeer", "gatepeer.cli") for a in args)
    return pid if is_gatepeer and "run" in args else None
