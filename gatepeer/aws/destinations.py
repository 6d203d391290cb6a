"""AWS names in `packet_path.allowed_destinations`, resolved to the prefixes they stand for.

Three kinds of entry name something in EC2 instead of a prefix:
- `pl-…`: a managed prefix list (GetManagedPrefixListEntries);
- `com.amazonaws.<region>.<service>`: an AWS-managed prefix list by name
  (DescribeManagedPrefixLists, then its entries), such as S3's or DynamoDB's;
- `vpce-…`: a VPC endpoint. An interface endpoint stands for its network interfaces' private
  addresses (DescribeVpcEndpoints, DescribeNetworkInterfaces); a gateway endpoint for its
  service's prefix list (the prefix list its route points at).

The resolved prefixes are kept on disk (atomic_json), so a boot while the EC2 API cannot be
reached keeps the last good set; each entry keeps its last good value when one refresh of it
fails, and the error names the entry. EC2 is reached through boto3's usual configuration
(credentials chain, `AWS_ENDPOINT_URL`), like every other AWS call here.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from gatepeer import atomic_json
from gatepeer.aws import AwsError
from gatepeer.config import ENDPOINT_ID, PREFIX_LIST_ID, PREFIX_LIST_NAME, is_aws_name

__all__ = ["DestinationError", "DestinationResolver", "is_aws_name", "resolve_entry"]

log = logging.getLogger(__name__)


class DestinationError(AwsError):
    """One entry could not be resolved; the message starts with the entry. `missing`: EC2
    says it does not exist (as opposed to not answering or refusing)."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def _aws_call(entry: str, what: str, call: Callable[[], Any]) -> Any:
    from botocore.exceptions import ClientError

    from gatepeer.aws.clients import error_code, error_message, transport_errors

    try:
        return call()
    except ClientError as exc:
        code = error_code(exc)
        raise DestinationError(
            f"{entry}: {what}: {code or 'error'}: {error_message(exc)}",
            missing=code.endswith("NotFound") or code.endswith(".Malformed"),
        ) from None
    except transport_errors() as exc:
        raise DestinationError(f"{entry}: {what}: {' '.join(str(exc).split())}") from None


def _ipv4(entry: str, cidrs: Iterable[str]) -> tuple[IPv4Network, ...]:
    found = []
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise DestinationError(
                f"{entry}: EC2 answered a prefix that is not one: {cidr!r}"
            ) from None
        if isinstance(net, IPv4Network):  # the packet path is IPv4; IPv6 entries do not apply
            found.append(net)
    if not found:
        raise DestinationError(f"{entry}: resolves to no IPv4 prefix", missing=True)
    return tuple(sorted(set(found)))


def _prefix_list_entries(ec2: Any, entry: str, prefix_list_id: str) -> tuple[IPv4Network, ...]:
    cidrs: list[str] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"PrefixListId": prefix_list_id}
        if token:
            kwargs["NextToken"] = token
        page = _aws_call(
            entry,
            f"GetManagedPrefixListEntries {prefix_list_id}",
            partial(ec2.get_managed_prefix_list_entries, **kwargs),
        )
        cidrs.extend(str(e.get("Cidr", "")) for e in page.get("Entries", []))
        token = page.get("NextToken")
        if not token:
            return _ipv4(entry, cidrs)


def prefix_list_id_by_name(ec2: Any, entry: str, name: str) -> str:
    found = _aws_call(
        entry,
        "DescribeManagedPrefixLists",
        lambda: ec2.describe_managed_prefix_lists(
            Filters=[{"Name": "prefix-list-name", "Values": [name]}]
        ),
    ).get("PrefixLists", [])
    if not found:
        raise DestinationError(
            f"{entry}: no managed prefix list has this name in this region (an AWS-managed "
            "list exists only in its own region: S3 endpoints are same-region only)",
            missing=True,
        )
    return str(found[0]["PrefixListId"])


def _endpoint(ec2: Any, entry: str) -> tuple[IPv4Network, ...]:
    endpoints = _aws_call(
        entry,
        "DescribeVpcEndpoints",
        lambda: ec2.describe_vpc_endpoints(VpcEndpointIds=[entry]),
    ).get("VpcEndpoints", [])
    if not endpoints:
        raise DestinationError(f"{entry}: no such VPC endpoint", missing=True)
    endpoint = endpoints[0]
    kind = endpoint.get("VpcEndpointType")
    if kind == "Gateway":
        name = str(endpoint.get("ServiceName", ""))
        return _prefix_list_entries(ec2, entry, prefix_list_id_by_name(ec2, entry, name))
    if kind != "Interface":
        raise DestinationError(f"{entry}: a {kind} endpoint has no destination addresses")
    enis = list(endpoint.get("NetworkInterfaceIds", []))
    if not enis:
        raise DestinationError(f"{entry}: the interface endpoint has no network interfaces yet")
    interfaces = _aws_call(
        entry,
        "DescribeNetworkInterfaces",
        lambda: ec2.describe_network_interfaces(NetworkInterfaceIds=enis),
    ).get("NetworkInterfaces", [])
    addresses = [
        f"{a['PrivateIpAddress']}/32"
        for eni in interfaces
        for a in eni.get("PrivateIpAddresses", [])
        or [{"PrivateIpAddress": eni.get("PrivateIpAddress")}]
        if a.get("PrivateIpAddress")
    ]
    return _ipv4(entry, addresses)


