"""SORACOM API client: AuthKey authentication, token refresh, the VPG and gate peer calls.

Standard library only (urllib), so the CLI stays light. Every call has a timeout; 5xx answers,
timeouts and dropped connections are retried with exponential backoff and jitter; after a 429
no request goes out, from this call or a later one, before the wait that
`X-Soracom-Ratelimit-Seconds-Before-Refresh` asks for (at most 60 s) has passed. The auth key
is read from its file only when authenticating and never appears in an error, a log line or
`repr`.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

TOKEN_LIFETIME_S = 86_400
# Refresh when less than this share of the token's lifetime is left.
REFRESH_MARGIN = 0.1
RATE_LIMIT_WAIT_MAX_S = 60.0
RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
# Rows asked per page of listSims and the IP address map, and a bound on the pages: 1,000 pages
# of 100 is 100,000 SIMs, far past one VPG's devices; past it the answer is not to be trusted.
SIM_PAGE_SIZE = 100
MAX_PAGES = 1_000


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The API never redirects; following one would send the API key and token elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


class SoracomError(RuntimeError):
    """An API call failed; `status` is the HTTP status (0 when there was no answer)."""

    def __init__(
        self, operation: str, status: int, message: str, code: str = "", hint: str = ""
    ) -> None:
        self.operation = operation
        self.status = status
        self.code = code
        self.message = message
        # The message comes from the answer: shown on one line, printable, bounded. The hint
        # is ours: what to check next.
        detail = printable(f"{code}: {message}" if code else message) + (
            f"; {hint}" if hint else ""
        )
        super().__init__(
            f"SORACOM API {operation} failed: {detail}"
            if status == 0
            else f"SORACOM API {operation} failed with HTTP {status}: {detail}"
        )


class AuthenticationError(SoracomError):
    """The AuthKey was refused: the user must fix the key id or the key file."""


@dataclass
class ApiStats:
    """Counters the metrics collector reads at scrape time; updated under a lock."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    ratelimit_remaining: int | None = None
    auth_failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, operation: str, status: int, seconds: float) -> None:
        with self.lock:
            key = (operation, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.seconds[operation] = self.seconds.get(operation, 0.0) + seconds


@dataclass
class _Session:
    api_key: str = field(repr=False)
    token: str = field(repr=False)
    operator_id: str
    expires_at: float
    lifetime: float


def _json(payload: bytes) -> Any:
    """The body as JSON. Anything that is not JSON raises ValueError, including nesting deeper
    than the parser can recurse (json raises RecursionError there, which nothing expects)."""
    try:
        return json.loads(payload)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def error_fields(body: bytes) -> tuple[str, str]:
    """(code, message) from either error shape SORACOM sends; empty strings if neither."""
    try:
        data = _json(body or b"{}")
    except ValueError:
        return "", body[:200].decode("utf-8", "replace")
    if isinstance(data, dict) and isinstance(data.get("errorMessage"), dict):
        data = data["errorMessage"]
    if not isinstance(data, dict):
        return "", ""
    return str(data.get("code", "")), str(data.get("message", ""))


class SoracomClient:
    def __init__(
        self,
        endpoint: str,
        auth_key_id: str,
        read_auth_key: Callable[[], str],
        *,
        timeout: float = 10.0,
        attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        token_lifetime: int = TOKEN_LIFETIME_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        stats: ApiStats | None = None,
    ) -> None:
        self.endpoint = api_base(endpoint)
        self.auth_key_id = auth_key_id
        self._read_auth_key = read_auth_key
        self.timeout = timeout
        self.attempts = attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.token_lifetime = token_lifetime
        self.sleep = sleep
        self.clock = clock
        self.stats = stats or ApiStats()
        self._session: _Session | None = None
        # The Date header of the last answer and this host's wall clock when it came: `doctor`
        # measures the clock's skew against the API with it.
        self.last_date: tuple[str, float] | None = None
        # After a 429, no request before this clock time, across calls: a call that gave up
        # must not let the next one (the daemon's next refresh) ask again inside the wait.
        self._rate_limited_until = 0.0

    def __repr__(self) -> str:
        return f"SoracomClient({self.endpoint!r}, auth_key_id={self.auth_key_id!r})"

    # ---- transport ---------------------------------------------------------------------

    def _send(
        self, operation: str, method: str, path: str, body: Any, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        """One HTTP exchange; (0, why, {}) when no usable answer came (timeout, dropped)."""
        data = json.dumps(body).encode() if body is not None else None
        started = self.clock()
        try:
            try:
                req = urllib.request.Request(self.endpoint + path, data=data, method=method)
                req.add_header("Accept", "application/json")
                if data is not None:
                    req.add_header("Content-Type", "application/json")
                for key, value in headers.items():
                    req.add_header(key, value)
                with _OPENER.open(req, timeout=self.timeout) as resp:
                    status, payload, got = resp.status, resp.read(), _lower(resp.headers.items())
            except urllib.error.HTTPError as exc:
                with exc:  # reading the error body can time out or break off too
                    status, payload, got = exc.code, exc.read(), _lower(exc.headers.items())
        except (OSError, http.client.HTTPException) as exc:
            # Timeouts, refused or dropped connections (URLError, ConnectionError and
            # TimeoutError are all OSError), and answers that break off or are not HTTP at all
            # (IncompleteRead, BadStatusLine): no usable answer, so the caller may retry.
            reason = getattr(exc, "reason", exc)
            text = str(reason) or type(reason).__name__
            log.debug("%s: no answer: %s", operation, text)
            self.stats.record(operation, 0, self.clock() - started)
            return 0, text.encode(), {}
        except (ValueError, OverflowError) as exc:
            # A malformed endpoint URL (unknown scheme, port out of range) or a header value
            # http.client refuses: retrying cannot help. The exception's text is not shown: for
            # a header it quotes the value, which may be the token or the API key.
            raise SoracomError(
                operation,
                0,
                f"cannot send a request to {self.endpoint!r} ({type(exc).__name__}): "
                "check soracom.endpoint",
            ) from None
        self.stats.record(operation, status, self.clock() - started)
        if got.get("date"):
            self.last_date = (got["date"], time.time())
        remaining = got.get("x-soracom-ratelimit-remaining", "")
        # ASCII digits only ("²" is a digit to isdigit, not to int), and few enough for int().
        if remaining.isascii() and remaining.isdigit() and len(remaining) <= 18:
            self.stats.ratelimit_remaining = int(remaining)
        return status, payload, got

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads a fleet of gate peers that all saw the same outage.
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))

    def _call(
        self,
        operation: str,
        method: str,
        path: str,
        body: Any = None,
        *,
        authenticated: bool = True,
        ok: tuple[int, ...] = (200,),
    ) -> tuple[int, Any]:
        status, data, _ = self._exchange(
            operation, method, path, body, authenticated=authenticated, ok=ok
        )
        return status, data

    def _exchange(
        self,
        operation: str,
        method: str,
        path: str,
        body: Any = None,
        *,
        authenticated: bool = True,
        ok: tuple[int, ...] = (200,),
    ) -> tuple[int, Any, dict[str, str]]:
        """One call with its retries: (status, JSON body, headers with lower-case names)."""
        reauthed = False
        attempt = 0
        while True:
            self._wait_out_rate_limit(operation)
            headers = self._auth_headers() if authenticated else {}
            status, payload, got = self._send(operation, method, path, body, headers)
            if status in ok:
                if not payload.strip():
                    return status, None, got
                try:
                    return status, _json(payload), got
                except ValueError:
                    # A proxy or captive portal answering in our place: not the SORACOM API.
                    raise SoracomError(
                        operation, status, "the answer is not JSON: " + _excerpt(payload)
                    ) from None
            code, message = error_fields(payload) if status else ("", payload.decode())
            if status == 401 and authenticated and not reauthed:
                # The token may have been revoked or expired early: one fresh login, then retry.
                reauthed = True
                self._session = None
                continue
            if status == 429:
                wait = _rate_limit_wait(got)
                self._rate_limited_until = max(self._rate_limited_until, self.clock() + wait)
            retryable = status == 0 or status in RETRYABLE_STATUS or status == 429
            attempt += 1
            if not retryable or attempt >= self.attempts:
                if status == 401:
                    with self.stats.lock:
                        self.stats.auth_failures += 1
                    raise AuthenticationError(
                        operation,
                        status,
                        f"authentication failed for auth key id {self.auth_key_id}: check the key",
                        code,
                    )
                raise SoracomError(operation, status, message or "no answer", code)
            if status == 429:
                log.warning("%s: rate limited, waiting %.1fs", operation, wait)
                continue  # _wait_out_rate_limit waits before the next request
            wait = self._backoff(attempt)
            log.warning(
                "%s: %s, retry %d/%d in %.2fs",
                operation,
                f"HTTP {status}" if status else f"no answer ({message})",
                attempt,
                self.attempts - 1,
                wait,
            )
            self.sleep(wait)

    def _wait_out_rate_limit(self, operation: str) -> None:
        left = self._rate_limited_until - self.clock()
        if left > 0:
            log.debug("%s: waiting %.1fs for the rate limit to refresh", operation, left)
            self.sleep(left)

    # ---- authentication ----------------------------------------------------------------

    def authenticate(self) -> None:
        try:
            secret = self._read_auth_key()
        except OSError as exc:
            with self.stats.lock:
                self.stats.auth_failures += 1
            # An SSM failure already names its parameter; a file's error gets the file said.
            source = "" if getattr(exc, "parameter", None) else "the auth key file: "
            raise AuthenticationError(
                "auth", 0, f"cannot read {source}{exc.strerror or exc}"
            ) from None
        body = {
            "authKeyId": self.auth_key_id,
            "authKey": secret,
            "tokenTimeoutSeconds": self.token_lifetime,
        }
        _, data = self._call("auth", "POST", "/v1/auth", body, authenticated=False)
        answer = _expect_object("auth", data)
        self._session = _Session(
            api_key=_credential("auth", answer, "apiKey"),
            token=_credential("auth", answer, "token"),
            operator_id=_string_field("auth", answer, "operatorId"),
            expires_at=self.clock() + self.token_lifetime,
            lifetime=self.token_lifetime,
        )

    def _refresh(self) -> None:
        s = self._session
        assert s is not None
        path = f"/v1/operators/{urllib.parse.quote(s.operator_id)}/token"
        try:
            _, data = self._call(
                "generateAuthToken", "POST", path, {"tokenTimeoutSeconds": self.token_lifetime}
            )
            token = _credential(
                "generateAuthToken", _expect_object("generateAuthToken", data), "token"
            )
        except SoracomError:
            self._session = None
            self.authenticate()
            return
        # _call may have re-authenticated underneath us; keep its session's keys.
        if self._session is not None:
            self._session.token = token
            self._session.expires_at = self.clock() + self.token_lifetime

    def _auth_headers(self) -> dict[str, str]:
        if self._session is None:
            self.authenticate()
        s = self._session
        assert s is not None
        if s.expires_at - self.clock() < s.lifetime * REFRESH_MARGIN:
            # Mark first so the refresh call itself does not recurse into another refresh.
            s.expires_at = self.clock() + s.lifetime
            self._refresh()
            s = self._session
            assert s is not None
        return {"X-Soracom-API-Key": s.api_key, "X-Soracom-Token": s.token}

    @property
    def operator_id(self) -> str | None:
        return self._session.operator_id if self._session else None

    # ---- operations --------------------------------------------------------------------

    def _vpg_path(self, vpg_id: str, suffix: str = "") -> str:
        return f"/v1/virtual_private_gateways/{urllib.parse.quote(vpg_id)}{suffix}"

    def get_virtual_private_gateway(self, vpg_id: str) -> dict[str, Any]:
        _, data = self._call("getVirtualPrivateGateway", "GET", self._vpg_path(vpg_id))
        return _expect_object("getVirtualPrivateGateway", data)

    def list_gate_peers(self, vpg_id: str) -> list[dict[str, Any]]:
        _, data = self._call("listGatePeers", "GET", self._vpg_path(vpg_id, "/gate/peers"))
        if not isinstance(data, list) or not all(isinstance(p, dict) for p in data):
            raise SoracomError("listGatePeers", 200, "unexpected answer: not a list of peers")
        return data

    def register_gate_peer(
        self, vpg_id: str, outer_ip: str, inner_ip: str | None = None
    ) -> dict[str, Any]:
        body = {"outerIpAddress": outer_ip}
        if inner_ip:
            body["innerIpAddress"] = inner_ip
        _, data = self._call(
            "registerGatePeer",
            "POST",
            self._vpg_path(vpg_id, "/gate/peers"),
            body,
            ok=(200, 201),
        )
        return _expect_object("registerGatePeer", data)

    def unregister_gate_peer(self, vpg_id: str, outer_ip: str) -> None:
        path = self._vpg_path(vpg_id, f"/gate/peers/{urllib.parse.quote(outer_ip)}")
        self._call("unregisterGatePeer", "DELETE", path, ok=(200, 204))

    def open_gate(self, vpg_id: str) -> dict[str, Any]:
        _, data = self._call("openGate", "POST", self._vpg_path(vpg_id, "/gate/open"), {})
        return _expect_object("openGate", data) if data is not None else {}

    def set_redirection(self, vpg_id: str, gateway: str) -> None:
        """Junction redirection on, to `gateway` (setRedirectionConfiguration)."""
        body = {"enabled": True, "gateway": gateway}
        path = self._vpg_path(vpg_id, "/junction/set_redirection")
        self._call("setRedirectionConfiguration", "POST", path, body, ok=(200, 204))

    def unset_redirection(self, vpg_id: str) -> None:
        path = self._vpg_path(vpg_id, "/junction/unset_redirection")
        self._call("unsetRedirectionConfiguration", "POST", path, ok=(200, 204))

    def list_sims(
        self, page_size: int = SIM_PAGE_SIZE, *, first_page_only: bool = False
    ) -> list[dict[str, Any]]:
        """Every SIM of the operator (listSims), page by page through `x-soracom-next-key`;
        only the first page with `first_page_only` (doctor: may the key call it at all)."""
        return self._paginated("listSims", "/v1/sims", page_size, first_page_only)

    def list_ip_address_map(
        self, vpg_id: str, page_size: int = SIM_PAGE_SIZE, *, first_page_only: bool = False
    ) -> list[dict[str, Any]]:
        """The VPG's IP address map (listVirtualPrivateGatewayIpAddressMapEntries), every page:
        SIMs' static and dynamic addresses, and the gate peers' and the VPG's own."""
        path = self._vpg_path(vpg_id, "/ip_address_map")
        return self._paginated(
            "listVirtualPrivateGatewayIpAddressMapEntries", path, page_size, first_page_only
        )

    def _paginated(
        self, operation: str, path: str, page_size: int, first_page_only: bool = False
    ) -> list[dict[str, Any]]:
        """All pages of a list: each answer's `x-soracom-next-key` is the next request's
        `last_evaluated_key`, until an answer has none. Each page is one call, so 429s and
        retries are handled per page, and the rate-limit wait spans the pages."""
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        key: str | None = None
        for _ in range(MAX_PAGES):
            query = {"limit": str(page_size)}
            if key is not None:
                query["last_evaluated_key"] = key
            _, data, headers = self._exchange(
                operation, "GET", f"{path}?{urllib.parse.urlencode(query)}"
            )
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise SoracomError(operation, 200, "unexpected answer: not a list of objects")
            rows.extend(data)
            key = headers.get("x-soracom-next-key") or None
            if key is None or first_page_only:
                return rows
            if key in seen:
                # An API that hands back a key it gave before would page forever.
                raise SoracomError(operation, 200, "unexpected answer: a next key repeated")
            seen.add(key)
        raise SoracomError(operation, 200, f"unexpected answer: more than {MAX_PAGES} pages")


