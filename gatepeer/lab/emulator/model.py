"""The emulator's values: settings of the emulated operator and VPG, injected faults, answers,
and the validators they share. Standard library only, like the whole emulator.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
E_FORBIDDEN = "EMU0014"


class Peer(NamedTuple):
    """A gate peer or VPG tunnel endpoint: VXLAN outer address and device-subnet inner address."""

    outer_ip: str
    inner_ip: str


def default_auth_key() -> str:
    # Random per instance: a lab key nobody wrote down cannot leak from a repository.
    return "secret-" + secrets.token_urlsafe(48)


DEFAULT_ENDPOINTS = (Peer("198.18.1.11", "198.19.0.1"), Peer("198.18.1.12", "198.19.0.2"))


def require_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    # bool is an int subclass; JSON true must not pass for a number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def require_number(name: str, value: object, lo: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if value < lo:
        raise ValueError(f"{name} must be at least {lo}, got {value}")
    return float(value)


def require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    return value


def require_ipv4(name: str, value: object) -> ipaddress.IPv4Address:
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
    outer_ip = str(require_ipv4("endpoint outer_ip", value[0]))
    inner_ip = str(require_ipv4("endpoint inner_ip", value[1]))
    return Peer(outer_ip, inner_ip)


@dataclass(frozen=True)
class EmulatorSettings:
    """What the emulated operator and VPG look like. Validated and normalised on creation."""

    operator_id: str = "OP0012345678"
    auth_key_id: str = "keyId-lab00000000000000000000000000000"
    auth_key: str = field(default_factory=default_auth_key, repr=False)
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
        require_int("vxlan_id", self.vxlan_id, 1, MAX_VNI)
        for name in ("gate_opened", "privacy_separator_enabled", "use_internet_gateway"):
            require_bool(name, getattr(self, name))
        require_bool("wrapped_errors", self.wrapped_errors)
        if require_number("token_lifetime_s", self.token_lifetime_s, 0) <= 0:
            raise ValueError("token_lifetime_s must be positive")
        require_int("ratelimit_limit", self.ratelimit_limit, 1)

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
            check_inner(net, ep.inner_ip)
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


def check_inner(net: ipaddress.IPv4Network, inner_ip: str) -> None:
    addr = ipaddress.IPv4Address(inner_ip)
    if addr not in net or addr in (net.network_address, net.broadcast_address):
        raise ValueError(f"inner address {inner_ip} is not a host address of {net}")


# listSims and the IP address map answer at most this many rows per page when no limit is asked.
DEFAULT_PAGE_SIZE = 10
IMSI_RE = re.compile(r"^[0-9]{15}$")


@dataclass(frozen=True)
class Sim:
    """One emulated IoT SIM. `vpg_id` and `address` describe its session (None: no session,
    or a session outside any VPG); `static_address` is its entry in this VPG's IP address map."""

    sim_id: str
    imsi: str
    name: str | None = None
    group_id: str | None = None
    online: bool = True
    vpg_id: str | None = None
    address: str | None = None
    static_address: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sim_id, str) or not self.sim_id:
            raise ValueError("sim_id must be a non-empty string")
        if not isinstance(self.imsi, str) or not IMSI_RE.match(self.imsi):
            raise ValueError(f"imsi must be 15 digits, got {self.imsi!r}")
        for name in ("name", "group_id", "vpg_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or absent")
        require_bool("online", self.online)
        for name in ("address", "static_address"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(require_ipv4(name, value)))

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Sim:
        """From the control endpoint's body; ValueError names what is wrong."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown SIM field {sorted(unknown)[0]!r}")
        missing = {"sim_id", "imsi"} - set(doc)
        if missing:
            raise ValueError(f"a SIM needs {sorted(missing)[0]}")
        return cls(**doc)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings fields the unauthenticated control endpoint may change: all but the secret.
HTTP_SETTABLE = frozenset(f.name for f in dataclasses.fields(EmulatorSettings)) - {"auth_key"}


@dataclass
class Faults:
    """Injected faults; counters count down as /v1 calls consume them."""

    latency_ms: float = 0
    fail_next: int = 0
    fail_status: int = 503
    rate_limit_next: int = 0
    rate_limit_seconds: int = 1
    drop_next: int = 0
    # Operations answered 403, as for an auth key whose permissions leave them out (until reset).
    deny: tuple[str, ...] = ()

    def update(self, changes: Mapping[str, object]) -> None:
        """Validate every change first, then apply them all (no half-applied update)."""
        valid: dict[str, object] = {}
        for name, value in changes.items():
            if name == "latency_ms":
                valid[name] = require_number(name, value, 0)
            elif name == "fail_status":
                valid[name] = require_int(name, value, 400, 599)
            elif name in ("fail_next", "rate_limit_next", "rate_limit_seconds", "drop_next"):
                valid[name] = require_int(name, value, 0)
            elif name == "deny":
                if not isinstance(value, list | tuple) or not all(
                    isinstance(v, str) for v in value
                ):
                    raise ValueError("deny must be a list of operationIds")
                valid[name] = tuple(value)
            else:
                raise ValueError(f"unknown fault {name!r}")
        for name, value in valid.items():
            setattr(self, name, value)


@dataclass(frozen=True)
class Overrides:
    """Answers made to lie, for tests of a client's checks: ``vpg`` fields set (raw JSON, not
    validated) and ``vpg_remove`` fields dropped in every answer that carries the VPG; ``peers``
    fields set in the listGatePeers and registerGatePeer entries of that outer address. Only
    answers change: the emulator's state, and the lab that follows it, stay true."""

    vpg: Mapping[str, Any] = field(default_factory=dict)
    vpg_remove: tuple[str, ...] = ()
    peers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Overrides:
        """From the control endpoint's body; ValueError names what is wrong."""
        unknown = set(doc) - {"vpg", "vpg_remove", "peers"}
        if unknown:
            raise ValueError(f"unknown override {sorted(unknown)[0]!r}")
        vpg = doc.get("vpg", {})
        if not isinstance(vpg, Mapping):
            raise ValueError("vpg must be an object of VPG fields")
        remove = doc.get("vpg_remove", [])
        if not isinstance(remove, list | tuple) or not all(isinstance(f, str) for f in remove):
            raise ValueError("vpg_remove must be a list of VPG field names")
        peers = doc.get("peers", {})
        if not isinstance(peers, Mapping) or not all(
            isinstance(v, Mapping) for v in peers.values()
        ):
            raise ValueError("peers must map an outerIpAddress to an object of fields")
        # A private copy: a caller's later edits must not change the answers.
        return cls(
            vpg=copy.deepcopy(dict(vpg)),
            vpg_remove=tuple(remove),
            peers={str(k): copy.deepcopy(dict(v)) for k, v in peers.items()},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "vpg": copy.deepcopy(dict(self.vpg)),
            "vpg_remove": list(self.vpg_remove),
            "peers": {k: copy.deepcopy(dict(v)) for k, v in self.peers.items()},
        }

    def apply_to_vpg(self, vpg: dict[str, Any]) -> dict[str, Any]:
        for name in self.vpg_remove:
            vpg.pop(name, None)
        vpg.update(copy.deepcopy(dict(self.vpg)))
        return vpg

    def apply_to_peer(self, peer: dict[str, Any]) -> dict[str, Any]:
        fields = self.peers.get(str(peer.get("outerIpAddress")))
        if fields:
            peer.update(copy.deepcopy(dict(fields)))
        return peer


@dataclass
class Response:
    """One answer; ``drop`` means close the connection without answering."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False


@dataclass
class Token:
    api_key: str
    operator_id: str
    expires_at: float


class BadRequest(Exception):
    """A request the API refuses with 400; the message is safe to send back."""


def now_ms() -> int:
    return int(time.time() * 1000)


PeersCallback = Callable[[list[Peer]], None]
VpgCallback = Callable[[EmulatorSettings], None]
RedirectionCallback = Callable[[dict[str, Any] | None], None]
