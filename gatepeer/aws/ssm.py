"""The SORACOM auth key from an SSM SecureString, fetched with decryption at each use.

The value lives only in the caller's memory for one authentication: never written to disk,
never logged, never part of an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gatepeer.aws import AwsError
from gatepeer.aws.clients import (
    AwsTarget,
    client,
    error_code,
    error_message,
    http_status,
    transport_errors,
)


class SsmParameterError(OSError):
    """The parameter could not be read; one line naming it. An OSError, because the SORACOM
    client reports an unreadable key as an authentication failure, as it does for a file."""

    def __init__(self, name: str, reason: str) -> None:
        message = f"SSM parameter {name}: {reason}"
        super().__init__(message)
        self.strerror = message
        self.parameter = name


_REASONS = {
    "ParameterNotFound": "not found (create it as a SecureString, or fix "
    "soracom.auth_key_ssm_parameter)",
    "ParameterVersionNotFound": "that version does not exist",
    "AccessDeniedException": "access denied: the instance role needs ssm:GetParameter on it "
    "(and kms:Decrypt on its key)",
    "UnrecognizedClientException": "AWS refused the credentials",
    "InvalidClientTokenId": "AWS refused the credentials",
    "ExpiredTokenException": "the credentials have expired",
    "InvalidKeyId": "its KMS key cannot be used (disabled or not found)",
}


def read_secure_string(ssm: Any, name: str) -> str:
    """The decrypted value of the SecureString `name`; SsmParameterError otherwise."""
    from botocore.exceptions import ClientError

    try:
        answer = ssm.get_parameter(Name=name, WithDecryption=True)
    except ClientError as exc:
        code = error_code(exc)
        if code not in _REASONS and http_status(exc) == 403:
            code = "AccessDeniedException"  # an error body botocore could not parse
        raise SsmParameterError(
            name, _REASONS.get(code) or f"{code}: {error_message(exc)}"
        ) from None
    except transport_errors() as exc:  # no credentials, endpoint unreachable, timeout
        raise SsmParameterError(name, error_message(exc)) from None
    parameter = answer.get("Parameter") or {}
    if parameter.get("Type") != "SecureString":
        raise SsmParameterError(
            name,
            f"is a {parameter.get('Type') or 'parameter'}, not a SecureString: store the "
            "key encrypted",
        )
    value = str(parameter.get("Value") or "").strip()
    if not value:
        raise SsmParameterError(name, "is empty")
    return value


def auth_key_reader(name: str, target: Callable[[], AwsTarget]) -> Callable[[], str]:
    """A reader for SoracomClient: asks SSM each time it is called (the client calls it
    only to authenticate). `target` is resolved at the first call, not before."""
    clients: list[Any] = []

    def read() -> str:
        if not clients:
            try:
                clients.append(client("ssm", target()))
            except (AwsError, ValueError) as exc:  # no boto3, no region: name the parameter
                raise SsmParameterError(name, str(exc)) from None
        return read_secure_string(clients[0], name)

    return read
