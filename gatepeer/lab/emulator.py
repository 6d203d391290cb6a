"""SORACOM API emulator: the API side of the lab, and the fake the client's tests talk to.

It speaks the shapes of the official spec (``shared/soracom-api/soracom-api.en.yaml``) for the
operations a customer gate peer needs, keeps its state in memory, and injects faults on demand.
Standard library only: it runs inside lab network namespaces where nothing else is installed.

Public API (kept stable: the lab imports it)
--------------------------------------------

``EmulatorSettings(...)``
    Frozen dataclass, every field has a default (see the class). ``endpoints`` are the VPG's
    own tunnel endpoints as ``Peer(outer_ip, inner_ip)`` (plain 2-tuples are accepted).

``Emulator(settings=None, on_peers_changed=None, *, on_vpg_changed=None, clock=time.monotonic)``
    ``on_peers_changed(peers: list[Peer])`` is called after every registerGatePeer or
    unregisterGatePeer that changed the customer gate peers, outside the state lock, in the
    order of the changes, with the full list of customer peers. ``on_vpg_changed(settings)`` is
    called likewise when the VNI, device subnet, endpoints or gate state change (control
    endpoint, ``update_settings``, openGate, closeGate, setVirtualPrivateGatewayVxLanId).
    Both run before the API call (or control request) that caused them is answered, so a
    caller that got its answer may rely on the lab having followed. A callback that raises is
    logged; the call still succeeds (the real API knows nothing of the lab).
    ``clock`` (monotonic seconds) drives token expiry and the rate-limit window; tests pass a
    settable one.

    ``serve_on(sock) -> base_url``  serve on an already bound socket (listening or not) in a
                                    daemon thread; the emulator owns the socket from then on.
                                    Call it several times to serve several sockets at once.
    ``start(host="127.0.0.1", port=0) -> base_url``  bind and serve (tests, manual use).
    ``stop()``                       stop every server and close its socket.
    ``settings``, ``peers()``, ``endpoints()``, ``update_settings(**changes)``,
    ``set_faults(**faults)``, ``reset_faults()``, ``faults()``, ``expire_tokens()``,
    ``counts()``, ``reset_counts()``, ``state()``, ``handle(...)`` (one request without HTTP).

``base_url`` is ``http://HOST:PORT`` without ``/v1``; the API lives under ``/v1``.

Control endpoints (no authentication, never subject to faults)
---------------------------------------------------------------

``GET  /_emulator/state``         counts, recent requests (with the emulator clock's arrival
                                  time), peers, settings (never the auth key),
                                  faults, redirection
``POST /_emulator/faults``        merge, e.g. ``{"latency_ms": 200, "fail_next": 3,
                                  "fail_status": 503, "rate_limit_next": 2,
                                  "rate_limit_seconds": 1, "drop_next": 1}``
``POST /_emulator/reset_faults``  all faults off
``POST /_emulator/settings``      any settings field but ``auth_key``, e.g. ``{"vxlan_id": 20,
                                  "device_subnet": "198.19.0.0/24", "endpoints":
                                  [{"outer_ip": "198.18.1.21", "inner_ip": "198.19.0.1"}],
                                  "gate_opened": false, "token_lifetime_s": 1,
                                  "wrapped_errors": true}``
``POST /_emulator/expire_tokens`` every issued token expires now
``POST /_emulator/reset_counts``  request counts and recent requests cleared

Each answers 200 with the state document; a bad value answers 400 ``{"code", "message"}``.

Faults apply to every ``/v1`` call, in this order: ``latency_ms`` delays each answer (until
reset); ``drop_next`` closes the connection without answering; ``rate_limit_next`` answers 429
with the ``X-Soracom-Ratelimit-*`` headers; ``fail_next`` answers ``fail_status``.

Where the spec is silent, the emulator chooses (each choice is tested):

- a missing, unknown or mismatched key/token is 401; an expired token is 401, except on
  generateAuthToken where the spec documents 400 (the client must then log in again);
- ``token_lifetime_s`` is the lifetime when the request names no ``tokenTimeoutSeconds`` and a
  cap when it does, so shortening it in a test also shortens tokens a client asks to be long;
- registering an outer (or inner) address already taken is 400; nothing is ever duplicated;
- openGate, closeGate and set/unset_redirection answer 200 with the VPG (the spec gives no body);
- error codes look like SORACOM's (``SEM0016``) but are the emulator's own (``EMU0001``...).

Command line: ``python -m gatepeer.lab.emulator --listen 127.0.0.1:8080 [--vni N]
[--device-subnet CIDR] [--endpoint OUTER=INNER ...] [--auth-key-id ID] [--auth-key-file PATH]
[--vpg-id ID] [--operator-id ID] [--token-lifetime S] [--wrapped-errors] [--gate-closed]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, cast
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
CONTROL_PREFIX = "/_emulator/"
VPG_TYPES = (12, 13, 14, 15, 242)  # the spec's enum for VirtualPrivateGateway.type
VPG_STATUSES = ("running",)  # the spec's enum for VirtualPrivateGateway.status
DEFAULT_TOKEN_TIMEOUT_S = 86400
MAX_TOKEN_TIMEOUT_S = 172800
MAX_VNI = 16777215
MAX_BODY_BYTES = 1 << 20
RATELIMIT_WINDOW_S = 60.0

# Error codes: real ones look like "SEM0016"; these keep that shape but are the emulator's own.
E_BAD_REQUEST = "EMU0001"
E_AUTH_FAILED = "EMU0002"
E_TOKEN_INVALID = "EMU0003"
E_TOKEN_EXPIRED = "EMU0004"
E_NOT_FOUND = "EMU0005"
E_NO_SUCH_VPG = "EMU0006"
E_NO_SUCH_PEER = "EMU0007"
E_PEER_EXISTS = "EMU0008"
E_NO_FREE_ADDRESS = "EMU0009"
E_TOO_LARGE = "EMU0010"
E_RATE_LIMITED = "EMU0011"
E_INJECTED = "EMU0012"
E_INTERNAL = "EMU0013"


class Peer(NamedTuple):
    """A gate peer or VPG tunnel endpoint: VXLAN outer address and device-subnet inner address."""

    outer_ip: str
    inner_ip: str


def _default_auth_key() -> str:
    # Random per instance: a lab key nobody wrote down cannot leak from a repository.
    return "secret-" + secrets.token_urlsafe(48)


DEFAULT_ENDPOINTS = (Peer("198.18.1.11", "198.19.0.1"), Peer("198.18.1.12", "198.19.0.2"))


def _require_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    # bool is an int subclass; JSON true must not pass for a number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _require_number(name: str, value: object, lo: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if value < lo:
        raise ValueError(f"{name} must be at least {lo}, got {value}")
    return float(value)


def _require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    return value


def _ipv4(name: str, value: object) -> ipaddress.IPv4Address:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{name} is not an IPv4 address: {value!r}") from None


def _to_peer(value: object) -> Peer:
    """Accept Peer, (outer, inner), {"outer_ip", "inner_ip"} or "OUTER=INNER"."""
    if isinstance(value, Mapping):
        value = (value.get("outer_ip"), value.get("inner_ip"))
    elif isinstance(value, str):
        outer, sep, inner = value.partition("=")
        if not sep:
            raise ValueError(f"endpoint {value!r} is not OUTER=INNER")
        value = (outer.strip(), inner.strip())
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"endpoint {value!r} is not an (outer_ip, inner_ip) pair")
    outer_ip = str(_ipv4("endpoint outer_ip", value[0]))
    inner_ip = str(_ipv4("endpoint inner_ip", value[1]))
    return Peer(outer_ip, inner_ip)


@dataclass(frozen=True)
class EmulatorSettings:
    """What the emulated operator and VPG look like. Validated and normalised on creation."""

    operator_id: str = "OP0012345678"
    auth_key_id: str = "keyId-lab00000000000000000000000000000"
    auth_key: str = field(default_factory=_default_auth_key, repr=False)
    vpg_id: str = "2d4f9e1a-7b3c-4e5d-9a8b-0c1d2e3f4a5b"
    vpg_name: str = "gatepeer-lab"
    vpg_type: int = 14  # Type-E: a type that offers Gate
    vpg_status: str = "running"
    vxlan_id: int = 10  # the VNI, gateVxlanId in the API
    device_subnet: str = "198.19.0.0/16"
    endpoints: tuple[Peer, ...] = DEFAULT_ENDPOINTS
    gate_opened: bool = True
    privacy_separator_enabled: bool = False
    use_internet_gateway: bool = True
    token_lifetime_s: float = DEFAULT_TOKEN_TIMEOUT_S
    wrapped_errors: bool = False  # send {"errorMessage": {...}, "httpStatus": N} instead
    ratelimit_limit: int = 100  # X-Soracom-Ratelimit-Limit; informational, 429 only by fault

    def __post_init__(self) -> None:
        for name in ("operator_id", "auth_key_id", "auth_key", "vpg_id", "vpg_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        if self.vpg_type not in VPG_TYPES or isinstance(self.vpg_type, bool):
            raise ValueError(f"vpg_type must be one of {VPG_TYPES}")
        if self.vpg_status not in VPG_STATUSES:
            raise ValueError(f"vpg_status must be one of {VPG_STATUSES}")
        _require_int("vxlan_id", self.vxlan_id, 1, MAX_VNI)
        for name in ("gate_opened", "privacy_separator_enabled", "use_internet_gateway"):
            _require_bool(name, getattr(self, name))
        _require_bool("wrapped_errors", self.wrapped_errors)
        if _require_number("token_lifetime_s", self.token_lifetime_s, 0) <= 0:
            raise ValueError("token_lifetime_s must be positive")
        _require_int("ratelimit_limit", self.ratelimit_limit, 1)

        if not isinstance(self.device_subnet, str):
            raise ValueError("device_subnet must be a CIDR string")
        try:
            net = ipaddress.IPv4Network(self.device_subnet, strict=True)
        except ValueError as exc:
            raise ValueError(f"device_subnet {self.device_subnet!r}: {exc}") from None
        if net.prefixlen > 30:
            raise ValueError("device_subnet must be /30 or larger: peers need room")
        object.__setattr__(self, "device_subnet", str(net))

        if isinstance(self.endpoints, str | bytes) or not isinstance(self.endpoints, Iterable):
            raise ValueError("endpoints must be a list of (outer_ip, inner_ip)")
        endpoints = tuple(_to_peer(e) for e in self.endpoints)
        _check_distinct(endpoints)
        for ep in endpoints:
            _check_inner(net, ep.inner_ip)
        object.__setattr__(self, "endpoints", endpoints)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.device_subnet)

    @property
    def netmask(self) -> str:
        """Dotted netmask of the device subnet, as listGatePeers shows it."""
        return str(self.network.netmask)

    def public_dict(self) -> dict[str, Any]:
        """Everything but the auth key, JSON-ready."""
        out = dataclasses.asdict(self)
        del out["auth_key"]
        out["endpoints"] = [e._asdict() for e in self.endpoints]
        return out


def _check_distinct(peers: Iterable[Peer]) -> None:
    outers: set[str] = set()
    inners: set[str] = set()
    for p in peers:
        if p.outer_ip in outers or p.inner_ip in inners:
            raise ValueError(f"endpoint {p.outer_ip}={p.inner_ip} repeats an address")
        outers.add(p.outer_ip)
        inners.add(p.inner_ip)


def _check_inner(net: ipaddress.IPv4Network, inner_ip: str) -> None:
    addr = ipaddress.IPv4Address(inner_ip)
    if addr not in net or addr in (net.network_address, net.broadcast_address):
        raise ValueError(f"inner address {inner_ip} is not a host address of {net}")


# Settings fields the unauthenticated control endpoint may change: all but the secret.
_HTTP_SETTABLE = frozenset(f.name for f in dataclasses.fields(EmulatorSettings)) - {"auth_key"}


@dataclass
class Faults:
    """Injected faults; counters count down as /v1 calls consume them."""

    latency_ms: float = 0
    fail_next: int = 0
    fail_status: int = 503
    rate_limit_next: int = 0
    rate_limit_seconds: int = 1
    drop_next: int = 0

    def update(self, changes: Mapping[str, object]) -> None:
        """Validate every change first, then apply them all (no half-applied update)."""
        valid: dict[str, object] = {}
        for name, value in changes.items():
            if name == "latency_ms":
                valid[name] = _require_number(name, value, 0)
            elif name == "fail_status":
                valid[name] = _require_int(name, value, 400, 599)
            elif name in ("fail_next", "rate_limit_next", "rate_limit_seconds", "drop_next"):
                valid[name] = _require_int(name, value, 0)
            else:
                raise ValueError(f"unknown fault {name!r}")
        for name, value in valid.items():
            setattr(self, name, value)


@dataclass
class Response:
    """One answer; ``drop`` means close the connection without answering."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False


