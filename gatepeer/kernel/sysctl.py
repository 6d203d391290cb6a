"""Kernel parameters, read and written through /proc/sys directly (no sysctl(8) process)."""

from __future__ import annotations

from pathlib import Path

PROC_SYS = Path("/proc/sys")


def read(path: str, root: Path = PROC_SYS) -> int | None:
    """The value as an integer, or None when this kernel or namespace has no such key."""
    try:
        text = (root / path).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text.split()[0])


def write(path: str, value: int, root: Path = PROC_SYS) -> None:
    (root / path).write_text(f"{value}\n")
