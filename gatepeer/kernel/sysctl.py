"""Kernel parameters, read and written through /proc/sys directly (no sysctl(8) process)."""

from __future__ import annotations

import os
from pathlib import Path

from gatepeer import atomic_json

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


def dotted(path: str) -> str:
    """The sysctl(8) name; a dot inside a component (eth0.100) is written as a slash."""
    return ".".join(part.replace(".", "/") for part in path.split("/"))


class OriginalValues:
    """What each host-wide key held before gatepeer first changed it, so `down` can put it
    back. Kept in `sysctl-original.json` next to the state file: on /run (tmpfs), so after a
    reboot the boot-time values are recorded afresh. A key's original value is written before
    the key is changed and never overwritten while the file exists; only the value gatepeer
    set is updated (it says whether someone else changed the key since)."""

    FILE_NAME = "sysctl-original.json"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def beside(cls, state_file: Path) -> OriginalValues:
        return cls(state_file.with_name(cls.FILE_NAME))

    def _load(self) -> dict[str, dict[str, int]]:
        data = atomic_json.read(self.path) or {}
        entries = data.get("sysctls")
        if not isinstance(entries, dict):
            return {}
        return {
            key: {"original": int(e["original"]), "set": int(e["set"])}
            for key, e in entries.items()
            if isinstance(e, dict)
            and all(isinstance(e.get(f), int) and not isinstance(e.get(f), bool) for f in _FIELDS)
        }

    def remember(self, path: str, was: int, value: int) -> None:
        """Call before writing `value` to `path`, which holds `was`."""
        entries = self._load()
        entry = entries.get(path)
        if entry is None:
            entries[path] = {"original": was, "set": value}
        elif entry["set"] == value:
            return  # nothing new: spare the disk a rewrite
        else:
            entry["set"] = value
        atomic_json.write(self.path, {"sysctls": entries})

    def restore(self, root: Path = PROC_SYS) -> list[str]:
        """Put back every original value gatepeer's own setting still holds; one line per key
        that needed a decision. The record is removed afterwards."""
        messages = []
        for path, entry in sorted(self._load().items()):
            now = read(path, root)
            original, ours = entry["original"], entry["set"]
            if now is None or now == original:
                continue  # gone with its interface, or already back
            if now != ours:
                messages.append(
                    f"left {dotted(path)} at {now}: changed since gatepeer set {ours}"
                    f" (it was {original} before)"
                )
                continue
            write(path, original, root)
            messages.append(f"restored {dotted(path)} to {original} (gatepeer had set {ours})")
        self.path.unlink(missing_ok=True)
        return messages


_FIELDS = ("original", "set")
