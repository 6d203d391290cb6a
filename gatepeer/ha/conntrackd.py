"""conntrackd (conntrack-tools) beside keepalived: its config rendered from `[ha]`, its own check
of that file, the primary-backup handover on keepalived's transitions, and sync health read from
`conntrackd -s`.

The shape, and why:

- FTFW mode: the reliable protocol (sequence numbers, acknowledgements, resends); the master's
  connections reach the backup's *external cache*, which the backup commits into its kernel
  table only when it becomes master (so a backup's table holds none of the master's flows).
- UDP unicast between the two peers' VPC addresses, port `ha.sync_port` (3780, as in
  conntrack-tools' examples): a VPC carries no multicast.
- Only the device subnet's flows (`Address Accept`): those are the ones a failover must keep.
  The filter runs in user space: on kernel 6.18 the kernel-space (BSF) filter with this address
  list let no event through at all (conntrackd's "events received" stayed 0 while `conntrack
  -E` saw them), in the namespace pair tests/lab/test_ha_conntrackd_netns.py builds.
- Fewer events per flow: gatepeer's nftables table limits each new flow's conntrack events to
  new, assured and destroy (`ruleset.SYNC_EVENTS`, `PacketPathSpec.sync_events`). conntrackd's
  cost is per event, and the backup's copy needs the flow, its NAT and its state once
  established, not each TCP state change (bench/bench_new_connections.py).
- `HashLimit` twice the kernel's conntrack_max, as conntrackd.conf(5) advises (the daemon may
  keep dead entries cached for a while).

The handover follows conntrack-tools' `primary-backup.sh` (doc/sync/primary-backup.sh):
master: commit the external cache (-c), flush the caches (-f), resync the internal cache with
the kernel (-R), send a bulk update to the backup (-B); backup: shorten the kernel's timers of
the flows we forwarded (-t), ask the master for a resync (-n); fault: shorten the timers (-t).
(-t in conntrackd 1.4.7 schedules a flush of the whole kernel table after PurgeTimeout, 60 s by
default, and a later commit cancels it: seen in a namespace.)
gatepeer runs these from the notify FIFO's events, in order, before the claim.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gatepeer.config import HaConfig

log = logging.getLogger(__name__)

CONNTRACKD = "/usr/sbin/conntrackd"
# A client command answers in milliseconds; a commit of a large cache takes longer.
COMMAND_TIMEOUT = 10.0
# Socket buffers of the sync link (conntrack-tools' examples): a bulk send of many flows must
# not overflow them.
SOCKET_BUFFER = 1_249_280
NETLINK_BUFFER, NETLINK_BUFFER_MAX = 2_097_152, 8_388_608
# FTFW sends an ALIVE message every second while idle: this long without one, the sync is silent.
SILENT_AFTER = 5.0
# Send or receive errors seen this recently degrade the peer.
ERRORS_RECENT = 60.0


class SyncConfigError(ValueError):
    """The inputs cannot make a valid conntrackd.conf; the message names the setting."""


@dataclass(frozen=True)
class SyncFacts:
    """What the render needs beyond `[ha]`: this host's side, resolved by the caller."""

    local_address: ipaddress.IPv4Address  # this peer's VPC address: the sync's source
    interface: str  # the underlay, where the sync messages go
    device_subnet: ipaddress.IPv4Network  # the flows worth keeping
    conntrack_max: int  # the kernel's table size (gatepeer sizes it)


