"""conntrack's connection events, read from `conntrack -E` (conntrack-tools).

Why the tool and not a netlink socket of our own (pyroute2's NFCTSocket can subscribe to the
NEW and DESTROY groups): conntrack-tools drains the netlink socket in C with a large buffer
(`-b`), so a burst of connections is absorbed by a fast reader, and this process only parses
lines; decoding each netlink message in pyroute2 costs hundreds of microseconds (NOTES.md:
~190 us per request), which under a storm means the kernel's buffer overflows sooner and
events are lost silently. When the kernel does drop events, conntrack says so on stderr
("We have hit ENOBUFS"), and that is counted.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

# The kernel socket's buffer: room for a burst of ~40,000 events.
BUFFER_BYTES = 8 * 1024 * 1024
COMMAND = (
    "conntrack",
    "-E",
    "-e",
    "NEW,DESTROY",
    "-o",
    "timestamp",
    "-b",
    str(BUFFER_BYTES),
)
OVERFLOW_MARK = "ENOBUFS"
STOP_TIMEOUT_S = 5.0


class ConntrackEvents:
    """One `conntrack -E` child: each event line goes to `on_line` (on a reader thread),
    each report of lost events to `on_overflow`. `stop` ends the child by its pid."""

    def __init__(
        self,
        on_line: Callable[[str], None],
        on_overflow: Callable[[], None],
        command: Sequence[str] = COMMAND,
    ) -> None:
        self.on_line = on_line
        self.on_overflow = on_overflow
        self.command = tuple(command)
        self.process: subprocess.Popen[str] | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        for target in (self._read_events, self._read_errors):
            thread = threading.Thread(target=target, name=f"conntrack-{target.__name__}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def _read_events(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for text in self.process.stdout:
            try:
                self.on_line(text)
            except Exception:  # noqa: BLE001 - one bad line must not end the flow log
                log.exception("flow log: cannot handle a conntrack event")

    def _read_errors(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for text in self.process.stderr:
            if OVERFLOW_MARK in text:
                self.on_overflow()
            elif "NOTICE" not in text and "flow events have been shown" not in text:
                log.warning("flow log: conntrack: %s", text.strip())

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for thread in self._threads:
            thread.join(STOP_TIMEOUT_S)
        self._threads.clear()