@dataclass
class _Token:
    api_key: str
    operator_id: str
    expires_at: float


class _Route(NamedTuple):
    method: str
    pattern: re.Pattern[str]
    operation: str


_VPG = r"/v1/virtual_private_gateways/(?P<vpg_id>[^/]+)"
_ROUTES = tuple(
    _Route(method, re.compile(pattern + r"\Z"), operation)
    for method, pattern, operation in (
        ("POST", r"/v1/auth", "auth"),
        ("POST", r"/v1/operators/(?P<operator_id>[^/]+)/token", "generateAuthToken"),
        ("GET", _VPG, "getVirtualPrivateGateway"),
        ("GET", _VPG + r"/gate/peers", "listGatePeers"),
        ("POST", _VPG + r"/gate/peers", "registerGatePeer"),
        ("DELETE", _VPG + r"/gate/peers/(?P<outer_ip_address>[^/]+)", "unregisterGatePeer"),
        ("POST", _VPG + r"/gate/open", "openGate"),
        ("POST", _VPG + r"/gate/close", "closeGate"),
        ("POST", _VPG + r"/gate/set_vxlan_id", "setVirtualPrivateGatewayVxLanId"),
        ("POST", _VPG + r"/junction/set_redirection", "setRedirectionConfiguration"),
        ("POST", _VPG + r"/junction/unset_redirection", "unsetRedirectionConfiguration"),
    )
)

