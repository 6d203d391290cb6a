"""boto3 clients with short timeouts, for one region and (in tests) one endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gatepeer import __version__
from gatepeer.aws import require_boto3

# Each call is small; a stuck connection must not hold the reconcile loop for boto3's 60 s.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class AwsTarget:
    region: str
    endpoint_url: str | None = None  # None: AWS itself; tests give moto's 127.0.0.1 URL


def client(service: str, target: AwsTarget) -> Any:
    """A boto3 client; credentials come from boto3's usual chain (the instance profile)."""
    require_boto3()
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        user_agent_extra=f"gatepeer/{__version__}",
    )
    return boto3.session.Session().client(
        service, region_name=target.region, endpoint_url=target.endpoint_url, config=config
    )


def transport_errors() -> tuple[type[BaseException], ...]:
    """What a call raises besides ClientError: botocore's own errors, and an answer it could
    not parse (an HTML error page from a proxy or a stand-in: ResponseParserError is not a
    BotoCoreError), which must not escape as a crash."""
    from botocore.exceptions import BotoCoreError
    from botocore.parsers import ResponseParserError

    return (BotoCoreError, ResponseParserError)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError ("AccessDeniedException", ...), else ""."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return 0


def error_message(exc: BaseException) -> str:
    """The error's message alone (ClientError's own text repeats the operation), one line."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        message = str(response.get("Error", {}).get("Message", "")).strip()
        if message:
            return " ".join(message.split())
    return " ".join(str(exc).split())
