"""The daemon's flow log: conntrack's events (`kernel.conntrack_events`) made into records
(`flow_log`), rate-limited, written to the unit's stdout (the journal) or to a file rotated by
size. Counters of what was written and what was dropped feed the metrics."""

from __future__ import annotations

import ipaddress
import logging
import logging.handlers
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gatepeer import flow_log
from gatepeer.config import FlowLogConfig
from gatepeer.kernel.conntrack_events import ConntrackEvents

log = logging.getLogger(__name__)
RECORDS_LOGGER = "gatepeer.flow_log.records"


@dataclass
class FlowLogStats:
    written: int = 0
    dropped_rate_limit: int = 0
    overflows: int = 0  # times the kernel reported lost events (how many it lost is unknown)
    starts: int = 0


def _handler(cfg: FlowLogConfig) -> logging.Handler:
    if cfg.file is None:
        return logging.StreamHandler(sys.stdout)
    cfg.file.parent.mkdir(parents=True, exist_ok=True)
    return logging.handlers.RotatingFileHandler(
        cfg.file, maxBytes=cfg.file_max_bytes, backupCount=cfg.file_backups, encoding="utf-8"
    )


class FlowLogger:
    def __init__(
        self,
        cfg: FlowLogConfig,
        devices: Callable[[], flow_log.DeviceScope | None],
        sim_name: Callable[[ipaddress.IPv4Address], str | None] = lambda _: None,
        *,
        clock: Callable[[], float] = time.monotonic,
        events: Callable[..., ConntrackEvents] = ConntrackEvents,
    ) -> None:
        self.cfg = cfg
        self.devices = devices
        self.sim_name = sim_name
        self.stats = FlowLogStats()
        self._lock = threading.Lock()
        self._limit = flow_log.RateLimit(cfg.rate_per_second, clock)
        self._events_factory = events
        self._events: ConntrackEvents | None = None
        self._records = logging.getLogger(RECORDS_LOGGER)
        self._records.propagate = False  # records are data, never mixed into the daemon's log
        self._records.setLevel(logging.INFO)
        self._handler = _handler(cfg)
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._records.addHandler(self._handler)

    def handle(self, text: str) -> None:
        """One line from conntrack: a record written, dropped by the limit, or not ours."""
        scope = self.devices()
        event = flow_log.parse_event(text)
        if scope is None or event is None:
            return
        fields = flow_log.record(event, scope, self.sim_name)
        if fields is None:
            return
        with self._lock:
            if not self._limit.allow():
                self.stats.dropped_rate_limit += 1
                return
            self.stats.written += 1
        self._records.info("%s", flow_log.line(fields))

    def _overflow(self) -> None:
        with self._lock:
            self.stats.overflows += 1
        log.warning("flow log: the kernel dropped connection events (a burst beyond the buffer)")

    def ensure_running(self) -> None:
        """Start conntrack -E, or start it again if it ended (called after every reconcile)."""
        if self._events is not None and self._events.running():
            return
        if self._events is not None:
            self._events.stop()
            log.warning("flow log: conntrack -E ended; starting it again")
        self._events = self._events_factory(self.handle, self._overflow)
        try:
            self._events.start()
        except OSError as exc:
            log.error("flow log: cannot run conntrack -E: %s", exc)
            self._events = None
            return
        self.stats.starts += 1

    def stop(self) -> None:
        if self._events is not None:
            self._events.stop()
            self._events = None
        self._records.removeHandler(self._handler)
        self._handler.close()
