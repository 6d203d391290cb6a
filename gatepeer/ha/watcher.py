"""The daemon's side of HA in one object: the notify FIFO read on a thread, fed to the
coordinator. The daemon starts it before keepalived runs (it makes the FIFO), puts `view()`
in state.json as "ha", and stops it at exit; the claim is whatever the daemon injects."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from gatepeer.ha.fifo import NotifyFifo
from gatepeer.ha.role import Coordinator, RoleView, follow

log = logging.getLogger(__name__)

# How late a claim retry or a stop request is noticed at most.
POLL_SECONDS = 0.5


class HaWatcher:
    def __init__(
        self,
        fifo_path: Path,
        claim: Callable[[], None],
        on_change: Callable[[RoleView], None] | None = None,
        poll: float = POLL_SECONDS,
    ) -> None:
        self.fifo = NotifyFifo(fifo_path)
        self.coordinator = Coordinator(claim, on_change=on_change)
        self.poll = poll
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
            follow(self.fifo.read, self.coordinator, self._stop, self.poll)
        except Exception:
            log.exception("reading keepalived's notify FIFO failed; HA state changes are lost")
            raise

    def view(self) -> RoleView:
        return self.coordinator.view()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.fifo.close()