# Statuses each operation can answer besides injected faults (429, fail_status) and 401 for
# a missing or bad key/token; the contract tests check they cover all of them.
OPERATION_STATUSES: dict[str, frozenset[int]] = {
    "auth": frozenset({200, 400, 401}),
    "generateAuthToken": frozenset({200, 400, 401}),
    "getVirtualPrivateGateway": frozenset({200, 404}),
    "listGatePeers": frozenset({200, 404}),
    "registerGatePeer": frozenset({200, 400, 404}),
    "unregisterGatePeer": frozenset({204, 400, 404}),
    "openGate": frozenset({200, 400, 404}),
    "closeGate": frozenset({200, 404}),
    "setVirtualPrivateGatewayVxLanId": frozenset({204, 400, 404}),
    "setRedirectionConfiguration": frozenset({200, 400, 404}),
    "unsetRedirectionConfiguration": frozenset({200, 404}),
}

PeersCallback = Callable[[list[Peer]], None]
VpgCallback = Callable[[EmulatorSettings], None]
_Handler = Callable[[dict[str, str], Mapping[str, str], bytes], Response]


class _BadRequest(Exception):
    """A request the API refuses with 400; the message is safe to send back."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class Emulator:
    """In-memory SORACOM API for one operator and one VPG. Thread-safe."""

    def __init__(
        self,
        settings: EmulatorSettings | None = None,
        on_peers_changed: PeersCallback | None = None,
        *,
        on_vpg_changed: VpgCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings if settings is not None else EmulatorSettings()
        self._on_peers_changed = on_peers_changed
        self._on_vpg_changed = on_vpg_changed
        self._clock = clock
        self._lock = threading.Lock()
        # Held across a change and its callbacks, so callbacks run in the order of the changes;
        # re-entrant so a callback may call back into the emulator.
        self._notify_lock = threading.RLock()
        self._peers: dict[str, str] = {}  # outer -> inner, in registration order
        self._redirection: dict[str, Any] | None = None
        self._tokens: dict[str, _Token] = {}
        self._faults = Faults()
        self._counts: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self._created_ms = _now_ms()
        self._modified_ms = self._created_ms
        self._rl_window_start = clock()
        self._rl_used = 0
        self._servers: list[tuple[_Server, threading.Thread]] = []
        self._handlers: dict[str, _Handler] = {
            "auth": self._op_auth,
            "generateAuthToken": self._op_generate_token,
            "getVirtualPrivateGateway": self._op_get_vpg,
            "listGatePeers": self._op_list_peers,
            "registerGatePeer": self._op_register_peer,
            "unregisterGatePeer": self._op_unregister_peer,
            "openGate": self._op_open_gate,
            "closeGate": self._op_close_gate,
            "setVirtualPrivateGatewayVxLanId": self._op_set_vxlan_id,
            "setRedirectionConfiguration": self._op_set_redirection,
            "unsetRedirectionConfiguration": self._op_unset_redirection,
        }

    # ----- state, in process -------------------------------------------------------------

    @property
    def settings(self) -> EmulatorSettings:
        with self._lock:
            return self._settings

    def peers(self) -> list[Peer]:
        """Customer gate peers, in registration order."""
        with self._lock:
            return self._peer_list()

    def endpoints(self) -> list[Peer]:
        """The VPG's own tunnel endpoints."""
        with self._lock:
            return list(self._settings.endpoints)

    def update_settings(self, **changes: Any) -> EmulatorSettings:
        """Replace settings fields; raises ValueError (nothing changed) on a bad value.

        Registered customer peers keep their inner addresses, even outside a new subnet:
        the real VPG fixes its subnet when it is created, so there is no behaviour to copy.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(EmulatorSettings)}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")

        def change() -> EmulatorSettings:
            new = dataclasses.replace(self._settings, **changes)
            # A VPG endpoint must not take an address a customer peer holds.
            for ep in new.endpoints:
                if ep.outer_ip in self._peers or ep.inner_ip in self._peers.values():
                    raise ValueError(f"endpoint {ep.outer_ip}={ep.inner_ip} is a peer's address")
            self._settings = new
            self._modified_ms = _now_ms()
            return new

        return self._mutate(change)

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Merge faults (see Faults); raises ValueError on an unknown name or bad value."""
        with self._lock:
            self._faults.update(faults)
            return dataclasses.asdict(self._faults)

    def reset_faults(self) -> None:
        with self._lock:
            self._faults = Faults()

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return dataclasses.asdict(self._faults)

    def expire_tokens(self) -> None:
        """Every token issued so far expires now (to exercise the client's re-auth)."""
        with self._lock:
            now = self._clock()
            for tok in self._tokens.values():
                tok.expires_at = min(tok.expires_at, now)

    def counts(self) -> dict[str, int]:
        """Requests per operationId (unknown paths under "_unknown"), faulted ones included."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._recent.clear()

    def state(self) -> dict[str, Any]:
        """The document GET /_emulator/state answers; holds no secret."""
        with self._lock:
            return {
                "settings": self._settings.public_dict(),
                "vpg": self._vpg_body(),
                "endpoints": [e._asdict() for e in self._settings.endpoints],
                "peers": [p._asdict() for p in self._peer_list()],
                "redirection": self._redirection,
                "faults": dataclasses.asdict(self._faults),
                "counts": dict(self._counts),
                "recent": list(self._recent),
                "tokens": len(self._tokens),
            }

    # ----- serving -----------------------------------------------------------------------

    def serve_on(self, sock: socket.socket) -> str:
        """Serve HTTP on a bound socket in a daemon thread; returns its base URL.

        The socket may come from another network namespace: nothing here looks at the
        current one. The emulator owns the socket afterwards; stop() closes it.
        """
        sock.settimeout(None)  # the accept loop blocks; stop() wakes it
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(64)
        server = _Server(sock, self)
        host, port = sock.getsockname()[:2]
        thread = threading.Thread(target=server.serve, name=f"soracom-emulator-{port}", daemon=True)
        with self._lock:
            self._servers.append((server, thread))
        thread.start()
        shown = f"[{host}]" if ":" in host else host
        log.info("SORACOM API emulator serving on http://%s:%d", shown, port)
        return f"http://{shown}:{port}"

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind host:port (port 0: any free one) and serve; returns the base URL."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return self.serve_on(socket.create_server((host, port), family=family))

    def stop(self) -> None:
        """Stop every server started by serve_on/start and close their sockets."""
        with self._lock:
            servers, self._servers = self._servers, []
        for server, thread in servers:
            server.stop()
            thread.join(timeout=5)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- one request -------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes = b""
    ) -> Response:
        """Answer one request (target: path and query). The HTTP layer is a thin shell."""
        path = urlsplit(target).path
        if path.startswith(CONTROL_PREFIX):
            return self._handle_control(method, path, body)
        is_api = path == API_PREFIX or path.startswith(API_PREFIX + "/")
        operation, params = self._route(method, path)
        lowered = {k.lower(): v for k, v in headers.items()}

        with self._lock:
            self._counts[operation or "_unknown"] += 1
            arrived = self._clock()  # in "recent": tests check the gaps a 429 asked for
            settings = self._settings
            fault, latency_ms, rl_seconds, fail_status = (
                self._take_fault() if is_api else (None, 0.0, 0, 0)
            )
        if latency_ms > 0:
            time.sleep(latency_ms / 1000)  # outside the lock: other calls are not delayed

        if fault == "drop":
            resp = Response(0, drop=True)
        elif fault == "rate_limit":
            resp = self._error(settings, 429, E_RATE_LIMITED, "Rate limit exceeded")
        elif fault == "fail":
            resp = self._error(settings, fail_status, E_INJECTED, "Injected failure")
        elif operation is None:
            resp = self._error(settings, 404, E_NOT_FOUND, f"No such API: {method} {path}")
        else:
            try:
                resp = self._call(operation, params, lowered, body)
            except _BadRequest as exc:
                resp = self._error(self.settings, 400, E_BAD_REQUEST, str(exc))
            except Exception:
                # An emulator bug: answer like a server would and keep the traceback in the log.
                log.exception("%s %s failed", method, path)
                resp = self._error(self.settings, 500, E_INTERNAL, "Internal emulator error")

        if is_api and not resp.drop:
            resp.headers.update(self._ratelimit_headers(limited=fault == "rate_limit"))
            if fault == "rate_limit":
                resp.headers["X-Soracom-Ratelimit-Seconds-Before-Refresh"] = str(rl_seconds)
        with self._lock:
            self._recent.append(
                {
                    "operation": operation,
                    "method": method,
                    "path": path,
                    "status": None if resp.drop else resp.status,
                    "fault": fault,
                    "arrived": arrived,
                    "retry_after": float(rl_seconds) if fault == "rate_limit" else None,
                }
            )
        return resp

    def _route(self, method: str, path: str) -> tuple[str | None, dict[str, str]]:
        for route in _ROUTES:
            m = route.pattern.match(path)
            if m and route.method == method:
                return route.operation, {k: unquote(v) for k, v in m.groupdict().items()}
        return None, {}

    def _take_fault(self) -> tuple[str | None, float, int, int]:
        """Consume one fault counter; caller holds the lock."""
        f = self._faults
        kind: str | None = None
        if f.drop_next > 0:
            f.drop_next -= 1
            kind = "drop"
        elif f.rate_limit_next > 0:
            f.rate_limit_next -= 1
            kind = "rate_limit"
        elif f.fail_next > 0:
            f.fail_next -= 1
            kind = "fail"
        return kind, f.latency_ms, f.rate_limit_seconds, f.fail_status

    def _ratelimit_headers(self, *, limited: bool) -> dict[str, str]:
        with self._lock:
            now = self._clock()
            if now - self._rl_window_start >= RATELIMIT_WINDOW_S:
                self._rl_window_start, self._rl_used = now, 0
            self._rl_used += 1
            limit = self._settings.ratelimit_limit
            remaining = 0 if limited else max(limit - self._rl_used, 0)
        return {
            "X-Soracom-Ratelimit-Limit": str(limit),
            "X-Soracom-Ratelimit-Remaining": str(remaining),
        }

    def _call(
        self, operation: str, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        settings = self.settings
        if operation != "auth":
            denied = self._check_token(settings, operation, params, headers)
            if denied is not None:
                return denied
        if "vpg_id" in params and params["vpg_id"] != settings.vpg_id:
            return self._error(settings, 404, E_NO_SUCH_VPG, "No such VPG found")
        return self._handlers[operation](params, headers, body)

    def _check_token(
        self,
        settings: EmulatorSettings,
        operation: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
    ) -> Response | None:
        api_key = headers.get("x-soracom-api-key", "")
        token = headers.get("x-soracom-token", "")
        with self._lock:
            tok = self._tokens.get(token)
            expired = tok is not None and self._clock() >= tok.expires_at
        if tok is None or not secrets.compare_digest(tok.api_key, api_key):
            return self._error(settings, 401, E_TOKEN_INVALID, "Invalid API key or token")
        if expired:
            # The spec documents 400 for generateAuthToken with an expired token; every other
            # call answers 401.
            status = 400 if operation == "generateAuthToken" else 401
            return self._error(settings, status, E_TOKEN_EXPIRED, "The API token has expired")
        if "operator_id" in params and params["operator_id"] != tok.operator_id:
            return self._error(settings, 400, E_BAD_REQUEST, "Operator ID does not match token")
        return None

    def _error(self, settings: EmulatorSettings, status: int, code: str, message: str) -> Response:
        err = {"code": code, "message": message}
        body: dict[str, Any] = (
            {"errorMessage": err, "httpStatus": status} if settings.wrapped_errors else err
        )
        return Response(status, body)

    def _mutate(self, change: Callable[[], Any]) -> Any:
        """Run change() under the state lock, then fire callbacks for what it changed."""
        with self._notify_lock:
            with self._lock:
                peers_before, vpg_before = self._peer_list(), self._vpg_key()
                result = change()
                peers_after, vpg_after = self._peer_list(), self._vpg_key()
                settings = self._settings
            if peers_after != peers_before and self._on_peers_changed is not None:
                try:
                    self._on_peers_changed(peers_after)
                except Exception:
                    log.exception("on_peers_changed failed")
            if vpg_after != vpg_before and self._on_vpg_changed is not None:
                try:
                    self._on_vpg_changed(settings)
                except Exception:
                    log.exception("on_vpg_changed failed")
        return result

    def _peer_list(self) -> list[Peer]:
        return [Peer(o, i) for o, i in self._peers.items()]

    def _vpg_key(self) -> tuple[object, ...]:
        s = self._settings
        return (s.vxlan_id, s.device_subnet, s.endpoints, s.gate_opened)

    def _vpg_body(self) -> dict[str, Any]:
        """The VirtualPrivateGateway document; caller holds the lock."""
        s = self._settings
        vpg: dict[str, Any] = {
            "vpgId": s.vpg_id,
            "operatorId": s.operator_id,
            "type": s.vpg_type,
            "status": s.vpg_status,
            "tags": {"name": s.vpg_name},
            "createdTime": self._created_ms,
            "lastModifiedTime": self._modified_ms,
            "deviceSubnetCidrRange": s.device_subnet,
            # The spec describes both as the device subnet; the real API sends both.
            "ueSubnetCidrRange": s.device_subnet,
            "gateOpened": s.gate_opened,
            "gateVxlanId": s.vxlan_id,
            "gatePrivacySeparatorEnabled": s.privacy_separator_enabled,
            "useInternetGateway": s.use_internet_gateway,
            "junctionEnabled": bool(self._redirection and self._redirection.get("enabled")),
            "allowedOperators": [],
            "customerRoutes": {},
            "vpcPeeringConnections": {},
            "virtualInterfaces": {},
            "vpnConnections": {},
            "fixedIpAddressesEnabled": False,
            "fixedPublicIpAddresses": [],
        }
        if self._redirection is not None:
            vpg["redirection"] = dict(self._redirection)
        return vpg

    # ----- operations --------------------------------------------------------------------

    def _op_auth(self, params: dict[str, str], headers: Mapping[str, str], body: bytes) -> Response:
        req = _json_object(body, required=True)
        _check_fields(
            req,
            {"authKeyId": str, "authKey": str, "tokenTimeoutSeconds": int},
            required=(),
        )
        settings = self.settings
        if "authKeyId" not in req or "authKey" not in req:
            # Email/password and SAM user logins exist in the real API; the lab has only keys.
            return self._error(
                settings, 401, E_AUTH_FAILED, "Authentication failed: use authKeyId and authKey"
            )
        lifetime = self._token_lifetime(settings, req)
        key_ok = secrets.compare_digest(str(req["authKeyId"]), settings.auth_key_id)
        secret_ok = secrets.compare_digest(str(req["authKey"]), settings.auth_key)
        if not (key_ok and secret_ok):
            return self._error(settings, 401, E_AUTH_FAILED, "Authentication failed")
        api_key = f"api-{uuid.uuid4()}"
        token = self._issue_token(api_key, settings.operator_id, lifetime)
        return Response(
            200, {"apiKey": api_key, "operatorId": settings.operator_id, "token": token}
        )

    def _op_generate_token(
        self, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        req = _json_object(body, required=True)
        _check_fields(req, {"tokenTimeoutSeconds": int}, required=())
        settings = self.settings
        lifetime = self._token_lifetime(settings, req)
        token = self._issue_token(headers["x-soracom-api-key"], params["operator_id"], lifetime)
        return Response(200, {"token": token})

    @staticmethod
    def _token_lifetime(settings: EmulatorSettings, req: Mapping[str, Any]) -> float:
        # token_lifetime_s is the lifetime when the request names none, and a cap when it
        # does, so a test that shortens it also shortens tokens a client asks to be long.
        asked = req.get("tokenTimeoutSeconds")
        if asked is None:
            return settings.token_lifetime_s
        if asked < 1 or asked > MAX_TOKEN_TIMEOUT_S:
            raise _BadRequest(f"tokenTimeoutSeconds must be between 1 and {MAX_TOKEN_TIMEOUT_S}")
        return min(float(asked), settings.token_lifetime_s)

    def _issue_token(self, api_key: str, operator_id: str, lifetime: float) -> str:
        token = secrets.token_urlsafe(96)
        with self._lock:
            now = self._clock()
            # Forget long-expired tokens so a long lab run does not grow without bound; a
            # recently expired one stays to answer "expired" rather than "invalid".
            for t in [t for t, v in self._tokens.items() if v.expires_at < now - 3600]:
                del self._tokens[t]
            self._tokens[token] = _Token(api_key, operator_id, now + lifetime)
        return token

    def _op_get_vpg(
        self, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        with self._lock:
            return Response(200, self._vpg_body())

    def _op_list_peers(
        self, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        with self._lock:
            s = self._settings
            mask = s.netmask
            rows = [_peer_json(e, mask, customer=False) for e in s.endpoints]
            rows += [_peer_json(p, mask, customer=True) for p in self._peer_list()]
        return Response(200, rows)

    def _op_register_peer(
        self, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        req = _json_object(body, required=True)
        _check_fields(req, {"outerIpAddress": str, "innerIpAddress": str}, ("outerIpAddress",))
        try:
            outer = str(_ipv4("outerIpAddress", req["outerIpAddress"]))
            inner_req = req.get("innerIpAddress")
            inner = None if inner_req is None else str(_ipv4("innerIpAddress", inner_req))
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None

        def change() -> Response:
            s = self._settings
            used_outer = set(self._peers) | {e.outer_ip for e in s.endpoints}
            used_inner = set(self._peers.values()) | {e.inner_ip for e in s.endpoints}
            if outer in used_outer:
                return self._error(s, 400, E_PEER_EXISTS, f"Gate peer {outer} already exists")
            if inner is None:
                picked = _free_lower_half(s.network, used_inner)
                if picked is None:
                    return self._error(
                        s, 400, E_NO_FREE_ADDRESS, "No free address in the device subnet"
                    )
                chosen = picked
            else:
                try:
                    _check_inner(s.network, inner)
                except ValueError as exc:
                    return self._error(s, 400, E_BAD_REQUEST, str(exc))
                if inner in used_inner:
                    return self._error(s, 400, E_PEER_EXISTS, f"Inner address {inner} is in use")
                chosen = inner
            self._peers[outer] = chosen
            # SORACOM answers the new peer with a null netmask; listGatePeers has it dotted.
            return Response(
                200,
                {
                    "outerIpAddress": outer,
                    "innerIpAddress": chosen,
                    "netmask": None,
                    "ownedByCustomer": True,
                },
            )

        return cast(Response, self._mutate(change))

    def _op_unregister_peer(
        self, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        outer = params["outer_ip_address"]

        def change() -> Response:
            s = self._settings
            if outer in {e.outer_ip for e in s.endpoints}:
                return self._error(s, 400, E_BAD_REQUEST, "A VPG endpoint cannot be unregistered")
            if self._peers.pop(outer, None) is None:
                return self._error(s, 404, E_NO_SUCH_PEER, f"No such gate peer: {outer}")
            return Response(204)

        return cast(Response, self._mutate(change))

    def _op_open_gate(
        self, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        # The body is optional (OpenGateRequest); a VNI in it reconfigures the gate.
        req = _json_object(body, required=False)
        _check_fields(req, {"privacySeparatorEnabled": bool, "vxlanId": int}, required=())
        changes: dict[str, Any] = {"gate_opened": True}
        if "vxlanId" in req:
            changes["vxlan_id"] = _bad_request_on_value_error(
                _require_int, "vxlanId", req["vxlanId"], 1, MAX_VNI
            )
        if "privacySeparatorEnabled" in req:
            changes["privacy_separator_enabled"] = req["privacySeparatorEnabled"]
        return self._change_vpg(changes, 200)

    def _op_close_gate(
        self, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        return self._change_vpg({"gate_opened": False}, 200)

    def _op_set_vxlan_id(
        self, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        req = _json_object(body, required=True)
        _check_fields(req, {"vxlanId": int}, required=("vxlanId",))
        vni = _bad_request_on_value_error(_require_int, "vxlanId", req["vxlanId"], 1, MAX_VNI)
        return self._change_vpg({"vxlan_id": vni}, 204)

    def _change_vpg(self, changes: dict[str, Any], status: int) -> Response:
        def change() -> Response:
            self._settings = dataclasses.replace(self._settings, **changes)
            self._modified_ms = _now_ms()
            # The spec gives no body for openGate/closeGate; the real API answers the VPG.
            return Response(status, self._vpg_body() if status == 200 else None)

        return cast(Response, self._mutate(change))

    def _op_set_redirection(
        self, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        req = _json_object(body, required=True)
        fields: dict[str, type] = {"description": str, "enabled": bool, "gateway": str}
        _check_fields(req, fields, required=())
        if "gateway" in req:
            _bad_request_on_value_error(_ipv4, "gateway", req["gateway"])
        config = {k: req[k] for k in fields if k in req}

        def change() -> Response:
            self._redirection = config
            self._modified_ms = _now_ms()
            return Response(200, self._vpg_body())

        return cast(Response, self._mutate(change))

    def _op_unset_redirection(
        self, params: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> Response:
        def change() -> Response:
            self._redirection = None
            self._modified_ms = _now_ms()
            return Response(200, self._vpg_body())

        return cast(Response, self._mutate(change))

    # ----- control endpoints -------------------------------------------------------------

    def _handle_control(self, method: str, path: str, body: bytes) -> Response:
        name = path[len(CONTROL_PREFIX) :]
        try:
            if method == "GET" and name == "state":
                pass
            elif method == "POST" and name == "faults":
                self.set_faults(**_json_object(body, required=True))
            elif method == "POST" and name == "reset_faults":
                self.reset_faults()
            elif method == "POST" and name == "settings":
                changes = _json_object(body, required=True)
                refused = set(changes) - _HTTP_SETTABLE
                if refused:
                    raise ValueError(f"not settable: {', '.join(sorted(refused))}")
                self.update_settings(**changes)
            elif method == "POST" and name == "expire_tokens":
                self.expire_tokens()
            elif method == "POST" and name == "reset_counts":
                self.reset_counts()
            else:
                msg = f"No such control endpoint: {method} {path}"
                return Response(404, {"code": E_NOT_FOUND, "message": msg})
        except (ValueError, TypeError, _BadRequest) as exc:
            return Response(400, {"code": E_BAD_REQUEST, "message": str(exc)})
        return Response(200, self.state())


def _peer_json(peer: Peer, netmask: str, *, customer: bool) -> dict[str, Any]:
    return {
        "outerIpAddress": peer.outer_ip,
        "innerIpAddress": peer.inner_ip,
        "netmask": netmask,
        "ownedByCustomer": customer,
    }


def _free_lower_half(net: ipaddress.IPv4Network, used: Iterable[str]) -> str | None:
    """First free host address in the lower half of net (the lab puts devices in the upper)."""
    taken = {int(ipaddress.IPv4Address(a)) for a in used}
    first = int(net.network_address) + 1
    end = int(net.network_address) + net.num_addresses // 2  # exclusive
    for candidate in range(first, end):
        if candidate not in taken:
            return str(ipaddress.IPv4Address(candidate))
    return None


def _json_object(body: bytes, *, required: bool) -> dict[str, Any]:
    if not body.strip():
        if required:
            raise _BadRequest("A JSON request body is required")
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _BadRequest("The request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise _BadRequest("The request body must be a JSON object")
    return value


def _check_fields(
    req: Mapping[str, Any], types: Mapping[str, type], required: Iterable[str]
) -> None:
    """Required fields present and declared fields of the spec's type (unknown ones ignored)."""
    for name in required:
        if name not in req:
            raise _BadRequest(f"{name} is required")
    for name, kind in types.items():
        if name not in req:
            continue
        value = req[name]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise _BadRequest(f"{name} must be of type {_JSON_TYPE_NAMES[kind]}")


