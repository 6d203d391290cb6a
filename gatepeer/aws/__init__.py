"""EC2 and Auto Scaling integration (the optional `gatepeer[aws]` extra).

- `detect`: is this host an EC2 instance? Read from DMI, locally; no network.
- `imds`: instance facts and the Auto Scaling target state through IMDSv2.
- `clients`: boto3 clients with short timeouts; `ssm`, `ec2`, `lifecycle`: the API calls.
- `integration`: what the daemon does with them after a reconcile and on scale-in.

Nothing here makes a network call unless DMI says EC2 or an `[aws]` flag asks for the API.
boto3 and botocore are imported inside the functions that need them, so `gatepeer --help`
and `gatepeer status` never pay for them.
"""

from __future__ import annotations


class AwsError(RuntimeError):
    """An AWS call or IMDS request failed; the message is one line that says what to change."""


class AwsUnavailable(AwsError):
    """boto3 (the gatepeer[aws] extra) is not installed."""


def require_boto3() -> None:
    """Raise AwsUnavailable with the fix when boto3 is missing."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise AwsUnavailable(
            "the [aws] features need boto3: install gatepeer[aws] (pip install 'gatepeer[aws]')"
        ) from None
