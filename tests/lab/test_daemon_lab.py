"""The daemon's start in a namespace of its own with the emulator, against a slow or rate-limited
API: the first gate view must not block READY, WATCHDOG or SIGTERM.
"""

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
