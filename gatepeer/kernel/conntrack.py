"""Connections open per device address, from one dump of the kernel's connection table.

One `conntrack -L` for all devices (never one call per device): the dump is read once and
each entry counted for the addresses of its original direction (the device that opened it,
or the device a VPC host opened it to). Route mode leaves device<->VPC traffic untracked for
speed, so there the count is what conntrack holds: connections that are NATed or tracked.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Collection, Iterable
from ipaddress import IPv4Address

CONNTRACK_TIMEOUT_S = 10.0


class ConntrackUnavailable(RuntimeError):
    """The table could not be read; the message says why, on one line."""


def dump(netns: str | None = None) -> str:
    """The IPv4 connection table as `conntrack -L` prints it."""
    argv = (["ip", "netns", "exec", netns] if netns else []) + ["conntrack", "-L", "-f", "ipv4"]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=CONNTRACK_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise ConntrackUnavailable(
            "conntrack is not installed: apt-get install conntrack"
        ) from None
    except subprocess.TimeoutExpired:
        raise ConntrackUnavailable(f"conntrack -L took over {CONNTRACK_TIMEOUT_S:g}s") from None
    if proc.returncode != 0:
        why = " ".join(proc.stderr.split())[:200] or f"exit {proc.returncode}"
        raise ConntrackUnavailable(f"conntrack -L failed: {why}")
    return proc.stdout


def count_by_address(text: str, addresses: Iterable[IPv4Address]) -> dict[IPv4Address, int]:
    """Pure: entries of a `conntrack -L` dump per address in `addresses`, counted where the
    address is the original direction's source or destination (once per entry and address).
    Every address asked for is in the answer, with 0 when it has no entry."""
    wanted = {str(a): a for a in addresses}
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        src = _field(line, " src=")
        dst = _field(line, " dst=")
        if src in wanted:
            counts[src] += 1
        if dst in wanted and dst != src:
            counts[dst] += 1
    return {address: counts[text_form] for text_form, address in wanted.items()}


def count_by_integer(text: str, integers: Collection[int]) -> dict[int, int]:
    """As `count_by_address`, by the addresses' integers, and only those with an entry: no
    IPv4Address made or hashed per address asked for (`gatepeer devices` asks for 10,000)."""
    counts: dict[int, int] = {}
    parsed: dict[str, int | None] = {}
    for line in text.splitlines():
        src = _field(line, " src=")
        dst = _field(line, " dst=")
        for value in (src, dst if dst != src else None):
            if value is None:
                continue
            if value not in parsed:
                try:
                    parsed[value] = int(IPv4Address(value))
                except ValueError:  # an IPv6 entry
                    parsed[value] = None
            n = parsed[value]
            if n is not None and n in integers:
                counts[n] = counts.get(n, 0) + 1
    return counts


def count_by_text(text: str, addresses: Collection[str]) -> dict[str, int]:
    """As `count_by_address`, by the addresses' dotted quads, and only those with an entry:
    nothing parsed per address (`gatepeer devices` asks for 10,000, already as text)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        src = _field(line, " src=")
        dst = _field(line, " dst=")
        if src is not None and src in addresses:
            counts[src] = counts.get(src, 0) + 1
        if dst is not None and dst != src and dst in addresses:
            counts[dst] = counts.get(dst, 0) + 1
    return counts


def _field(line: str, marker: str) -> str | None:
    """The first `marker`VALUE in the line: the original direction's (the reply's come after)."""
    start = line.find(marker)
    if start < 0:
        return None
    start += len(marker)
    end = line.find(" ", start)
    return line[start:] if end < 0 else line[start:end]
