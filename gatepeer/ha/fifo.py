"""keepalived's notify FIFO: its lines as typed events, in the order keepalived wrote them.

keepalived writes one line per state change, `INSTANCE "gatepeer" MASTER 100` (kind, quoted
name, state, priority), to a FIFO it opens non-blocking and read-write. We prefer the FIFO to
notify scripts because keepalived runs scripts concurrently, so two fast transitions can act in
the wrong order; the FIFO keeps them in sequence.

gatepeer creates the FIFO itself and opens it read-write too, for two reasons: keepalived then
finds it existing and never unlinks it when it stops, and a FIFO with a writer of our own never
reads as end-of-file, so keepalived can restart while we keep reading the same FIFO. Lines
keepalived wrote while nobody read wait in the pipe's buffer and come first, in order.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

# What an instance can report (keepalived.conf(5), "notify" and "notify fifo"): the transitions,
# the master hearing a lower-priority master (split brain healing), and priority changes.
STATES = frozenset(
    {
        "MASTER",
        "BACKUP",
        "FAULT",
        "STOP",
        "DELETED",
        "MASTER_RX_LOWER_PRI",
        "MASTER_PRIORITY",
        "BACKUP_PRIORITY",
    }
)
_LINE = re.compile(r'^(INSTANCE|GROUP) "([^"]{1,256})" ([A-Z_]+)(?: (-?\d{1,5}))?$')
# Longer than any line keepalived writes; a longer run without a newline is garbage to drop.
MAX_LINE = 1024
READ_SIZE = 65536


class FifoError(OSError):
    """The notify FIFO cannot be made or opened; the message names the path."""


@dataclass(frozen=True)
class Event:
    kind: Literal["INSTANCE", "GROUP"]
    name: str
    state: str  # one of STATES
    priority: int | None  # None when the line has none


def parse_line(line: str) -> Event | None:
    """The event a line reports, or None for a line this version does not know."""
    match = _LINE.match(line.strip())
    if match is None or match.group(3) not in STATES:
        return None
    kind: Literal["INSTANCE", "GROUP"] = "INSTANCE" if match.group(1) == "INSTANCE" else "GROUP"
    priority = int(match.group(4)) if match.group(4) is not None else None
    return Event(kind, match.group(2), match.group(3), priority)


class LineSplitter:
    """Bytes in, whole lines out, in order; a partial line waits for the rest."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        *lines, self._pending = (self._pending + data).split(b"\n")
        if len(self._pending) > MAX_LINE:
            log.warning("notify FIFO: dropped %d bytes without a newline", len(self._pending))
            self._pending = b""
        return [line.decode("utf-8", errors="replace") for line in lines]


def parse_lines(lines: list[str]) -> list[Event]:
    events = []
    for line in lines:
        event = parse_line(line)
        if event is None:
            if line.strip():
                log.debug("notify FIFO: ignored %r", line[:200])
            continue
        events.append(event)
    return events


class NotifyFifo:
    """The FIFO at `path`, made if missing (mode 0600: state changes are nobody else's).

    `read(timeout)` returns the events that arrived, in order, waiting up to `timeout` seconds
    for the first. If the path is replaced (someone deleted it, keepalived made a new one),
    the next read reopens it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._splitter = LineSplitter()

    def open(self) -> None:
        if self._fd is not None:
            return
        try:
            os.mkfifo(self.path, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise FifoError(
                exc.errno, f"cannot make the notify FIFO {self.path}: {exc.strerror}"
            ) from None
        try:
            if not stat.S_ISFIFO(os.stat(self.path).st_mode):
                raise FifoError(errno.EEXIST, f"{self.path} exists and is not a FIFO")
            # Read-write and non-blocking: the open never waits for a writer; select gates reads.
            self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FifoError:
            raise
        except OSError as exc:
            raise FifoError(
                exc.errno, f"cannot open the notify FIFO {self.path}: {exc.strerror}"
            ) from None
        self._splitter = LineSplitter()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> NotifyFifo:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, timeout: float) -> list[Event]:
        self._reopen_if_replaced()
        assert self._fd is not None
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not ready:
            return []
        chunks = []
        while True:
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        return parse_lines(self._splitter.feed(b"".join(chunks)))

    def _reopen_if_replaced(self) -> None:
        if self._fd is not None:
            try:
                on_disk = os.stat(self.path)
                same = os.path.samestat(on_disk, os.fstat(self._fd))
            except FileNotFoundError:
                same = False
            if same:
                return
            log.warning("notify FIFO %s was replaced or removed: opening it again", self.path)
            self.close()
        self.open()
