"""This peer's role as keepalived reports it, and the claim that goes with being master.

`Coordinator.handle(events)` takes the notify FIFO's events in order. MASTER claims the gateway;
MASTER_RX_LOWER_PRI claims it again (after a split brain the last writer to the API wins, and
this makes the real master the last writer); BACKUP, FAULT, STOP and DELETED only record that
the role is gone: the new master's claim replaces ours, and undoing ours here would leave the
gateway pointing nowhere in between.

The claim itself is injected (the Junction redirection call, EC2 ReplaceRoute, ...), so this
module does no I/O. A claim that fails is retried with backoff for as long as this peer stays
master; `reassert` claims again when the daemon sees the VPG's gateway elsewhere while we are
master (a late claim of a peer that was master only briefly can land after ours). Events that
arrive together are applied in order but claim once, and only if the last of them leaves this
peer master: a stale MASTER followed by BACKUP in the FIFO's buffer must not move the gateway
here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from gatepeer.ha.conntrackd import SyncHealth
from gatepeer.ha.fifo import Event
from gatepeer.ha.keepalived import INSTANCE

log = logging.getLogger(__name__)

Role = Literal["unknown", "master", "backup", "fault", "stopped"]
_ROLE_OF: dict[str, Role] = {
    "MASTER": "master",
    "BACKUP": "backup",
    "FAULT": "fault",
    "STOP": "stopped",
    "DELETED": "stopped",
}
# A failed claim is retried after 1 s, then twice as long each time, at most this long.
CLAIM_RETRY_FIRST, CLAIM_RETRY_MAX = 1.0, 30.0


@dataclass(frozen=True)
class RoleView:
    """What status and metrics show; plain values, JSON as `to_json()`."""

    role: Role = "unknown"
    since: float | None = None  # wall-clock time of the last role change
    priority: int | None = None
    transitions: int = 0
    claimed_at: float | None = None  # the last successful claim, while master
    claims: int = 0  # successful claims since start
    claim_error: str | None = None  # the last failed claim's error, until one succeeds
    peer_lower_priority_at: float | None = None  # last MASTER_RX_LOWER_PRI: the peer was master
    handover_error: str | None = None  # the last conntrackd handover's failures, if any
    sync: SyncHealth | None = None  # conntrackd's sync as last read; None: no sync

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "since": self.since,
            "priority": self.priority,
            "transitions": self.transitions,
            "claimed_at": self.claimed_at,
            "claims": self.claims,
            "claim_error": self.claim_error,
            "peer_lower_priority_at": self.peer_lower_priority_at,
            "handover_error": self.handover_error,
            "sync": self.sync.to_json() if self.sync is not None else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> RoleView:
        """Tolerates an older or partial document: unknown values fall back to defaults."""
        if not isinstance(data, dict):
            return cls()
        role = data.get("role")

        def number(key: str) -> float | None:
            value = data.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            return None

        def count(key: str) -> int:
            value = data.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        priority = data.get("priority")
        error = data.get("claim_error")
        handover = data.get("handover_error")
        return cls(
            role=role if role in ("master", "backup", "fault", "stopped") else "unknown",
            since=number("since"),
            priority=priority if isinstance(priority, int) else None,
            transitions=count("transitions"),
            claimed_at=number("claimed_at"),
            claims=count("claims"),
            claim_error=str(error) if error else None,
            peer_lower_priority_at=number("peer_lower_priority_at"),
            handover_error=str(handover) if handover else None,
            sync=SyncHealth.from_json(data.get("sync")),
        )


class Coordinator:
    """Applies keepalived's events to the role and calls `claim()` when this peer must hold the
    gateway. Thread-safe: the FIFO reader calls `handle`/`tick`, status readers call `view`.

    `handover(role)`, when given, runs once per role change, after the batch of events and
    before the claim (the new master commits the other's connections and takes the NAT address
    before the gateway moves here); `after_claim(role)` right after that first claim (what
    nothing on the traffic's path waits for). Both return their failures, which are shown but
    never stop the claim."""

    def __init__(
        self,
        claim: Callable[[], None],
        *,
        instance: str = INSTANCE,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[RoleView], None] | None = None,
        handover: Callable[[Role], list[str]] | None = None,
        after_claim: Callable[[Role], list[str]] | None = None,
    ) -> None:
        self._claim = claim
        self._handover = handover
        self._after_claim = after_claim
        self.instance = instance
        self.clock = clock
        self.on_change = on_change
        self._view = RoleView()
        self._claim_due: float | None = None  # when to (re)try the claim; None: nothing owed
        self._retry_after = CLAIM_RETRY_FIRST
        self._lock = threading.Lock()

    def view(self) -> RoleView:
        with self._lock:
            return self._view

    def handle(self, events: Iterable[Event]) -> None:
        """Apply `events` in order, then claim if the last of them leaves us master."""
        changed = False
        before = self.view().role
        for event in events:
            changed |= self._apply(event)
        after = self.view().role
        failures: list[str] = []
        if after != before and self._handover is not None:
            failures = self._handover(after)
            with self._lock:
                self._view = replace(self._view, handover_error="; ".join(failures) or None)
            changed = True
        if changed and self.on_change is not None:
            self.on_change(self.view())
        self.tick()
        if after != before and self._after_claim is not None:
            failures += self._after_claim(after)
            with self._lock:
                self._view = replace(self._view, handover_error="; ".join(failures) or None)
            if self.on_change is not None:
                self.on_change(self.view())

    def tick(self) -> None:
        """Make the claim that is owed now (a new role, a re-assertion, or a retry)."""
        with self._lock:
            due = self._claim_due
            if due is None or self._view.role != "master" or self.clock() < due:
                return
        try:
            self._claim()
        except Exception as exc:  # any failure is retried, and shown
            error = str(exc) or type(exc).__name__
            with self._lock:
                self._claim_due = self.clock() + self._retry_after
                log.error(
                    "claiming the gateway failed (retry in %.0f s): %s", self._retry_after, error
                )
                self._retry_after = min(self._retry_after * 2, CLAIM_RETRY_MAX)
                self._view = replace(self._view, claim_error=error)
        else:
            with self._lock:
                self._claim_due = None
                self._retry_after = CLAIM_RETRY_FIRST
                self._view = replace(
                    self._view,
                    claimed_at=self.clock(),
                    claims=self._view.claims + 1,
                    claim_error=None,
                )
            log.info("claimed the gateway as master")
        if self.on_change is not None:
            self.on_change(self.view())

    def _apply(self, event: Event) -> bool:
        if event.kind != "INSTANCE" or event.name != self.instance:
            log.debug("ignored keepalived event for %s %r", event.kind.lower(), event.name)
            return False
        now = self.clock()
        with self._lock:
            view = self._view
            if event.priority is not None:
                view = replace(view, priority=event.priority)
            if event.state == "MASTER_RX_LOWER_PRI":
                # Only a master hears this; re-assert even if a claim is in flight or done.
                view = replace(view, peer_lower_priority_at=now)
                self._owe_claim(now)
            elif event.state in _ROLE_OF:
                role = _ROLE_OF[event.state]
                if role != view.role:
                    log.info("keepalived: %s -> %s", view.role, role)
                    view = replace(view, role=role, since=now, transitions=view.transitions + 1)
                if role == "master":
                    self._owe_claim(now)
                else:
                    self._claim_due = None
                    view = replace(view, claimed_at=None, claim_error=None)
            changed = view != self._view
            self._view = view
            return changed

    def reassert(self, why: str) -> bool:
        """Claim again now if this peer is master and no claim is already owed (the daemon
        found the VPG pointing elsewhere). True when a claim was scheduled."""
        with self._lock:
            if self._view.role != "master" or self._claim_due is not None:
                return False
            log.warning("claiming the gateway again: %s", why)
            self._owe_claim(self.clock())
            return True

    def _owe_claim(self, now: float) -> None:
        self._claim_due = now
        self._retry_after = CLAIM_RETRY_FIRST


def follow(
    read: Callable[[float], list[Event]],
    coordinator: Coordinator,
    stop: threading.Event,
    poll: float = 0.5,
) -> None:
    """The loop a daemon thread runs: FIFO events into the coordinator until `stop` is set.
    `poll` bounds how late a claim retry or a stop is noticed."""
    while not stop.is_set():
        coordinator.handle(read(poll))
