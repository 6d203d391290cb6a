"""The daemon's SIM map refresher: a thread that fetches the map at start, then every
`devices.sim_refresh_seconds`, and keeps it in `devices.sim_cache` (gatepeer/sims.py).

Its own API client, beside the gate view's refresher: a slow listSims walk must never delay a
gate refresh. The client shares nothing but the rate limit's meaning: after a 429 it waits as
`X-Soracom-Ratelimit-Seconds-Before-Refresh` asks before its next page.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatepeer import sims

if TYPE_CHECKING:
    from gatepeer.soracom import SoracomClient

log = logging.getLogger(__name__)


class SimRefresher(threading.Thread):
    def __init__(
        self,
        client: SoracomClient,
        vpg_id: str,
        path: Path,
        interval_s: float,
        *,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="sim-refresh", daemon=True)
        self.client = client
        self.vpg_id = vpg_id
        self.path = path
        self.interval_s = interval_s
        self.on_change = on_change
        self.clock = clock
        # The last kept map stands until the first fetch: a restart with a failing API still
        # names the devices.
        self._map = sims.load(path)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.refreshes = 0

    @property
    def current(self) -> sims.SimMap:
        with self._lock:
            return self._map

    def refresh_once(self) -> sims.SimMap:
        new = sims.refresh(self.client, self.vpg_id, self.path, self.current, self.clock())
        with self._lock:
            self._map = new
            self.refreshes += 1
        if self.on_change is not None:
            self.on_change()
        return new

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.refresh_once()
            except Exception as exc:  # noqa: BLE001 - the thread outlives any one failure
                log.exception("SIM map refresh crashed")
                with self._lock:
                    self._map = self._map.failed(f"SIM map refresh crashed: {exc}")
            self._stopping.wait(self.interval_s)

    def stop(self) -> None:
        self._stopping.set()

    def to_json(self) -> dict[str, Any]:
        """What the state document says of the map (status reads it there)."""
        current = self.current
        return {
            "sims": len(current.records),
            "fetched_at": current.fetched_at,
            "error": current.error,
            "path": str(self.path),
        }