def resolve_entry(ec2: Any, entry: str) -> tuple[IPv4Network, ...]:
    """The IPv4 prefixes one entry stands for; DestinationError naming it otherwise."""
    if PREFIX_LIST_ID.fullmatch(entry):
        return _prefix_list_entries(ec2, entry, entry)
    if ENDPOINT_ID.fullmatch(entry):
        return _endpoint(ec2, entry)
    if PREFIX_LIST_NAME.fullmatch(entry):
        return _prefix_list_entries(ec2, entry, prefix_list_id_by_name(ec2, entry, entry))
    raise DestinationError(f"{entry}: not a prefix list, prefix list name or VPC endpoint id")


@dataclass
class ResolvedDestinations:
    """What each named entry stood for when last resolved, and what failed since."""

    by_entry: dict[str, tuple[IPv4Network, ...]] = field(default_factory=dict)
    resolved_at: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def prefixes(self) -> tuple[IPv4Network, ...]:
        every = {n for nets in self.by_entry.values() for n in nets}
        return tuple(sorted(ipaddress.collapse_addresses(every)))

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": {
                entry: {
                    "prefixes": [str(n) for n in nets],
                    "resolved_at": self.resolved_at.get(entry),
                }
                for entry, nets in sorted(self.by_entry.items())
            },
            "errors": dict(sorted(self.errors.items())),
        }


def from_cache(data: dict[str, Any] | None, entries: Iterable[str]) -> ResolvedDestinations:
    """The kept set, for the entries still configured; anything unreadable is skipped."""
    kept = ResolvedDestinations()
    stored = (data or {}).get("entries")
    if not isinstance(stored, dict):
        return kept
    for entry in entries:
        item = stored.get(entry)
        if not isinstance(item, dict) or not isinstance(item.get("prefixes"), list):
            continue
        try:
            kept.by_entry[entry] = tuple(IPv4Network(p) for p in item["prefixes"])
        except (ValueError, TypeError):
            continue
        at = item.get("resolved_at")
        if isinstance(at, (int, float)):
            kept.resolved_at[entry] = float(at)
    return kept


class DestinationResolver:
    """The named entries of packet_path.allowed_destinations, refreshed on a cadence.

    `refresh()` is called from the daemon's refresher thread (and by `apply`); the reconcile
    reads `prefixes()`. A failed entry keeps its last good prefixes."""

    def __init__(
        self,
        entries: tuple[str, ...],
        ec2: Callable[[], Any],
        *,
        cache: Path | None,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.entries = entries
        self.ec2 = ec2
        self.cache = cache
        self.interval_s = interval_s
        self.clock = clock
        self.state = from_cache(atomic_json.read(cache) if cache else None, entries)
        self.refreshed_at: float | None = None

    def due(self) -> bool:
        return bool(self.entries) and (
            self.refreshed_at is None or self.clock() - self.refreshed_at >= self.interval_s
        )

    def prefixes(self) -> tuple[IPv4Network, ...]:
        return self.state.prefixes()

    def unresolved(self) -> tuple[str, ...]:
        """Entries with no prefixes at all yet (never resolved, nothing kept)."""
        return tuple(e for e in self.entries if e not in self.state.by_entry)

    def refresh(self) -> bool:
        """Ask EC2 for every entry; True when the set of prefixes changed."""
        if not self.entries:
            return False
        before = self.prefixes()
        now = self.clock()
        self.refreshed_at = now
        # Built aside and swapped in whole: the reconcile reads `state` from another thread.
        state = ResolvedDestinations(
            dict(self.state.by_entry), dict(self.state.resolved_at), dict(self.state.errors)
        )
        try:
            ec2 = self.ec2()
        except AwsError as exc:
            for entry in self.entries:
                state.errors[entry] = f"{entry}: {exc}"
            log.warning("packet_path.allowed_destinations: %s", exc)
            self.state = state
            return False
        changed_entries = False
        for entry in self.entries:
            try:
                nets = resolve_entry(ec2, entry)
            except DestinationError as exc:
                if state.errors.get(entry) != str(exc):
                    log.warning(
                        "packet_path.allowed_destinations: %s%s",
                        exc,
                        " (its last good prefixes stay)" if entry in state.by_entry else "",
                    )
                state.errors[entry] = str(exc)
                continue
            state.errors.pop(entry, None)
            if state.by_entry.get(entry) != nets:
                changed_entries = True
                log.info(
                    "packet_path.allowed_destinations: %s is %s",
                    entry,
                    ", ".join(str(n) for n in nets),
                )
            state.by_entry[entry] = nets
            state.resolved_at[entry] = now
        self.state = state
        if self.cache is not None and (changed_entries or not self.cache.exists()):
            try:
                atomic_json.write(self.cache, state.to_json())
            except OSError as exc:
                log.warning("packet_path.destinations_cache: %s: %s", self.cache, exc)
        return self.prefixes() != before

    def to_json(self) -> dict[str, Any]:
        return {**self.state.to_json(), "unresolved": list(self.unresolved())}
