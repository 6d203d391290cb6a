"""Is each VPG endpoint answering? ICMP echo to its inner address, through the tunnel.

Each endpoint's inner address is on-link on vxlan0 and only that endpoint answers ARP for it,
so an echo reply proves the whole path to that one endpoint: underlay, encapsulation, the
endpoint's FDB entry back to us and its IP stack. Endpoints are probed independently: each has
its own schedule, window and state, so one dead endpoint never hides or delays another.

The socket is SOCK_RAW, not the unprivileged SOCK_DGRAM "ping" socket: the latter needs the
caller's group in net.ipv4.ping_group_range, which is "1 0" (nobody, root included) in every
new network namespace and on many hosts. The daemon runs as root with CAP_NET_RAW anyway. The
raw socket is bound to the tunnel interface (SO_BINDTODEVICE), so a probe can never leave by
another route and only replies that came through the tunnel are seen; an ICMP filter drops
everything but echo replies in the kernel, and the identifier sorts ours from anyone else's.

States: "up" after a probe answered; "down" after DOWN_AFTER probes in a row went unanswered;
"unknown" before either (or with no inner address to probe). A lost probe is confirmed by a
second one sent at once rather than an interval later: a single lost packet never marks an
endpoint down (it shows as loss), and a dead one is down within interval + 2 × timeout.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from gatepeer.desired_state import Endpoint, IPv4Address
from gatepeer.kernel import icmp
from gatepeer.state_document import ProbeResult, ProbeState

log = logging.getLogger(__name__)

WINDOW = 10  # probes kept per endpoint for the loss ratio
DOWN_AFTER = 2  # unanswered probes in a row that mark an endpoint down


class _Track:
    """One endpoint's schedule and window (mutated by the probe thread only)."""

    def __init__(self, endpoint: Endpoint, now: float) -> None:
        self.endpoint = endpoint
        self.window: deque[bool] = deque(maxlen=WINDOW)
        self.failures_in_row = 0
        self.state: ProbeState = "unknown"
        self.rtt_s: float | None = None
        self.error: str | None = None
        self.next_due = now
        self.pending: tuple[int, float] | None = None  # (sequence, sent at)

    def record(self, ok: bool, rtt_s: float | None) -> None:
        self.window.append(ok)
        self.rtt_s = rtt_s
        if ok:
            self.failures_in_row = 0
            self.state = "up"
        else:
            self.failures_in_row += 1
            if self.failures_in_row >= DOWN_AFTER:
                self.state = "down"

    def result(self) -> ProbeResult:
        if self.endpoint.inner is None:
            return ProbeResult("unknown", None, None, "the API gave no inner address")
        loss = self.window.count(False) / len(self.window) if self.window else None
        return ProbeResult(self.state, self.rtt_s, loss, self.error)


Reply = tuple[IPv4Address, int, float]  # source, sequence, received at (the prober's clock)


