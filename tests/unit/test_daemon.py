"""Unit tests of the daemon's plumbing that need no namespace; and, in a namespace of its own
with the emulator, the daemon's start against a slow or rate-limited API."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
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


# ---- the first gate view must not block READY, WATCHDOG or SIGTERM --------------------------


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET: collects every datagram in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def wait_for(self, prefix: str, timeout: float, log: Path) -> int:
        """Index of the first message starting with `prefix`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, message in enumerate(list(self.messages)):
                if message.startswith(prefix):
                    return i
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} in {self.messages}\n{log.read_text()[-2000:]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@contextlib.contextmanager
def daemon_waiting_on_the_api(
    tmp_path: Path, prepare: Callable[[Any], None] | None = None, **faults: Any
) -> Iterator[tuple[subprocess.Popen[bytes], NotifySocket, Path]]:
    """`gatepeer run` in a namespace of its own, on a fresh install (no gate view kept), the
    in-process emulator serving inside that namespace with `faults`, systemd's notify socket
    and a 0.6 s watchdog faked. `prepare(namespace)` runs before the daemon starts. The daemon
    is stopped by its pid at the end."""
    from conftest import gatepeer_command
    from helpers.kernel_ns import LOCAL, UNDERLAY, namespace

    from gatepeer.lab.emulator.model import EmulatorSettings
    from gatepeer.lab.emulator.service import Emulator

    settings = EmulatorSettings()
    emulator = Emulator(settings)
    notify = NotifySocket(tmp_path / "notify.sock")
    log = tmp_path / "run.log"
    with namespace(tmp_path) as ns:

        def listen() -> socket.socket:
            sock = socket.create_server(("127.0.0.1", 0))
            return sock

        base = emulator.serve_on(ns.call(listen))
        emulator.set_faults(**faults)
        key = tmp_path / "auth-key"
        key.write_text(settings.auth_key)
        key.chmod(0o600)
        config = tmp_path / "gatepeer.toml"
        config.write_text(
            f'[soracom]\nendpoint = "{base}"\nauth_key_id = "{settings.auth_key_id}"\n'
            f'auth_key_file = "{key}"\nvpg_id = "{settings.vpg_id}"\nrequest_timeout = "60s"\n'
            f'[tunnel]\nunderlay_interface = "{UNDERLAY}"\nlocal_address = "{LOCAL}"\n'
            'mtu = "auto"\n'
            f'[agent]\nstate_file = "{tmp_path / "state.json"}"\ngate_cache = ""\n'
            '[metrics]\nlisten = ""\n'
        )
        if prepare is not None:
            prepare(ns)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "600000"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns.name, *gatepeer_command(), "run", "-v",
                 "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        try:
            yield proc, notify, log
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)  # ours, by pid
            proc.wait(10)
            emulator.stop()
            notify.close()


@pytest.mark.netns
def test_a_rate_limited_first_registration_keeps_the_watchdog_fed(tmp_path: Path) -> None:
    # Three 429s in a row: the client waits 1 s after each (the header says so).
    with daemon_waiting_on_the_api(tmp_path, rate_limit_next=3, rate_limit_seconds=1) as (
        proc,
        notify,
        log,
    ):
        ready = notify.wait_for("READY=1", 30, log)
        before = notify.messages[:ready]
        assert any(m.startswith("STATUS=waiting for the SORACOM API") for m in before), before
        # Half the 0.6 s watchdog is 0.3 s; three 1 s waits are far longer than that.
        assert before.count("WATCHDOG=1") >= 3, before
        # Waited for, not indexed at once: the status line may arrive a moment after READY.
        assert notify.wait_for("STATUS=ok", 10, log) == ready + 1, notify.messages
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0


@pytest.mark.netns
def test_sigterm_while_the_first_api_call_hangs_stops_the_daemon(tmp_path: Path) -> None:
    with daemon_waiting_on_the_api(tmp_path, latency_ms=40_000) as (proc, notify, log):
        notify.wait_for("STATUS=waiting for the SORACOM API", 15, log)
        notify.wait_for("WATCHDOG=1", 5, log)
        os.kill(proc.pid, signal.SIGTERM)
        # Well before the API call in flight could have returned.
        assert proc.wait(15) == 0, log.read_text()
        assert "STOPPING=1" in notify.messages
        assert "READY=1" not in notify.messages


@pytest.mark.netns
def test_no_ready_while_the_first_reconcile_cannot_build_the_tunnel(tmp_path: Path) -> None:
    # Another vxlan link already holds VNI 10 on port 4789: creating vxlan0 fails in the kernel.
    def squat(ns: Any) -> None:
        ns.ip("link", "add", "squat0", "type", "vxlan", "id", "10", "dstport", "4789")

    with daemon_waiting_on_the_api(tmp_path, prepare=squat) as (proc, notify, log):
        notify.wait_for("STATUS=down: vxlan0 does not exist", 30, log)
        time.sleep(1.5)  # a few watchdog periods (0.6 s) with the data path still not up
        assert "READY=1" not in notify.messages, notify.messages
        assert notify.messages.count("WATCHDOG=1") >= 2, notify.messages
        assert proc.poll() is None, "a kernel failure is retried, not fatal"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0


@pytest.mark.netns
def test_a_setting_the_host_cannot_take_exits_2_before_ready(tmp_path: Path) -> None:
    # A bridge under the tunnel's name: a config error (tunnel.interface), never deleted.
    def bridge(ns: Any) -> None:
        ns.ip("link", "add", "vxlan0", "type", "bridge")

    with daemon_waiting_on_the_api(tmp_path, prepare=bridge) as (proc, notify, log):
        assert proc.wait(30) == 2, log.read_text()[-2000:]
        assert "READY=1" not in notify.messages, notify.messages
        assert "tunnel.interface" in log.read_text()


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
