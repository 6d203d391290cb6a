"""What the collectors read at scrape time, behind small provider interfaces.

The collectors never touch the agent, the kernel or nftables directly: they ask a provider.
The live providers below read the running daemon's agent, rtnetlink (stdlib `kernel.rtnl`, a
socket per call, so scrapes need no lock with the agent's own pyroute2 socket) and /proc/sys;
the tests pass fakes and compare the exposition with golden files.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gatepeer.device_traffic import DeviceReading
from gatepeer.kernel import rtnl, sysctl
from gatepeer.soracom import ApiStats
from gatepeer.state_document import StateSummary

if TYPE_CHECKING:
    from gatepeer.agent import Agent
    from gatepeer.metrics.devices import SimMapFields

log = logging.getLogger(__name__)

CONNTRACK_COUNT = "net/netfilter/nf_conntrack_count"
CONNTRACK_MAX = "net/netfilter/nf_conntrack_max"
NEIGHBOUR_LIMIT = "net/ipv4/neigh/default/gc_thresh3"  # only in the initial network namespace


class AgentSource(Protocol):
    def summary(self) -> StateSummary:
        """The agent's state document (what state.json holds right now)."""

    def api_stats(self) -> ApiStats:
        """A consistent copy of the API client's counters."""

    def reconcile_durations(self) -> tuple[int, Sequence[float]]:
        """(reconciles counted so far, the most recent durations in seconds)."""


class KernelSource(Protocol):
    def link(self, name: str) -> rtnl.LinkReading | None: ...

    def flood_destinations(self, index: int) -> frozenset[ipaddress.IPv4Address]: ...

    def addresses(self, index: int) -> Sequence[ipaddress.IPv4Interface]: ...

    def neighbour_count(self, index: int) -> int: ...

    def sysctl(self, path: str) -> int | None: ...


class PacketPathSource(Protocol):
    def counters(self) -> Mapping[str, tuple[int, int]] | None:
        """Named nftables counters as (packets, bytes); None when the table is not there."""


class LiveAgent:
    """The daemon's current agent (it is replaced on SIGHUP, so it is looked up per scrape)."""

    def __init__(self, agent: Callable[[], Agent]) -> None:
        self._agent = agent

    def summary(self) -> StateSummary:
        """The document the agent last wrote (after a reconcile, a probe round or an HA
        change): its verdict is read, not judged again. Built afresh only before the first."""
        agent = self._agent()
        return (agent.written or agent.document()).summary

    def api_stats(self) -> ApiStats:
        stats = self._agent().api_stats
        with stats.lock:
            return ApiStats(
                requests=dict(stats.requests),
                seconds=dict(stats.seconds),
                ratelimit_remaining=stats.ratelimit_remaining,
                auth_failures=stats.auth_failures,
            )

    def reconcile_durations(self) -> tuple[int, Sequence[float]]:
        record = self._agent().record
        return record.reconciles, list(record.durations)


class LiveKernel:
    def link(self, name: str) -> rtnl.LinkReading | None:
        return rtnl.link(name)

    def flood_destinations(self, index: int) -> frozenset[ipaddress.IPv4Address]:
        return rtnl.flood_destinations(index)

    def addresses(self, index: int) -> Sequence[ipaddress.IPv4Interface]:
        return rtnl.addresses(index)

    def neighbour_count(self, index: int) -> int:
        return rtnl.neighbour_count(index)

    def sysctl(self, path: str) -> int | None:
        try:
            return sysctl.read(path)
        except (OSError, ValueError):
            return None


class LivePacketPath:
    """nftables' named counters, when the packet path module exists and its table is loaded."""

    def counters(self) -> Mapping[str, tuple[int, int]] | None:
        try:
            from gatepeer.kernel import nftables
        except ImportError:
            return None  # this build has no packet path module
        read = getattr(nftables, "counters", None)
        if read is None:
            return None
        try:
            found = dict(read())
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail on a missing table
            log.debug("nftables counters unavailable: %s", exc)
            return None
        return found or None  # empty: our table is not loaded


class LiveDevices:
    """The kernel's per-device counters (`kernel.device_sets`, from the packet path) and
    the daemon's SIM map. Either may be missing from this build or this configuration: then
    the device metrics are absent, never zeros."""

    def __init__(
        self,
        counting: Callable[[], bool],
        sim_map: Callable[[], SimMapFields | None],
        reading_file: Callable[[], Path | None] = lambda: None,
    ) -> None:
        self._counting = counting
        self._sim_map = sim_map
        # Where each reading is kept for `gatepeer devices` (gatepeer.device_reading).
        self._reading_file = reading_file

    def traffic(self) -> DeviceReading | None:
        """One reading, as columns (the daemon keeps none between readings); kept on disk
        joined with the SIM map for `gatepeer devices`."""
        if not self._counting():
            return None
        from gatepeer.kernel import device_sets

        try:
            # Over netlink, straight into columns: `nftables.device_traffic` (nft -j) makes
            # over 100 MB of objects at 100,000 devices.
            found = device_sets.device_reading()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail on a missing table
            log.debug("per-device counters unavailable: %s", exc)
            return None
        path = self._reading_file()
        if path is not None:
            from gatepeer import device_reading
            from gatepeer.sims import SimMap

            sim_map = self._sim_map()
            joined = sim_map if isinstance(sim_map, SimMap) else None
            device_reading.keep(path, found, time.time(), joined)
        return found

    def sims(self) -> SimMapFields | None:
        return self._sim_map()
