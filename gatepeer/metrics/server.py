"""The /metrics listener: prometheus_client's WSGI server in a thread, on [metrics] listen.

The default address is the instance's own private address, which is known only once the
agent has read its host facts; `ensure_started` is therefore called after every reconcile and
starts the listener the first time it can. A failed bind (port taken) is logged, not fatal: the
data path matters more than its metrics, and the next reconcile tries again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

from gatepeer.config import DEFAULT_METRICS_PORT

if TYPE_CHECKING:
    from gatepeer.agent import Agent
    from gatepeer.flow_logger import FlowLogStats
    from gatepeer.sims import SimMap

log = logging.getLogger(__name__)


def listen_address(
    listen: str | None, local: ipaddress.IPv4Address | None
) -> tuple[str, int] | None:
    """(host, port) to bind, or None when metrics are off ("") or the address is not known yet."""
    if listen == "":
        return None
    if listen is None:
        return (str(local), DEFAULT_METRICS_PORT) if local is not None else None
    host, _, port = listen.rpartition(":")
    return host, int(port)


class MetricsServer:
    def __init__(
        self,
        listen: str | None,
        registry: CollectorRegistry,
        local_address: Callable[[], ipaddress.IPv4Address | None],
    ) -> None:
        self.listen = listen
        self.registry = registry
        self.local_address = local_address
        self.bound: tuple[str, int] | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None

    def ensure_started(self) -> None:
        if self._server is not None:
            return
        address = listen_address(self.listen, self.local_address())
        if address is None:
            return
        try:
            self._server, self._thread = start_http_server(
                address[1], address[0], registry=self.registry
            )
        except OSError as exc:
            message = f"metrics: cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}"
            if message != self._last_error:  # once per cause, not once per reconcile
                log.error("%s", message)
                self._last_error = message
            return
        host, port = self._server.server_address[:2]
        self.bound = (str(host), int(port))
        log.info("metrics: serving http://%s:%d/metrics", *self.bound)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        with contextlib.suppress(OSError):
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


def for_agent(
    listen: str | None,
    agent: Callable[[], Agent],
    flow_log: Callable[[], FlowLogStats | None] | None = None,
    sim_map: Callable[[], SimMap | None] = lambda: None,
) -> MetricsServer:
    """The daemon's server: every collector on a fresh registry, reading the live agent (looked
    up per scrape: a reload replaces it), the kernel and the packet path."""
    from gatepeer import __version__, device_reading
    from gatepeer.metrics.collectors import build_registry
    from gatepeer.metrics.sources import LiveAgent, LiveDevices, LiveKernel, LivePacketPath

    registry = build_registry(
        LiveAgent(agent),
        LiveKernel(),
        LivePacketPath(),
        __version__,
        # Read per scrape: a reload may change either.
        reconcile_interval=lambda: agent().config.agent.reconcile_interval,
        ha=lambda: agent().config.ha,
        devices=LiveDevices(
            lambda: agent().config.packet_path.device_counters,
            sim_map,
            reading_file=lambda: device_reading.path_for(agent().config),
        ),
        device_top_n=lambda: agent().config.devices.metrics_top_n,
        underlay=lambda: _underlay(agent()),
        flow_log=flow_log,
    )

    def local_address() -> ipaddress.IPv4Address | None:
        facts = agent().facts
        return facts.local_address if facts is not None else None

    return MetricsServer(listen, registry, local_address)


def _underlay(agent: Agent) -> str | None:
    """The interface whose ENA allowances are read: the tunnel's underlay, once known."""
    return agent.facts.underlay if agent.facts is not None else None
