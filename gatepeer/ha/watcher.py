"""The daemon's side of HA in one object: the notify FIFO read on a thread, fed to the
coordinator, and (with `ha.conntrack_sync`) conntrackd's sync read on the same thread. The
daemon starts it before keepalived runs (it makes the FIFO), puts `view()` in state.json as
"ha", and stops it at exit; the claim and the handover are whatever the daemon injects."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from gatepeer.ha.conntrackd import SyncTracker
from gatepeer.ha.fifo import NotifyFifo
from gatepeer.ha.role import Coordinator, Role, RoleView

log = logging.getLogger(__name__)

# How late a claim retry or a stop request is noticed at most.
POLL_SECONDS = 0.5
# How often conntrackd's statistics are read (FTFW's idle ALIVE messages come every second).
SYNC_READ_SECONDS = 1.0


class HaWatcher:
    def __init__(
        self,
        fifo_path: Path,
        claim: Callable[[], None],
        on_change: Callable[[RoleView], None] | None = None,
        poll: float = POLL_SECONDS,
        handover: Callable[[Role], list[str]] | None = None,
        sync: SyncTracker | None = None,
        after_claim: Callable[[Role], list[str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fifo = NotifyFifo(fifo_path)
        self.coordinator = Coordinator(
            claim, on_change=on_change, handover=handover, after_claim=after_claim
        )
        self.sync = sync
        self.poll = poll
        self.clock = clock
        self._sync_read_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Makes and opens the FIFO here, so a bad path fails the start (FifoError)."""
        self.fifo.open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ha-fifo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.coordinator.handle(self.fifo.read(self.poll))
                self.read_sync()
        except Exception:
            log.exception("reading keepalived's notify FIFO failed; HA state changes are lost")
            raise

    def read_sync(self) -> None:
        """Read conntrackd's statistics when the last reading is SYNC_READ_SECONDS old."""
        if self.sync is None:
            return
        now = self.clock()
        if self._sync_read_at is not None and now - self._sync_read_at < SYNC_READ_SECONDS:
            return
        self._sync_read_at = now
        self.sync.update()

    def view(self) -> RoleView:
        view = self.coordinator.view()
        if self.sync is None:
            return view
        return replace(view, sync=self.sync.health())

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.fifo.close()
