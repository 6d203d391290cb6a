"""The endpoint prober: schedule, window, states and health, with a fake clock and transport;
the ICMP encoding; and the thread's prompt stop. The real socket runs in the lab tests
(tests/lab/test_status_lab.py: an endpoint cut off and restored)."""

from __future__ import annotations

import errno
import struct
import time

import pytest

from gatepeer.desired_state import Endpoint, IPv4Address
from gatepeer.health import Signals, evaluate
from gatepeer.kernel.icmp import ProbeUnavailable, checksum, echo_request, parse_echo_reply
from gatepeer.probes import (
    DOWN_AFTER,
    WINDOW,
    IcmpTransport,
    Prober,
    Reply,
)
from gatepeer.state_document import ProbeResult, StateSummary, endpoint_report, probe_signals

A = IPv4Address
IN1, IN2 = A("198.19.0.1"), A("198.19.0.2")
EP1 = Endpoint(A("198.18.1.11"), IN1)
EP2 = Endpoint(A("198.18.1.12"), IN2)
INTERVAL, TIMEOUT = 5.0, 1.0


def probe_health(
    endpoints: list[Endpoint], results: dict[IPv4Address, ProbeResult]
) -> tuple[str, list[str]]:
    """What the probes alone say, the way the daemon's document judges them: reported,
    read back, and given to the evaluator as its probe signals."""
    read = StateSummary.from_state({"endpoints": endpoint_report(endpoints, results, None)})
    verdict = evaluate(Signals(probes=probe_signals(read.endpoints)))
    return verdict.health, list(verdict.reasons)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeTransport:
    """Answers each inner address after `rtt[address]` seconds; None never answers. `wait`
    moves the fake clock to the first reply or by the whole timeout."""

    def __init__(self, clock: FakeClock, rtt: dict[IPv4Address, float | None]) -> None:
        self.clock = clock
        self.rtt = rtt
        self.sent: list[tuple[float, IPv4Address, int]] = []
        self.inflight: list[tuple[float, IPv4Address, int]] = []
        self.drop_next: set[IPv4Address] = set()
        self.send_error: OSError | None = None

    def send(self, dst: IPv4Address, seq: int) -> None:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append((self.clock.t, dst, seq))
        rtt = self.rtt.get(dst)
        if dst in self.drop_next:
            self.drop_next.discard(dst)
        elif rtt is not None:
            self.inflight.append((self.clock.t + rtt, dst, seq))

    def wait(self, timeout: float) -> list[Reply]:
        due = sorted(a for a in self.inflight if a[0] <= self.clock.t + max(0.0, timeout))
        if not due:
            self.clock.t += max(0.0, timeout)
            return []
        self.clock.t = max(self.clock.t, due[0][0])
        ready = [a for a in self.inflight if a[0] <= self.clock.t]
        self.inflight = [a for a in self.inflight if a[0] > self.clock.t]
        return [(src, seq, at) for at, src, seq in ready]

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


def make(
    rtt: dict[IPv4Address, float | None], endpoints: list[Endpoint] | None = None
) -> tuple[Prober, FakeTransport, FakeClock, list[Endpoint]]:
    clock = FakeClock()
    transport = FakeTransport(clock, rtt)
    targets = list(endpoints if endpoints is not None else [EP1, EP2])
    prober = Prober(INTERVAL, TIMEOUT, lambda: targets, transport, clock=clock)
    return prober, transport, clock, targets


def run_until(prober: Prober, clock: FakeClock, seconds: float) -> None:
    end = clock.t + seconds
    while clock.t < end:
        prober.step()


def test_answering_endpoints_are_up_with_their_own_round_trip() -> None:
    prober, transport, clock, _ = make({IN1: 0.002, IN2: 0.004})
    assert prober.results() == {}
    run_until(prober, clock, 3 * INTERVAL)
    results = prober.results()
    for outer, rtt in ((EP1.outer, 0.002), (EP2.outer, 0.004)):
        assert (results[outer].state, results[outer].loss) == ("up", 0.0)
        assert results[outer].rtt_s == pytest.approx(rtt)
    # One probe per endpoint per interval, not more.
    assert sum(1 for _, dst, _ in transport.sent if dst == IN1) == 3


def test_a_silent_endpoint_is_confirmed_at_once_and_down_the_other_stays_up() -> None:
    prober, transport, clock, targets = make({IN1: 0.002, IN2: None})
    start = clock.t
    while prober.results().get(EP2.outer, ProbeResult("unknown", None, None)).state != "down":
        prober.step()
        assert clock.t - start < INTERVAL, "not down within one interval"
    # The confirmation went out when the first probe timed out, not an interval later.
    to_ep2 = [t for t, dst, _ in transport.sent if dst == IN2]
    assert to_ep2 == [start, start + TIMEOUT]
    assert clock.t - start == pytest.approx(DOWN_AFTER * TIMEOUT)
    results = prober.results()
    assert results[EP2.outer] == ProbeResult("down", None, 1.0)
    assert results[EP1.outer].state == "up"
    health, reasons = probe_health(targets, results)
    assert health == "degraded"
    assert reasons == [
        "VPG endpoint 198.18.1.12 (inner 198.19.0.2) does not answer probes through the tunnel"
    ]
    # Once down it is probed at the normal interval again.
    run_until(prober, clock, 3 * INTERVAL)
    later = [t for t, dst, _ in transport.sent if dst == IN2][2:]
    assert all(b - a == pytest.approx(INTERVAL) for a, b in zip(later, later[1:], strict=False))


