"""JSON documents written atomically and read back leniently: state.json (what
`state_document` builds), the gate cache and the record of original sysctl values.

`gatepeer status` reads state.json together with the live kernel state, so the report works
while the daemon is down, and a restarted agent reads the last known good gate view from it so
that a failing API at boot does not leave the data path unbuilt.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


def write(path: Path, data: dict[str, Any], *, indent: int | None = 2) -> None:
    """Write-then-rename in the same directory: readers see the old file or the new, whole.
    `indent=None` writes one line: for large documents read often (the SIM map)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    payload = json.dumps({"format": FORMAT_VERSION, **data}, indent=indent, sort_keys=True)
    _remove_leftovers(path)
    # The writer's pid in the name: a writer killed before its rename is recognised later.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(payload + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary files of writers to `path` that died before their rename (a
    SIGKILL, a power cut): otherwise every crash would leave one behind."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def read(path: Path) -> dict[str, Any] | None:
    """The last state, or None when there is none or it cannot be parsed."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        return None
    return data