_JSON_TYPE_NAMES: dict[type, str] = {str: "string", int: "integer", bool: "boolean"}


def _bad_request_on_value_error(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError as exc:
        raise _BadRequest(str(exc)) from None


# ----- HTTP shell ------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must not keep the process alive

    def __init__(self, sock: socket.socket, emulator: Emulator) -> None:
        super().__init__(sock.getsockname()[:2], _RequestHandler, bind_and_activate=False)
        # Replace the socket the base class made with the one we were handed.
        self.socket.close()
        self.socket = sock
        self.address_family = sock.family
        self.server_address = sock.getsockname()
        self.emulator = emulator
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._stopping = False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.discard(request)

    def serve(self) -> None:
        """Accept until stop(). Not serve_forever: its poll interval would delay every stop."""
        while not self._stopping:
            try:
                conn, addr = self.socket.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.05)  # EMFILE, ECONNABORTED...: keep serving, do not spin
                continue
            try:
                self.process_request(conn, addr)  # a thread per connection
            except Exception:
                self.handle_error(conn, addr)
                self.shutdown_request(conn)

    def stop(self) -> None:
        """Stop accepting, close the socket, cut open keep-alive connections."""
        self._stopping = True
        # shutdown() wakes a thread blocked in accept() on Linux; close() alone does not.
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by its own thread
                conn.shutdown(socket.SHUT_RDWR)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients with a session expect
    server_version = "soracom-api-emulator"
    timeout = 60  # idle keep-alive connections must not hold a thread forever

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        emulator = cast(_Server, self.server).emulator
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(Response(400, {"code": E_BAD_REQUEST, "message": "Send Content-Length"}))
            self.close_connection = True
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._reply(Response(413, {"code": E_TOO_LARGE, "message": "Bad body length"}))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        resp = emulator.handle(self.command, self.path, dict(self.headers.items()), body)
        if resp.drop:
            # Say nothing; the server closes the socket after this handler returns.
            self.close_connection = True
            return
        self._reply(resp)

    def _reply(self, resp: Response) -> None:
        data = b"" if resp.body is None else json.dumps(resp.body).encode()
        self.send_response(resp.status)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        if resp.status != 204:  # RFC 9110: no Content-Length on 204
            if data:
                self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # Request line and status only: headers (key, token) and bodies (auth key) never.
        log.debug("%s %s", self.address_string(), format % args)


