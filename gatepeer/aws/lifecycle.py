"""Auto Scaling lifecycle actions: the calls, and the pure decision of when to make them.

Launch: the instance waits in Pending:Wait until gatepeer says CONTINUE (after the first
healthy reconcile) or ABANDON (no healthy reconcile before the deadline; Auto Scaling then
replaces the instance). Heartbeats keep the hook open while the deadline is still ahead.
Termination: Auto Scaling waits in Terminating:Wait while gatepeer unregisters, then CONTINUE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from gatepeer.aws import AwsError
from gatepeer.aws.clients import error_code, error_message, http_status, transport_errors

log = logging.getLogger(__name__)

Result = Literal["CONTINUE", "ABANDON"]
# The hook's heartbeat timeout must be longer (Auto Scaling's default is 3600 s).
HEARTBEAT_INTERVAL_S = 60.0


class LifecycleError(AwsError):
    def __init__(self, action: str, hook: str, reason: str) -> None:
        super().__init__(f"autoscaling:{action} for lifecycle hook {hook}: {reason}")
        self.action = action


@dataclass(frozen=True)
class Hook:
    group: str
    name: str
    instance_id: str


def _call(action: str, hook: Hook, fn: Any, **kwargs: Any) -> bool:
    """True when done; False when Auto Scaling has no action waiting for this instance
    (already completed, timed out, or the instance was never held by this hook)."""
    from botocore.exceptions import ClientError

    try:
        fn(
            AutoScalingGroupName=hook.group,
            LifecycleHookName=hook.name,
            InstanceId=hook.instance_id,
            **kwargs,
        )
    except ClientError as exc:
        code, message = error_code(exc), error_message(exc)
        if code == "ValidationError" and "No active Lifecycle Action" in message:
            return False
        if code in ("AccessDenied", "AccessDeniedException") or http_status(exc) == 403:
            message = f"access denied; the instance role needs autoscaling:{action}"
        raise LifecycleError(action, hook.name, message) from None
    except transport_errors() as exc:
        raise LifecycleError(action, hook.name, error_message(exc)) from None
    return True


def complete(autoscaling: Any, hook: Hook, result: Result) -> bool:
    done = _call(
        "CompleteLifecycleAction",
        hook,
        autoscaling.complete_lifecycle_action,
        LifecycleActionResult=result,
    )
    if done:
        log.info("lifecycle hook %s: %s for %s", hook.name, result, hook.instance_id)
    else:
        log.info("lifecycle hook %s: no action waits for %s", hook.name, hook.instance_id)
    return done


def heartbeat(autoscaling: Any, hook: Hook) -> bool:
    return _call(
        "RecordLifecycleActionHeartbeat", hook, autoscaling.record_lifecycle_action_heartbeat
    )


Step = Literal["continue", "abandon", "heartbeat", "wait", "done"]


@dataclass
class LaunchGate:
    """When to complete the launch action. Pure: the caller passes the time and the outcome."""

    deadline_at: float
    last_heartbeat_at: float
    finished: Result | None = None

    def step(self, now: float, healthy: bool) -> Step:
        if self.finished is not None:
            return "done"
        if healthy:
            return "continue"
        if now >= self.deadline_at:
            return "abandon"
        if now - self.last_heartbeat_at >= HEARTBEAT_INTERVAL_S:
            return "heartbeat"
        return "wait"

    def next_due(self, now: float) -> float | None:
        """Seconds until step() may say something new without a reconcile; None when done."""
        if self.finished is not None:
            return None
        return max(
            0.0,
            min(self.deadline_at, self.last_heartbeat_at + HEARTBEAT_INTERVAL_S) - now,
        )
