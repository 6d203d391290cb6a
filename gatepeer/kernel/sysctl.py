"""Kernel parameters, read and written through /proc/sys directly (no sysctl(8) process)."""

from __future__ import annotations

import os
from pathlib import Path

PROC_SYS = Path("/proc/sys")


def read(path: str, root: Path = PROC_SYS) -> int | None:
    """The value as an integer, or None when this kernel or namespace has no such key."""
    try:
        text = (root / path).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text.split()[0])


def read_writable(path: str, root: Path = PROC_SYS) -> int | None:
    """The value, or None when the key is absent or read-only here: procfs enforces a key's
    mode even for root (conntrack's global sizes are read-only outside the initial netns).

    Checked with the effective ids: plain access(2) drops every capability of a non-root
    caller, so the service user (which writes net sysctls by CAP_NET_ADMIN) would see none."""
    if not os.access(root / path, os.W_OK, effective_ids=True):
        return None
    return read(path, root)


def write(path: str, value: int, root: Path = PROC_SYS) -> None:
    (root / path).write_text(f"{value}\n")
