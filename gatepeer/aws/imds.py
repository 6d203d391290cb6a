"""Instance facts and the Auto Scaling target state through IMDSv2.

The HTTP side is botocore's `IMDSFetcher` (the fetcher boto3 itself uses for credentials and
the region): it brings the token PUT, the token header, the user agent, the endpoint check and
retries of dropped connections, and it comes with boto3, which the [aws] extra installs anyway.
`ec2-metadata` would add `requests` and caches per process with no endpoint setting.

botocore folds a refused token request and a timed-out one into the same `None`; a thin
wrapper around its HTTP session remembers how the last request ended, so each case gets its
own message:

- token refused (HTTP 403/404/405): fall back to IMDSv1, said in the log and in the facts;
- token request timed out: an error naming the hop limit (a container behind the instance's
  network stack is one hop further; IMDSv2's PUT answer has a hop limit, 1 by default, and AWS
  recommends 2 for containers);
- endpoint unreachable: an error naming the endpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from gatepeer import __version__
from gatepeer.aws import AwsError
from gatepeer.config import DEFAULT_IMDS_ENDPOINT, IMDS_ENDPOINT_ENV, IMDS_ENDPOINT_RE

log = logging.getLogger(__name__)

# Short: on EC2 IMDS answers in about a millisecond; a slow answer means it is not there.
DEFAULT_TIMEOUT_S = 1.0
ATTEMPTS = 2
# botocore asks for a 6-hour token; take a new one well before it expires.
TOKEN_REUSE_S = 5 * 3600
TOKEN_REFUSED_STATUS = frozenset({403, 404, 405})


def resolve_endpoint(configured: str | None, env: Mapping[str, str] | None = None) -> str:
    """Where IMDS is asked: aws.imds_endpoint when the file sets it, else botocore's own
    AWS_EC2_METADATA_SERVICE_ENDPOINT (as every AWS call honours AWS_ENDPOINT_URL), else the
    link-local default. A malformed variable is an error naming it, not a silent default."""
    if configured:
        return configured
    value = (os.environ if env is None else env).get(IMDS_ENDPOINT_ENV, "").strip().rstrip("/")
    if not value:
        return DEFAULT_IMDS_ENDPOINT
    if not IMDS_ENDPOINT_RE.fullmatch(value):
        raise ImdsError(
            "unreachable",
            f"{IMDS_ENDPOINT_ENV}: must be http://ADDRESS[:PORT] (or unset for "
            f"{DEFAULT_IMDS_ENDPOINT}), got {value!r}",
        )
    return value


class ImdsError(AwsError):
    """IMDS gave no usable answer. `kind`: timeout, unreachable, refused, missing, http or
    disabled (the environment says AWS_EC2_METADATA_DISABLED=true, which we honour)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class InstanceFacts:
    instance_id: str
    region: str
    availability_zone: str
    mac: str  # the primary ENI's (device index 0)
    eni_id: str
    private_ipv4: IPv4Address
    subnet_id: str
    subnet_cidr: IPv4Network
    vpc_id: str
    imds_version: int  # 2, or 1 when the token was refused and IMDSv1 answered
    vpc_cidrs: tuple[IPv4Network, ...] = ()  # the VPC's IPv4 CIDR blocks; () when not told

    @property
    def note(self) -> str | None:
        if self.imds_version == 1:
            return "IMDSv2 token refused: instance facts came from IMDSv1"
        return None


