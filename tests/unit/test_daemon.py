"""Unit tests of the daemon's plumbing that need no namespace (its start against a slow or
rate-limited API, in a namespace: tests/lab/test_daemon_lab.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from gatepeer.daemon import KernelWatcher, Wake


def test_wake_can_be_set_by_a_handler_that_interrupts_its_own_thread() -> None:
    # A signal handler runs on the main thread, possibly while that thread holds the wake-up's
    # lock inside clear() or wait(). Simulate that: set() while the same thread holds the lock.
    wake = Wake()
    done = threading.Event()

    def handler_inside_clear() -> None:
        with wake._cond:  # the interrupted clear() holds this
            wake.set()  # a plain threading.Event deadlocks here
        done.set()

    worker = threading.Thread(target=handler_inside_clear, daemon=True)
    worker.start()
    assert done.wait(2), "set() deadlocked on the lock its own thread holds"
    assert wake.wait(0)
    wake.clear()
    assert not wake.wait(0.01)


def test_wake_wakes_a_waiting_thread() -> None:
    wake = Wake()
    woke = threading.Event()

    def waiter() -> None:
        if wake.wait(5):
            woke.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    wake.set()
    assert woke.wait(2)


class Msg(dict):  # type: ignore[type-arg]
    """The two accessors KernelWatcher.relevant uses, over plain values."""

    def __init__(self, attrs: dict[str, object], **fields: object) -> None:
        super().__init__(**fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> object:
        return self.attrs.get(name)


def test_watcher_wakes_only_for_what_the_agent_owns() -> None:
    w = KernelWatcher("vxlan0", lambda _: None)
    zero = "00:00:00:00:00:00"
    assert w.relevant(Msg({"IFLA_IFNAME": "vxlan0"}, event="RTM_DELLINK"))
    assert not w.relevant(Msg({"IFLA_IFNAME": "eth1"}, event="RTM_DELLINK"))
    assert w.relevant(Msg({"IFA_LABEL": "vxlan0"}, event="RTM_DELADDR"))
    assert w.relevant(
        Msg({"NDA_LLADDR": zero, "NDA_DST": "198.18.1.11"}, event="RTM_DELNEIGH", family=7)
    )
    # Learned MACs and ARP entries churn all the time: they must not wake the loop.
    assert not w.relevant(Msg({"NDA_LLADDR": "02:00:00:00:00:01"}, event="RTM_DELNEIGH", family=7))
    assert not w.relevant(Msg({"NDA_LLADDR": zero}, event="RTM_NEWNEIGH", family=7))
    assert not w.relevant(Msg({"NDA_LLADDR": zero}, event="RTM_DELNEIGH", family=2))


def test_watcher_listens_again_after_losing_events() -> None:
    # pyroute2 keeps a receive error (ENOBUFS after a burst) and raises it on every later
    # read: the watcher must open a fresh socket and ask for a reconcile, not go deaf.
    kicks: list[str] = []
    w = KernelWatcher("vxlan0", kicks.append)
    calls = 0
    second_listen = threading.Event()

    def listen() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(105, "No buffer space available")
        second_listen.set()
        w._stopping.wait(5)

    w._listen = listen  # type: ignore[method-assign]
    w.start()
    try:
        assert second_listen.wait(3), "the watcher did not listen again"
        assert kicks == ["kernel events lost"]
    finally:
        w.stop()
        w.join(3)
    assert not w.is_alive()


def test_a_loop_that_keeps_changing_things_backs_off(tmp_path: Path) -> None:
    from gatepeer.agent import ReconcileResult
    from gatepeer.config import parse
    from gatepeer.daemon import BUSY_RECONCILES_BEFORE_BACKOFF, EVENT_SETTLE_S, Daemon
    from gatepeer.plan import SetUp

    config = parse(
        {
            "soracom": {"auth_key_id": "keyId-test", "vpg_id": "vpg-test"},
            "agent": {
                "state_file": str(tmp_path / "state.json"),
                "gate_cache": "",
                "reconcile_interval": "1h",
            },
            "metrics": {"listen": ""},
        }
    )
    daemon = Daemon(config, lambda: config)
    steps = 0
    pauses: list[float] = []

    def step(now: float, next_refresh: float, interval: float) -> tuple[ReconcileResult, float]:
        # A kernel that never converges: every reconcile changes something, and the change
        # raises an event that wakes the loop again.
        nonlocal steps
        steps += 1
        if steps == 12:
            daemon.stopping = True
        daemon.kick("RTM_NEWLINK vxlan0")
        return ReconcileResult([SetUp("vxlan0")], "ok", [], [], 0.001), now + interval

    daemon.step = step  # type: ignore[method-assign]
    daemon.pause = pauses.append  # type: ignore[method-assign]
    assert daemon.run() == 0
    # Every pass here is event-driven; past the allowance the pause doubles each time.
    excess = range(1, 12 - BUSY_RECONCILES_BEFORE_BACKOFF + 1)
    assert pauses == [EVENT_SETTLE_S * 2**e for e in excess]
    assert pauses == sorted(pauses) and pauses[-1] > pauses[0]


def test_status_line_falls_back_to_the_reconcile_when_the_live_read_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A netlink dump cut short while reading the tunnel for STATUS= must not end the loop.
    from types import SimpleNamespace

    from gatepeer import daemon as daemon_module
    from gatepeer.agent import ReconcileResult

    def unreadable(*_: Any, **__: Any) -> Any:
        raise OSError(105, "No buffer space available")

    fake = SimpleNamespace(_live_verdict=unreadable)
    result = ReconcileResult(
        actions=[], health="degraded", reasons=["SORACOM API: 503"], notes=[], duration_s=0.1
    )
    line = daemon_module.Daemon._status_line(fake, result)  # type: ignore[arg-type]
    assert line == "degraded: SORACOM API: 503"
