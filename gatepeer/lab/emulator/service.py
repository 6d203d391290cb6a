"""The emulator: one operator's SORACOM API in memory (the operations are `operations`'), with
faults, answer overrides, control endpoints and the HTTP servers it answers through. The
package's docstring (`gatepeer.lab.emulator`) describes its public API and its choices."""

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
from urllib.parse import parse_qs, unquote, urlsplit

from gatepeer.lab.emulator.http_server import Server
from gatepeer.lab.emulator.model import (
    API_PREFIX,
    CONTROL_PREFIX,
    E_BAD_REQUEST,
    E_FORBIDDEN,
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
    Sim,
    Token,
    VpgCallback,
    now_ms,
)
from gatepeer.lab.emulator.operations import ROUTES, Handler, Operations
from gatepeer.lab.emulator.requests import json_object, parse_request

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
        self._sims: dict[str, Sim] = {}
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
            "listSims": self._op_list_sims,
            "listVirtualPrivateGatewayIpAddressMapEntries": self._op_list_ip_address_map,
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

    def set_sims(self, sims: Sequence[Sim | Mapping[str, Any]]) -> list[Sim]:
        """Replace the operator's SIMs (Sim or its JSON); ValueError (nothing changed) on a bad
        SIM or a SIM id or IMSI given twice."""
        parsed = [s if isinstance(s, Sim) else Sim.from_json(s) for s in sims]
        for field_name in ("sim_id", "imsi"):
            values = [getattr(s, field_name) for s in parsed]
            if len(set(values)) != len(values):
                raise ValueError(f"two SIMs share a {field_name}")
        with self._lock:
            self._sims = {s.sim_id: s for s in parsed}
            self._modified_ms = now_ms()
        return parsed

    def sims(self) -> list[Sim]:
        with self._lock:
            return list(self._sims.values())

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
                "sims": [s.to_json() for s in self._sims.values()],
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
        split = urlsplit(target)
        path = split.path
        # Query parameters (listSims' limit, last_evaluated_key) reach the handler beside the
        # path's; the names never collide. Each is taken once: a repeated one is its last value.
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
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
                resp = self._call(operation, {**query, **params}, lowered, body)
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
        with self._lock:
            denied_ops = self._faults.deny
        if operation in denied_ops:
            return self._error(
                settings, 403, E_FORBIDDEN, f"You do not have permission to call {operation}"
            )
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
            elif method == "POST" and name == "sims":
                doc = json_object(body, required=True)
                sims = doc.get("sims")
                if not isinstance(sims, list) or not all(isinstance(x, dict) for x in sims):
                    raise ValueError('sims: give {"sims": [{"sim_id", "imsi", ...}, ...]}')
                # "append": true adds to the SIMs there (a body holds at most 1 MiB of them).
                kept = self.sims() if doc.get("append") is True else []
                self.set_sims([*kept, *sims])
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