def render(ha: HaConfig, facts: SyncFacts) -> str:
    if facts.local_address == ha.peer_address:
        raise SyncConfigError(
            f"ha.peer_address: {ha.peer_address} is this host's own address; "
            "set the other peer's VPC address"
        )
    lock = ha.conntrackd_socket.with_suffix(".lock")
    lines = [
        "# Rendered by gatepeer from [ha] (`gatepeer ha install`); edits here are overwritten.",
        "Sync {",
        "    Mode FTFW {",
        "        DisableExternalCache Off",
        "    }",
        "    UDP {",
        f"        IPv4_address {facts.local_address}",
        f"        IPv4_Destination_Address {ha.peer_address}",
        f"        Port {ha.sync_port}",
        f"        Interface {facts.interface}",
        f"        SndSocketBuffer {SOCKET_BUFFER}",
        f"        RcvSocketBuffer {SOCKET_BUFFER}",
        "        Checksum on",
        "    }",
        "}",
        "",
        "General {",
        "    Systemd on",
        f"    HashSize {max(8192, facts.conntrack_max // 8)}",
        f"    HashLimit {2 * facts.conntrack_max}",
        "    LogFile off",
        "    Syslog on",
        f"    LockFile {lock}",
        "    UNIX {",
        f"        Path {ha.conntrackd_socket}",
        "    }",
        f"    NetlinkBufferSize {NETLINK_BUFFER}",
        f"    NetlinkBufferSizeMaxGrowth {NETLINK_BUFFER_MAX}",
        "    NetlinkOverrunResync On",
        "    Filter From Userspace {",
        "        Protocol Accept {",
        "            TCP",
        "            UDP",
        "            ICMP",
        "        }",
        "        Address Accept {",
        f"            IPv4_address {facts.device_subnet}",
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


# ---- conntrackd's own check of a file ---------------------------------------------------


def binary() -> str:
    return shutil.which("conntrackd") or CONNTRACKD


def conntrackd_test(text: str) -> str | None:
    """conntrackd's verdict on `text`, or None when it accepts it. conntrackd has no test flag
    (`-v` does not read the file), but every client command parses the whole file first: `-s`
    against a control socket nobody listens on answers "can't connect" for a file it accepts,
    and "parsing config file in line (N)" for one it does not. Raises FileNotFoundError without
    conntrackd."""
    with tempfile.TemporaryDirectory(prefix="gatepeer-conntrackd-") as tmp:
        conf = Path(tmp) / "conntrackd.conf"
        conf.write_text(_SOCKET_PATH.sub(rf"\g<1>{tmp}/none.ctl", text, count=1))
        proc = subprocess.run(
            [binary(), "-C", str(conf), "-s"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    said = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    refused = [ln for ln in said if "parsing config file" in ln or "[ERROR]" in ln]
    if any("can't connect" in ln for ln in refused) or not refused:
        return None
    return "; ".join(_NOISE.sub("", ln) for ln in refused)


_SOCKET_PATH = re.compile(r"(UNIX \{\s*\n\s*Path )\S+")
# conntrackd's log prefix: "[Sun Dec  6 21:34:59 2026] (pid=19772) "
_NOISE = re.compile(r"^\[[^]]*\] \(pid=\d+\) ")


# ---- the handover on keepalived's transitions ------------------------------------------

COMMIT = "-c"
# The steps of conntrack-tools' primary-backup.sh for each role gatepeer records.
HANDOVER: dict[str, tuple[tuple[str, str], ...]] = {
    "master": (
        (COMMIT, "commit the external cache into the kernel table"),
        ("-f", "flush the internal and external caches"),
        ("-R", "resync the internal cache with the kernel table"),
        ("-B", "send a bulk update to the backup"),
    ),
    "backup": (
        ("-t", "shorten the kernel's timers of the flows this peer forwarded"),
        ("-n", "ask the master for a resync"),
    ),
    "fault": (("-t", "shorten the kernel's timers of the flows this peer forwarded"),),
    # Not in primary-backup.sh: keepalived stopping (a graceful stop, a shutdown) leaves the
    # table alone, since this peer forwards until the VPG has moved; it runs -t when it comes
    # back as backup. (-t schedules a flush of the whole kernel table after PurgeTimeout, 60 s
    # by default; a commit as master cancels it.)
    "stopped": (),
}

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )


class Conntrackd:
    """The client side of one conntrackd, through its config file (`-C`: the control socket
    is named there). `run` is injectable for tests."""

    def __init__(self, config_file: Path, run: Runner = _run) -> None:
        self.config_file = config_file
        self.run = run

    def command(self, *args: str) -> list[str]:
        return [binary(), "-C", str(self.config_file), *args]

    def handover(self, role: str, flags: Sequence[str] | None = None) -> list[str]:
        """The primary-backup steps for `role` in order (only those in `flags`, when given:
        the daemon commits before its claim and flushes, resyncs and bulk-sends after it).
        Every step runs even if one before failed, as the script does. Returns the failures,
        one line each (also logged)."""
        steps = [(f, w) for f, w in HANDOVER.get(role, ()) if flags is None or f in flags]
        started = time.monotonic()
        failures = []
        for flag, what in steps:
            failures += self._step(flag, what)
        for line in failures:
            log.error("%s", line)
        if steps and not failures:
            took = time.monotonic() - started
            ran = " ".join(f for f, _ in steps)
            log.info("conntrackd handover for %s: %s done in %.3f s", role, ran, took)
        return failures

    def _step(self, flag: str, what: str) -> list[str]:
        """One client command; its failure as a line, or nothing."""
        try:
            proc = self.run(self.command(flag))
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [f"conntrackd {flag} ({what}): {exc}"]
        if proc.returncode == 0:
            return []
        said = (proc.stderr or proc.stdout).strip().splitlines()
        return [
            f"conntrackd {flag} ({what}) exited {proc.returncode}"
            + (f": {said[-1]}" if said else "")
        ]

    def stats(self) -> str:
        """`conntrackd -s`: raises SyncReadError when conntrackd does not answer."""
        argv = self.command("-s")
        try:
            proc = self.run(argv)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SyncReadError(f"conntrackd -s: {exc}") from None
        if proc.returncode != 0:
            said = (proc.stderr or proc.stdout).strip().splitlines()
            why = said[-1] if said else f"exited {proc.returncode}"
            raise SyncReadError(f"conntrackd -s: {why}")
        return proc.stdout


# ---- sync health from `conntrackd -s` -----------------------------------------------------


class SyncReadError(RuntimeError):
    """conntrackd did not answer; the message says how."""


@dataclass(frozen=True)
class SyncStats:
    """One reading of `conntrackd -s` (counters since conntrackd started)."""

    internal_entries: int  # this peer's flows, as conntrackd mirrors them
    external_entries: int  # the other peer's flows, ready to commit
    messages_sent: int
    messages_received: int
    send_errors: int
    receive_errors: int
    malformed: int
    lost: int  # sequence gaps FTFW saw (it asks for resends)

    @property
    def errors(self) -> int:
        return self.send_errors + self.receive_errors + self.malformed


_CACHE = re.compile(
    r"cache (internal|external):\s*\ncurrent active connections:\s*(\d+)", re.MULTILINE
)
_PACKETS = re.compile(r"^\s*(\d+) Pckts sent\s+(\d+) Pckts recv", re.MULTILINE)
_ERRORS = re.compile(r"^\s*(\d+) Error send\s+(\d+) Error recv", re.MULTILINE)
_TRACKING = re.compile(r"^\s*(\d+) Malformed msgs\s+(\d+) Lost msgs", re.MULTILINE)


def parse_stats(text: str) -> SyncStats:
    """The counters of `conntrackd -s` (general statistics, conntrack-tools 1.4). Raises
    ValueError naming what is missing: a sync-less conntrackd has no UDP section."""
    caches = {m.group(1): int(m.group(2)) for m in _CACHE.finditer(text)}
    packets, errors, tracking = _PACKETS.search(text), _ERRORS.search(text), _TRACKING.search(text)
    missing = [
        name
        for name, found in (
            ("cache internal", "internal" in caches),
            ("cache external", "external" in caches),
            ("UDP traffic", packets is not None and errors is not None),
            ("message tracking", tracking is not None),
        )
        if not found
    ]
    if missing:
        raise ValueError(f"conntrackd -s: no {', '.join(missing)} in its answer")
    assert packets and errors and tracking
    return SyncStats(
        internal_entries=caches["internal"],
        external_entries=caches["external"],
        messages_sent=int(packets.group(1)),
        messages_received=int(packets.group(2)),
        send_errors=int(errors.group(1)),
        receive_errors=int(errors.group(2)),
        malformed=int(tracking.group(1)),
        lost=int(tracking.group(2)),
    )


@dataclass(frozen=True)
class SyncHealth:
    """Sync as the daemon last saw it; plain values, JSON as `to_json()`. Times are wall-clock
    (Unix) so a reader in another process computes ages."""

    read_at: float
    error: str | None = None  # conntrackd did not answer (then the counters are the last known)
    internal_entries: int | None = None
    external_entries: int | None = None
    messages_received: int | None = None
    errors: int | None = None
    lost: int | None = None
    last_message_at: float | None = None  # when a message from the peer last arrived (seen)
    errors_at: float | None = None  # when the error count last grew

    def last_sync_age(self, now: float) -> float | None:
        return None if self.last_message_at is None else max(0.0, now - self.last_message_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "read_at": self.read_at,
            "error": self.error,
            "internal_entries": self.internal_entries,
            "external_entries": self.external_entries,
            "messages_received": self.messages_received,
            "errors": self.errors,
            "lost": self.lost,
            "last_message_at": self.last_message_at,
            "errors_at": self.errors_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> SyncHealth | None:
        """None for anything that is not a sync object (an older document, damage)."""
        if not isinstance(data, dict):
            return None
        read_at = _number(data.get("read_at"))
        if read_at is None:
            return None
        error = data.get("error")
        return cls(
            read_at=read_at,
            error=str(error) if error else None,
            internal_entries=_count(data.get("internal_entries")),
            external_entries=_count(data.get("external_entries")),
            messages_received=_count(data.get("messages_received")),
            errors=_count(data.get("errors")),
            lost=_count(data.get("lost")),
            last_message_at=_number(data.get("last_message_at")),
            errors_at=_number(data.get("errors_at")),
        )


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class SyncTracker:
    """Readings of `conntrackd -s` over time into SyncHealth: `conntrackd -s` has counters, not
    times, so the last message's time is when the received count was last seen to grow."""

    def __init__(self, read: Callable[[], str], clock: Callable[[], float] = time.time) -> None:
        self.read = read
        self.clock = clock
        self._last: SyncStats | None = None
        self._health: SyncHealth | None = None

    def health(self) -> SyncHealth | None:
        return self._health

    def update(self) -> SyncHealth:
        now = self.clock()
        previous = self._health
        try:
            stats = parse_stats(self.read())
        except (SyncReadError, ValueError) as exc:
            base = previous or SyncHealth(read_at=now)
            self._health = replace(base, read_at=now, error=str(exc))
            self._last = None  # a restarted conntrackd counts from zero again
            return self._health
        last = self._last
        got_message = stats.messages_received > 0 and (
            last is None or stats.messages_received > last.messages_received
        )
        new_errors = stats.errors > 0 and (last is None or stats.errors > last.errors)
        if last is None and previous is not None and previous.last_message_at is not None:
            # The first reading after a gap (start, restart): counters prove only that some
            # message arrived at some point, so keep the older time unless it moved.
            got_message = got_message and previous.messages_received != stats.messages_received
        self._health = SyncHealth(
            read_at=now,
            internal_entries=stats.internal_entries,
            external_entries=stats.external_entries,
            messages_received=stats.messages_received,
            errors=stats.errors,
            lost=stats.lost,
            last_message_at=now
            if got_message
            else (previous.last_message_at if previous else None),
            errors_at=now if new_errors else (previous.errors_at if previous else None),
        )
        self._last = stats
        return self._health


def problems(
    health: SyncHealth | None, now: float, *, silent_after: float = SILENT_AFTER
) -> list[str]:
    """Why this peer's copy of the other's connections cannot be trusted; empty when sync is
    healthy. Pure. Each one degrades the peer and lowers its VRRP priority."""
    if health is None:
        return ["sync: no reading of conntrackd yet"]
    if health.error is not None:
        return [f"sync: conntrackd does not answer ({health.error})"]
    out = []
    age = health.last_sync_age(now)
    if age is None:
        out.append("sync: no message from the other peer's conntrackd yet")
    elif age > silent_after:
        out.append(f"sync: no message from the other peer's conntrackd for {age:.0f} s")
    if health.errors_at is not None and now - health.errors_at <= ERRORS_RECENT:
        ago = now - health.errors_at
        out.append(f"sync: {health.errors} send/receive errors, the last {ago:.0f} s ago")
    return out
