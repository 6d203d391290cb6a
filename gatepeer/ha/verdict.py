"""The HA health checks' verdicts: the daemon judges itself, keepalived's scripts read a line.

keepalived used to run `gatepeer check` every second on each peer: a Python process, 0.25 s on
an idle peer and over the 3 s timeout on a loaded one. keepalived counts a timed-out check as
failed at once, so a healthy master went to FAULT and the role moved (a CI run lost it that way
after a failover, to the peer that had just come back). Now the daemon applies the same rules
(`check.evaluate`, `check.evaluate_sync`) each time it writes state.json, which is every probe
round and every role change, and writes one line per check; keepalived runs
`/bin/sh verdict.sh FILE MAX_AGE`, which reads it in a few milliseconds.

A line is "<unix time> <daemon pid> ok" or "<unix time> <daemon pid> fail: <reasons>". The
script fails when the line is missing, older than MAX_AGE seconds (a daemon that hangs), names
a process that is gone (a daemon that died) or says fail. `gatepeer check` stays, for people:
it reads the kernel and state.json itself.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gatepeer.config import Config
from gatepeer.ha import check
from gatepeer.kernel import nftables
from gatepeer.kernel.device_sets import DeviceSetsError, inet_tables
from gatepeer.kernel.rtnl import TunnelReading
from gatepeer.state_document import StateSummary

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).with_name("verdict.sh")
# Beside agent.state_file, named after it (the lab's two peers share a folder):
# /run/gatepeer/state.ha-check, state.ha-sync.
CHECK_FILE = "ha-check"
SYNC_FILE = "ha-sync"


def path(cfg: Config, name: str) -> Path:
    return cfg.agent.state_file.with_suffix(f".{name}")


def max_age(cfg: Config) -> int:
    """Whole seconds a verdict stays good: as long as the daemon's reading proves anything."""
    return math.ceil(check.reading_fresh_for(cfg))


def command(cfg: Config, name: str) -> tuple[str, ...]:
    """The argv keepalived runs for one check (its script line: no quoting, spaces split)."""
    return ("/bin/sh", str(SCRIPT), str(path(cfg, name)), str(max_age(cfg)))


def judge(
    cfg: Config,
    document: Mapping[str, Any],
    now: float,
    *,
    read_tunnel: Callable[[str], TunnelReading] = TunnelReading.read,
    tables: Callable[[], list[str]] = inet_tables,
) -> tuple[list[str], list[str] | None]:
    """Why this peer must not hold the role, and why its sync is broken (None: sync off),
    from the state document the daemon has just written."""
    state = StateSummary.from_state(document)
    loaded: bool | None
    error = None
    try:
        loaded = nftables.TABLE in tables()
    except (DeviceSetsError, OSError) as exc:
        loaded, error = None, str(exc)
    inputs = check.inputs(cfg, state, read_tunnel, loaded, error, os.getpid(), now)
    reasons = check.evaluate(inputs)
    sync = None
    if cfg.ha is not None and cfg.ha.conntrack_sync:
        sync = check.evaluate_sync(state.ha, now, check.reading_fresh_for(cfg))
    return reasons, sync


def line(reasons: list[str], now: float) -> str:
    """One line, whatever the reasons hold (the script reads the first line only)."""
    verdict = "fail: " + " ".join("; ".join(reasons).split()) if reasons else "ok"
    return f"{int(now)} {os.getpid()} {verdict}\n"


def write(cfg: Config, document: Mapping[str, Any], now: float) -> None:
    """Judge and write both lines (atomically: keepalived may read at any moment)."""
    try:
        reasons, sync = judge(cfg, document, now)
    except Exception as exc:  # noqa: BLE001 - the caller is the prober's thread: fail, never die
        log.exception("judging this peer for keepalived failed")
        reasons = [f"the daemon cannot judge this peer: {exc}"]
        sync = reasons if cfg.ha is not None and cfg.ha.conntrack_sync else None
    for name, found in ((CHECK_FILE, reasons), (SYNC_FILE, sync)):
        target = path(cfg, name)
        if found is None:
            target.unlink(missing_ok=True)
            continue
        try:
            temporary = target.with_name(f".{target.name}.tmp")
            temporary.write_text(line(found, now))
            temporary.replace(target)
        except OSError as exc:
            log.error("cannot write %s: %s", target, exc.strerror or exc)


def parse(text: str) -> tuple[float, int, list[str]] | None:
    """(written at, pid, reasons: empty when ok) from a verdict line; None for anything else."""
    words = text.strip().split(" ", 2)
    if len(words) < 3 or not (words[0].isdigit() and words[1].isdigit()):
        return None
    at, pid, rest = float(words[0]), int(words[1]), words[2]
    if rest == "ok":
        return at, pid, []
    if rest.startswith("fail: "):
        return at, pid, rest.removeprefix("fail: ").split("; ")
    return None


def report(cfg: Config, now: float) -> dict[str, Any]:
    """The "check" object of status's "ha": the verdict keepalived reads, as last written."""
    target = path(cfg, CHECK_FILE)
    try:
        parsed = parse(target.read_text())
    except OSError:
        return {"verdict": "missing", "reasons": [], "age_s": None, "file": str(target)}
    if parsed is None:
        return {"verdict": "unreadable", "reasons": [], "age_s": None, "file": str(target)}
    at, _pid, reasons = parsed
    return {
        "verdict": "fail" if reasons else "ok",
        "reasons": reasons,
        "age_s": round(max(0.0, now - at), 1),
        "file": str(target),
    }
