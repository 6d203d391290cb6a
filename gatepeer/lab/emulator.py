"""SORACOM API emulator: the API side of the lab, and the fake the client's tests talk to.

It speaks the shapes of the official spec (``shared/soracom-api/soracom-api.en.yaml``) for the
operations a customer gate peer needs, keeps its state in memory, and injects faults on demand.
Standard library only: it runs inside lab network namespaces where nothing else is installed.

Public API (kept stable: the lab imports it)
--------------------------------------------

``EmulatorSettings(...)``
    Frozen dataclass, every field has a default (see the class). ``endpoints`` are the VPG's
    own tunnel endpoints as ``Peer(outer_ip, inner_ip)`` (plain 2-tuples are accepted).

``Emulator(settings=None, on_peers_changed=None, *, on_vpg_changed=None,
on_redirection_changed=None, clock=time.monotonic)``
    ``on_peers_changed(peers: list[Peer])`` is called after every registerGatePeer or
    unregisterGatePeer that changed the customer gate peers, outside the state lock, in the
    order of the changes, with the full list of customer peers. ``on_vpg_changed(settings)`` is
    called likewise when the VNI, device subnet, endpoints or gate state change (control
    endpoint, ``update_settings``, openGate, closeGate, setVirtualPrivateGatewayVxLanId), and
    ``on_redirection_changed(redirection: dict | None)`` when set/unsetRedirectionConfiguration
    changed the Junction redirection (None: unset). All run before the API call (or control
    request) that caused them is answered, so a caller that got its answer may rely on the lab
    having followed. A callback that raises is logged; the call still succeeds (the real API
    knows nothing of the lab).
    ``clock`` (monotonic seconds) drives token expiry and the rate-limit window; tests pass a
    settable one.

    ``serve_on(sock) -> base_url``  serve on an already bound socket (listening or not) in a
                                    daemon thread; the emulator owns the socket from then on.
                                    Call it several times to serve several sockets at once.
    ``start(host="127.0.0.1", port=0) -> base_url``  bind and serve (tests, manual use).
    ``stop()``                       stop every server and close its socket.
    ``settings``, ``peers()``, ``endpoints()``, ``update_settings(**changes)``,
    ``set_faults(**faults)``, ``reset_faults()``, ``faults()``, ``set_overrides(vpg=...,
    vpg_remove=..., peers=...)``, ``overrides()``, ``redirection()``, ``expire_tokens()``,
    ``counts()``, ``reset_counts()``, ``state()``, ``handle(...)`` (one request without HTTP).

``base_url`` is ``http://HOST:PORT`` without ``/v1``; the API lives under ``/v1``.

The parts: ``emulator_model`` (settings, faults, answers), ``emulator_operations`` (routes and
the operations), ``emulator_requests`` (request bodies), ``emulator_http`` (the HTTP shell),
``emulator_cli`` (the command line); this module holds the ``Emulator`` and re-exports the rest.

Control endpoints (no authentication, never subject to faults)
---------------------------------------------------------------

``GET  /_emulator/state``         counts, recent requests (with the emulator clock's arrival
                                  time), peers, settings (never the auth key),
                                  faults, redirection, overrides
``POST /_emulator/faults``        merge, e.g. ``{"latency_ms": 200, "fail_next": 3,
                                  "fail_status": 503, "rate_limit_next": 2,
                                  "rate_limit_seconds": 1, "drop_next": 1}``
``POST /_emulator/reset_faults``  all faults and overrides off
``POST /_emulator/overrides``     replace the answer overrides (the API lies; the state and the
                                  lab stay true), e.g. ``{"vpg": {"gateVxlanId": 99},
                                  "vpg_remove": ["redirection"], "peers": {"198.18.0.10":
                                  {"innerIpAddress": "10.0.0.1"}}}``: ``vpg`` fields are set and
                                  ``vpg_remove`` fields dropped in every answer carrying the VPG
                                  (getVirtualPrivateGateway, openGate, closeGate, set/unset
                                  redirection), ``peers`` fields set in the listGatePeers and
                                  registerGatePeer entries of that outer address. Values are raw
                                  JSON, never validated. ``{}`` clears them.
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
- a request body is checked against the operation's request schema (``emulator_requests``):
  not JSON, not an object, an unknown or misspelled field, a wrong type or a missing required
  field is 400, after the token check; an operation whose spec declares no body accepts none
  or ``{}`` and refuses anything else.

Command line: ``python -m gatepeer.lab.emulator --listen 127.0.0.1:8080 [--vni N]
[--device-subnet CIDR] [--endpoint OUTER=INNER ...] [--auth-key-id ID] [--auth-key-file PATH]
[--vpg-id ID] [--operator-id ID] [--token-lifetime S] [--wrapped-errors] [--gate-closed]``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from gatepeer.lab.emulator_http import Server
from gatepeer.lab.emulator_model import (
    API_PREFIX,
    CONTROL_PREFIX,
    DEFAULT_ENDPOINTS,
    E_BAD_REQUEST,
    E_INJECTED,
    E_INTERNAL,
    E_NO_SUCH_VPG,
    E_NOT_FOUND,
    E_RATE_LIMITED,
    E_TOKEN_EXPIRED,
    E_TOKEN_INVALID,
    HTTP_SETTABLE,
    RATELIMIT_WINDOW_S,
    BadRequest,
    EmulatorSettings,
    Faults,
    Overrides,
    Peer,
    PeersCallback,
    RedirectionCallback,
    Response,
    Token,
    VpgCallback,
    now_ms,
)
from gatepeer.lab.emulator_operations import (
    OPERATION_STATUSES,
    ROUTES,
    Handler,
    Operations,
)
from gatepeer.lab.emulator_requests import json_object, parse_request

__all__ = [
    "DEFAULT_ENDPOINTS",
    "OPERATION_STATUSES",
    "Emulator",
    "EmulatorSettings",
    "Faults",
    "Peer",
    "Response",
    "main",
]

log = logging.getLogger("gatepeer.lab.emulator")  # one logger for the whole emulator


class Emulator(Operations):
    """In-memory SORACOM API for one operator and one VPG. Thread-safe."""

    def __init__(
        self,
        settings: EmulatorSettings | None = None,
        on_peers_changed: PeersCallback | None = None,
        *,
        on_vpg_changed: VpgCallback | None = None,
        on_redirection_changed: RedirectionCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings if settings is not None else EmulatorSettings()
        self._on_peers_changed = on_peers_changed
        self._on_vpg_changed = on_vpg_changed
        self._on_redirection_changed = on_redirection_changed
        self._clock = clock
        self._lock = threading.Lock()
        # Held across a change and its callbacks, so callbacks run in the order of the changes;
        # re-entrant so a callback may call back into the emulator.
        self._notify_lock = threading.RLock()
        self._peers: dict[str, str] = {}  # outer -> inner, in registration order
        self._redirection: dict[str, Any] | None = None
        self._tokens: dict[str, Token] = {}
        self._faults = Faults()
        self._overrides = Overrides()
        self._counts: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self._created_ms = now_ms()
        self._modified_ms = self._created_ms
        self._rl_window_start = clock()
        self._rl_used = 0
        self._servers: list[tuple[Server, threading.Thread]] = []
        self._handlers: dict[str, Handler] = {
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
            self._modified_ms = now_ms()
            return new

        return self._mutate(change)

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Merge faults (see Faults); raises ValueError on an unknown name or bad value."""
        with self._lock:
            self._faults.update(faults)
            return dataclasses.asdict(self._faults)

    def reset_faults(self) -> None:
        """Faults off and answer overrides cleared."""
        with self._lock:
            self._faults = Faults()
            self._overrides = Overrides()

    def set_overrides(self, **overrides: Any) -> dict[str, Any]:
        """Replace the answer overrides (see Overrides): vpg={field: value}, vpg_remove=[field],
        peers={outer: {field: value}}; none given clears them. ValueError on a bad shape."""
        new = Overrides.from_json(overrides)
        with self._lock:
            self._overrides = new
            return new.to_json()

    def overrides(self) -> dict[str, Any]:
        with self._lock:
            return self._overrides.to_json()

    def redirection(self) -> dict[str, Any] | None:
        """The Junction redirection as set (not as overrides may answer it); None when unset."""
        with self._lock:
            return None if self._redirection is None else dict(self._redirection)

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
                "overrides": self._overrides.to_json(),
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
        server = Server(sock, self)
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
            except BadRequest as exc:
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
        for route in ROUTES:
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
        return self._handlers[operation](params, headers, parse_request(operation, body))

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

    # ----- control endpoints -------------------------------------------------------------

    def _handle_control(self, method: str, path: str, body: bytes) -> Response:
        name = path[len(CONTROL_PREFIX) :]
        try:
            if method == "GET" and name == "state":
                pass
            elif method == "POST" and name == "faults":
                self.set_faults(**json_object(body, required=True))
            elif method == "POST" and name == "reset_faults":
                self.reset_faults()
            elif method == "POST" and name == "overrides":
                self.set_overrides(**json_object(body, required=True))
            elif method == "POST" and name == "settings":
                changes = json_object(body, required=True)
                refused = set(changes) - HTTP_SETTABLE
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
        except (ValueError, TypeError, BadRequest) as exc:
            return Response(400, {"code": E_BAD_REQUEST, "message": str(exc)})
        return Response(200, self.state())


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (in `emulator_cli`)."""
    from gatepeer.lab.emulator_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