def _expect_object(operation: str, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SoracomError(operation, 200, "unexpected answer: not a JSON object")
    return data


def _string_field(operation: str, data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise SoracomError(operation, 200, f"unexpected answer: no {name}")
    return value


def _credential(operation: str, data: dict[str, Any], name: str) -> str:
    """A token or API key: it goes into a header, so only printable ASCII without spaces.
    Anything else is refused without showing it (it is a secret, whatever it holds)."""
    value = _string_field(operation, data, name)
    if not all("!" <= c <= "~" for c in value):
        raise SoracomError(
            operation, 200, f"unexpected answer: {name} holds characters a header cannot carry"
        )
    return value


def api_base(endpoint: str) -> str:
    """The endpoint without a trailing slash or `/v1`: every path below starts with /v1."""
    base = endpoint.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base


def printable(text: str, limit: int = 200) -> str:
    """One line of printable text, control and non-ASCII characters escaped, at most `limit`."""
    escaped = "".join(c if " " <= c <= "~" else ascii(c)[1:-1] for c in text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def _excerpt(payload: bytes) -> str:
    """The start of a body, on one line, for an error message."""
    return " ".join(payload[:120].decode("utf-8", "replace").split())


def _rate_limit_wait(headers: dict[str, str]) -> float:
    raw = headers.get("x-soracom-ratelimit-seconds-before-refresh", "")
    try:
        wait = float(raw)
    except ValueError:
        wait = 1.0
    return max(0.0, min(wait, RATE_LIMIT_WAIT_MAX_S))


def _lower(items: Any) -> dict[str, str]:
    """Header names compared case-insensitively, as HTTP says."""
    return {str(k).lower(): str(v) for k, v in items}