class Transport(Protocol):
    """Sends echo requests and returns the replies that came within a timeout."""

    def send(self, dst: IPv4Address, seq: int) -> None: ...

    def wait(self, timeout: float) -> list[Reply]: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class IcmpTransport:
    """A raw ICMP socket bound to the tunnel interface, reopened when the interface is
    re-created (a socket bound to a deleted link stays bound to its old index)."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.ident = random.randrange(1, 0x10000)
        self._sock: socket.socket | None = None
        self._bound_index: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._closed = False
        self._close_lock = threading.Lock()  # wake() from another thread must not hit a reused fd

    def _socket(self) -> socket.socket:
        try:
            index = socket.if_nametoindex(self.interface)
        except OSError:
            self._drop()
            raise OSError(errno.ENODEV, f"no interface {self.interface}") from None
        if self._sock is None or index != self._bound_index:
            self._drop()
            sock = icmp.open_raw(keep=(icmp.ICMP_ECHO_REPLY,), interface=self.interface)
            self._sock, self._bound_index = sock, index
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._bound_index = None, None

    def send(self, dst: IPv4Address, seq: int) -> None:
        self._socket().sendto(icmp.echo_request(self.ident, seq), (str(dst), 0))

    def wait(self, timeout: float) -> list[Reply]:
        fds: list[Any] = [self._wake_r]
        if self._sock is not None:
            fds.append(self._sock)
        readable, _, _ = select.select(fds, [], [], max(0.0, timeout))
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 64)
        replies = []
        if self._sock is not None and self._sock in readable:
            while True:
                try:
                    packet, (src, _) = self._sock.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    break
                seq = icmp.parse_echo_reply(packet, self.ident)
                if seq is not None:
                    replies.append((IPv4Address(src), seq, time.monotonic()))
        return replies

    def wake(self) -> None:
        with self._close_lock, contextlib.suppress(OSError):
            if not self._closed:
                os.write(self._wake_w, b"x")

    def close(self) -> None:
        self._drop()
        with self._close_lock:
            if not self._closed:
                self._closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)


class Prober(threading.Thread):
    """Probes the endpoints `targets()` returns (read again every round: the gate view may
    change); `on_update()` runs in this thread after every round that recorded a result.
    `clock` must be the clock the transport stamps replies with (time.monotonic for ICMP)."""

    def __init__(
        self,
        interval: float,
        timeout: float,
        targets: Callable[[], Sequence[Endpoint]],
        transport: Transport,
        *,
        on_update: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="prober", daemon=True)
        self.interval = interval
        self.timeout = timeout
        self.targets = targets
        self.transport = transport
        self.on_update = on_update
        self.clock = clock
        self._tracks: dict[IPv4Address, _Track] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._seq = random.randrange(0x10000)

    def results(self) -> dict[IPv4Address, ProbeResult]:
        """Per endpoint (by outer address); safe to call from any thread."""
        with self._lock:
            return {outer: track.result() for outer, track in self._tracks.items()}

    def stop(self) -> None:
        self._stopping.set()
        self.transport.wake()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - a probe bug must not kill the thread
                    log.exception("prober: round failed")
                    self._stopping.wait(self.interval)
        finally:
            self.transport.close()

    def _sync(self, now: float) -> None:
        wanted = {e.outer: e for e in self.targets()}
        with self._lock:
            for outer in [o for o in self._tracks if o not in wanted]:
                del self._tracks[outer]
            for outer, endpoint in wanted.items():
                track = self._tracks.get(outer)
                if track is None or track.endpoint.inner != endpoint.inner:
                    self._tracks[outer] = _Track(endpoint, now)

    def step(self) -> None:
        """One round: send what is due, wait for replies or the next deadline, record."""
        now = self.clock()
        self._sync(now)
        tracks = [t for t in self._tracks.values() if t.endpoint.inner is not None]
        for track in tracks:
            if track.pending is None and track.next_due <= now:
                self._send(track, now)
        deadlines = [t.pending[1] + self.timeout if t.pending else t.next_due for t in tracks] or [
            now + self.interval
        ]
        replies = self.transport.wait(min(deadlines) - self.clock())
        if self._record(replies, self.clock()) and self.on_update is not None:
            self.on_update()

    def _send(self, track: _Track, now: float) -> None:
        self._seq = (self._seq + 1) & 0xFFFF
        track.pending = (self._seq, now)
        assert track.endpoint.inner is not None
        try:
            self.transport.send(track.endpoint.inner, self._seq)
            track.error = None
        except icmp.ProbeUnavailable as exc:
            # Not the endpoint's fault: unknown, not down, and no alarm; try again later.
            why = exc.strerror or str(exc)
            if track.error != why:
                log.warning("prober: %s", why)
            track.pending, track.state, track.error = None, "unknown", why
            track.next_due = now + self.interval
        except OSError as exc:
            # Counted as unanswered when its timeout passes: the rhythm stays the same.
            track.error = f"cannot send: {exc.strerror or exc}"

    def _record(self, replies: Iterable[Reply], now: float) -> bool:
        recorded = False
        with self._lock:
            by_seq = {t.pending[0]: t for t in self._tracks.values() if t.pending}
            for src, seq, received in replies:
                track = by_seq.get(seq)
                if track is None or track.pending is None or track.endpoint.inner != src:
                    continue  # late, or not ours
                sent = track.pending[1]
                track.record(True, max(0.0, received - sent))
                track.pending = None
                track.next_due = sent + self.interval
                recorded = True
            for track in self._tracks.values():
                if track.pending and now >= track.pending[1] + self.timeout:
                    sent = track.pending[1]
                    track.record(False, None)
                    track.pending = None
                    confirm = 0 < track.failures_in_row < DOWN_AFTER
                    track.next_due = now if confirm else sent + self.interval
                    recorded = True
        return recorded