def test_one_lost_echo_is_loss_not_down_and_an_answer_brings_it_back() -> None:
    prober, transport, clock, _ = make({IN1: 0.001}, [EP1])
    run_until(prober, clock, 4 * INTERVAL)
    transport.drop_next.add(IN1)
    run_until(prober, clock, INTERVAL)
    result = prober.results()[EP1.outer]
    assert result.state == "up"
    assert result.loss == pytest.approx(1 / 6)  # 4 answered, 1 lost, 1 confirmation answered


def test_loss_is_over_a_sliding_window_and_recovery_is_immediate() -> None:
    prober, transport, clock, _ = make({IN1: None}, [EP1])
    run_until(prober, clock, 20 * INTERVAL)
    assert prober.results()[EP1.outer] == ProbeResult("down", None, 1.0)
    transport.rtt[IN1] = 0.003
    run_until(prober, clock, 3 * INTERVAL)
    result = prober.results()[EP1.outer]
    assert result.state == "up"
    assert result.loss == pytest.approx((WINDOW - 3) / WINDOW)


def test_unknown_before_any_result_and_without_an_inner_address() -> None:
    no_inner = Endpoint(A("198.18.1.13"), None)
    prober, transport, clock, targets = make({IN1: None}, [EP1, no_inner])
    prober.step()  # the first probe to EP1 timed out: not confirmed yet
    results = prober.results()
    assert results[EP1.outer].state == "unknown"
    assert results[no_inner.outer] == ProbeResult(
        "unknown", None, None, "the API gave no inner address"
    )
    assert [dst for _, dst, _ in transport.sent] == [IN1]
    assert probe_health(targets, results) == ("ok", [])


def test_a_send_error_is_unanswered_at_the_timeout_without_a_busy_loop() -> None:
    prober, transport, clock, _ = make({IN1: 0.001}, [EP1])
    transport.send_error = OSError(errno.ENODEV, "No such device")
    steps = 0
    end = clock.t + 10 * INTERVAL
    while clock.t < end:
        prober.step()
        steps += 1
    assert steps < 30  # a busy loop would never advance the fake clock
    result = prober.results()[EP1.outer]
    assert result.state == "down"
    assert result.error == "cannot send: No such device"


def test_no_raw_socket_is_unknown_not_down() -> None:
    prober, transport, clock, targets = make({IN1: 0.001}, [EP1])
    transport.send_error = ProbeUnavailable(errno.EPERM, "needs CAP_NET_RAW")
    run_until(prober, clock, 10 * INTERVAL)
    result = prober.results()[EP1.outer]
    assert (result.state, result.error) == ("unknown", "needs CAP_NET_RAW")
    assert probe_health(targets, prober.results()) == ("ok", [])
    transport.send_error = None  # capability granted: probing resumes by itself
    run_until(prober, clock, 2 * INTERVAL)
    assert prober.results()[EP1.outer].state == "up"


def test_targets_follow_the_gate_view() -> None:
    prober, _, clock, targets = make({IN1: 0.001, IN2: 0.001})
    run_until(prober, clock, INTERVAL)
    assert set(prober.results()) == {EP1.outer, EP2.outer}
    targets.remove(EP2)
    moved = Endpoint(EP1.outer, A("198.19.0.9"))  # a new inner address starts afresh
    targets[0] = moved
    prober.step()
    assert set(prober.results()) == {EP1.outer}
    assert prober.results()[EP1.outer].state == "unknown"


def test_health_one_down_is_degraded_all_down_is_down() -> None:
    up, down = ProbeResult("up", 0.001, 0.0), ProbeResult("down", None, 1.0)
    both = [EP1, EP2]
    assert probe_health(both, {EP1.outer: up, EP2.outer: up}) == ("ok", [])
    assert probe_health(both, {EP1.outer: up, EP2.outer: down})[0] == "degraded"
    assert probe_health(both, {EP1.outer: down})[0] == "degraded"  # EP2 still unknown
    health, reasons = probe_health(both, {EP1.outer: down, EP2.outer: down})
    # No endpoint answers: no traffic reaches the devices. "down", the word `gatepeer status`
    # always used for it (the daemon used to say "failed", its worst word then).
    assert health == "down"
    assert "198.18.1.11" in reasons[0] and "198.18.1.12" in reasons[0]


def test_echo_request_has_a_valid_checksum_and_replies_parse() -> None:
    packet = echo_request(0x1234, 7)
    assert packet[0] == 8 and packet[1] == 0
    assert checksum(packet) == 0  # a correct ICMP checksum sums to zero
    reply = bytearray(packet)
    reply[0] = 0
    ip_header = bytes([0x45]) + b"\0" * 19
    assert parse_echo_reply(ip_header + bytes(reply), 0x1234) == 7
    assert parse_echo_reply(ip_header + bytes(reply), 0x4321) is None  # someone else's ping
    assert parse_echo_reply(ip_header + packet, 0x1234) is None  # a request, not a reply
    assert parse_echo_reply(ip_header[:10], 0x1234) is None
    options = bytes([0x46]) + b"\0" * 23  # a 24-byte IP header
    assert parse_echo_reply(options + bytes(reply), 0x1234) == 7
    assert struct.unpack("!H", packet[2:4])[0] != 0


def test_stop_wakes_a_waiting_prober_at_once() -> None:
    # No targets: the thread waits a whole interval on its wake pipe; stop must cut that short.
    # No socket is opened before the first send, so this runs unprivileged.
    prober = Prober(600.0, 1.0, lambda: [], IcmpTransport("gpnoexist0"))
    prober.start()
    time.sleep(0.05)
    started = time.monotonic()
    prober.stop()
    prober.join(timeout=5)
    assert not prober.is_alive()
    assert time.monotonic() - started < 1.0
    prober.stop()  # again, after the transport closed its pipe: harmless