# ----- command line ----------------------------------------------------------------------


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _read_or_create_key(path: str) -> str:
    """Read the AuthKey secret; create the file (0600) with a random one when missing."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except FileNotFoundError:
        key = _default_auth_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
        log.warning("wrote a new random auth key to %s", path)
    if not key:
        raise SystemExit(f"auth key file {path} is empty")
    return key


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gatepeer.lab.emulator", description="SORACOM API emulator for the lab."
    )
    parser.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 8080))
    parser.add_argument("--vni", type=int, help="gateVxlanId (default 10)")
    parser.add_argument("--device-subnet", help="device subnet CIDR (default 198.19.0.0/16)")
    parser.add_argument(
        "--endpoint",
        action="append",
        metavar="OUTER=INNER",
        help="a VPG tunnel endpoint; repeat; replaces the two default endpoints",
    )
    parser.add_argument("--operator-id")
    parser.add_argument("--auth-key-id")
    parser.add_argument(
        "--auth-key-file",
        help="file holding the AuthKey secret; created with a random key when missing "
        "(default: a new file in the temporary directory)",
    )
    parser.add_argument("--vpg-id")
    parser.add_argument("--token-lifetime", type=float, metavar="SECONDS")
    parser.add_argument("--wrapped-errors", action="store_true")
    parser.add_argument("--gate-closed", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )

    changes: dict[str, Any] = {}
    for name, value in (
        ("vxlan_id", args.vni),
        ("device_subnet", args.device_subnet),
        ("endpoints", args.endpoint),
        ("operator_id", args.operator_id),
        ("auth_key_id", args.auth_key_id),
        ("vpg_id", args.vpg_id),
        ("token_lifetime_s", args.token_lifetime),
    ):
        if value is not None:
            changes[name] = value
    if args.wrapped_errors:
        changes["wrapped_errors"] = True
    if args.gate_closed:
        changes["gate_opened"] = False
    try:
        settings = EmulatorSettings(**changes)
    except ValueError as exc:
        parser.error(str(exc))

    # Only now, with the settings valid, touch the file system for the key.
    key_file = args.auth_key_file
    if key_file is None:
        fd, key_file = tempfile.mkstemp(prefix="soracom-emulator-", suffix=".key")  # 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(settings.auth_key + "\n")
    else:
        settings = dataclasses.replace(settings, auth_key=_read_or_create_key(key_file))

    emulator = Emulator(settings)
    host, port = args.listen
    try:
        url = emulator.start(host, port)
    except OSError as exc:
        parser.error(f"cannot listen on {host}:{port}: {exc}")
    print(f"SORACOM API emulator: {url} (API under /v1, control under /_emulator/)", flush=True)
    print(f"auth key id {settings.auth_key_id}, secret in {key_file}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