class _Outcomes:
    """Stands in for botocore's HTTP session and remembers how the last request ended."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.last: int | BaseException | None = None

    def send(self, request: Any) -> Any:
        self.last = None
        try:
            response = self._session.send(request)
        except BaseException as exc:
            self.last = exc
            raise
        self.last = response.status_code
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _retry_server_errors(response: Any) -> bool:
    """Retry a 5xx answer (IMDS throttles with 503), take anything else as it is."""
    return bool(response.status_code >= 500)


class Imds:
    """One IMDS endpoint. Not thread-safe: one per thread."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        attempts: int = ATTEMPTS,
        env: Mapping[str, str] | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        from botocore.utils import IMDSFetcher

        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self.clock = clock
        self._fetcher = IMDSFetcher(
            timeout=timeout,
            num_attempts=attempts,
            base_url=self.endpoint + "/",
            env=dict(os.environ if env is None else env),
            user_agent=f"gatepeer/{__version__}",
        )
        self._outcomes = _Outcomes(self._fetcher._session)
        self._fetcher._session = self._outcomes
        self._token: str | None = None
        self._token_at = 0.0
        self.version = 2

    # ---- token -------------------------------------------------------------------------

    def token(self) -> str | None:
        """A session token; None when IMDS refused to issue one (requests then go as IMDSv1)."""
        if self._token is not None and self.clock() - self._token_at < TOKEN_REUSE_S:
            return self._token
        from botocore.exceptions import BotoCoreError
        from botocore.utils import BadIMDSRequestError, _RetriesExceededError

        url = f"{self.endpoint}/latest/api/token"
        try:
            token = self._fetcher._fetch_metadata_token()
        except _RetriesExceededError:  # what botocore raises when IMDS is switched off
            raise ImdsError(
                "disabled", "IMDS lookups are switched off (AWS_EC2_METADATA_DISABLED=true)"
            ) from None
        except BadIMDSRequestError:
            raise ImdsError("refused", f"IMDS at {url}: HTTP 400 to the token request") from None
        except BotoCoreError as exc:
            raise ImdsError("unreachable", f"IMDS at {url}: {exc}") from None
        if token:
            self._token, self._token_at, self.version = token, self.clock(), 2
            return token
        last = self._outcomes.last
        if isinstance(last, int) and last in TOKEN_REFUSED_STATUS:
            if self.version == 2:
                log.warning(
                    "IMDS at %s refused an IMDSv2 token (HTTP %d): falling back to IMDSv1",
                    url,
                    last,
                )
            self.version = 1
            return None
        raise self._failure(url, last, token_request=True)

    def _failure(
        self, url: str, last: int | BaseException | None, *, token_request: bool = False
    ) -> ImdsError:
        from botocore.exceptions import ReadTimeoutError

        if isinstance(last, ReadTimeoutError):
            hint = (
                "; in a container, set the instance's metadata hop limit to 2 "
                "(HttpPutResponseHopLimit), or the token's answer never arrives"
                if token_request
                else ""
            )
            return ImdsError("timeout", f"IMDS at {url}: no answer within {self.timeout:g}s{hint}")
        if isinstance(last, BaseException):
            return ImdsError("unreachable", f"IMDS at {url} unreachable: {last}")
        if isinstance(last, int):
            return ImdsError("http", f"IMDS at {url} answered HTTP {last}")
        return ImdsError("unreachable", f"IMDS at {url}: no answer")

    # ---- metadata ----------------------------------------------------------------------

    def get(self, path: str) -> str | None:
        """The text at latest/meta-data/PATH; None when IMDS has no such item (HTTP 404)."""
        from botocore.utils import _RetriesExceededError

        url_path = f"latest/meta-data/{path}"
        url = f"{self.endpoint}/{url_path}"
        for _ in range(2):  # a second time with a fresh token when it expired (401)
            token = self.token()
            try:
                response = self._fetcher._get_request(url_path, _retry_server_errors, token)
            except _RetriesExceededError:
                raise self._failure(url, self._outcomes.last) from None
            if response.status_code == 200:
                return str(response.text).strip()
            if response.status_code == 404:
                return None
            if response.status_code == 401 and token is not None:
                self._token = None
                continue
            if response.status_code == 401:
                raise ImdsError(
                    "refused",
                    f"IMDS at {url} requires IMDSv2 (HTTP 401) but refused to issue a token",
                )
            raise ImdsError("http", f"IMDS at {url} answered HTTP {response.status_code}")
        raise ImdsError("refused", f"IMDS at {url} refused a fresh token (HTTP 401)")

    def require(self, path: str) -> str:
        value = self.get(path)
        if not value:
            raise ImdsError("missing", f"IMDS at {self.endpoint} has no {path}")
        return value

    def instance_facts(self) -> InstanceFacts:
        """The instance and its primary ENI: id, region, AZ, MAC, address, subnet."""
        instance_id = self.require("instance-id")
        zone = self.require("placement/availability-zone")
        # placement/region exists since 2020; the zone minus its letter is the same region.
        region = self.get("placement/region") or zone.rstrip("abcdefghijklmnopqrstuvwxyz")
        mac = self.require("mac").lower()
        eni = f"network/interfaces/macs/{mac}"
        address = self.require(f"{eni}/local-ipv4s").split()[0]
        cidr = self.require(f"{eni}/subnet-ipv4-cidr-block")
        try:
            private = IPv4Address(address)
            subnet_cidr = IPv4Network(cidr)
        except ValueError:
            raise ImdsError(
                "http", f"IMDS at {self.endpoint}: unusable address {address!r} or subnet {cidr!r}"
            ) from None
        return InstanceFacts(
            instance_id=instance_id,
            region=region,
            availability_zone=zone,
            mac=mac,
            eni_id=self.require(f"{eni}/interface-id"),
            private_ipv4=private,
            subnet_id=self.require(f"{eni}/subnet-id"),
            subnet_cidr=subnet_cidr,
            vpc_id=self.require(f"{eni}/vpc-id"),
            imds_version=self.version,
            vpc_cidrs=self._vpc_cidrs(f"{eni}/vpc-ipv4-cidr-blocks"),
        )

    def _vpc_cidrs(self, path: str) -> tuple[IPv4Network, ...]:
        """The VPC's IPv4 CIDR blocks, one a line; () when IMDS has none or an unusable one
        (the underlay's prefix then stands in)."""
        try:
            return tuple(IPv4Network(line) for line in (self.get(path) or "").split())
        except ValueError:
            log.warning("IMDS at %s: unusable %s; not using it", self.endpoint, path)
            return ()

    def target_lifecycle_state(self) -> str | None:
        """Auto Scaling's target state for this instance ("InService", "Terminated", ...);
        None when the instance is not in an Auto Scaling group."""
        return self.get("autoscaling/target-lifecycle-state")
