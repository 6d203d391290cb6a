"""One refresh of the gate view from the SORACOM API: read, plan the API's changes (open
Gate, register, set the redirection), make them (a dry run only plans them), read the view.

The agent keeps the result: on failure its last good view stays and the error is said; a
refused answer names its field. The daemon runs this in a worker thread, so nothing here
touches the kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from gatepeer import redirection
from gatepeer.api_actions import ApiAction, RegisterGatePeer, SetRedirection
from gatepeer.config import Config
from gatepeer.desired_state import GateView, IPv4Address
from gatepeer.registration import (
    AnswerRefused,
    GateError,
    apply_api_action,
    gate_view,
    plan_registration,
    read_registration,
)
from gatepeer.soracom import SoracomClient, SoracomError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refreshed:
    gate: GateView | None  # None: the API failed or its answer was refused
    error: str | None = None
    refused_field: str | None = None  # the field of a refused answer
    api_actions: tuple[ApiAction, ...] = ()  # a dry run's planned changes (not made)
    placeholder: bool = False  # a dry run before registering: neither kept nor "fetched"
    redirection_checked: bool = False  # False: the redirection's last error stands
    redirection_error: str | None = None  # setRedirectionConfiguration failed


def refresh(
    config: Config, client: SoracomClient, outer: IPv4Address, *, dry_run: bool
) -> Refreshed:
    vpg_id, inner_address = config.soracom.vpg_id, config.tunnel.inner_address
    planned: list[ApiAction] = []
    try:
        reading = read_registration(client, vpg_id)
        actions = plan_registration(
            vpg_id, reading, outer, open_gate=config.soracom.open_gate, inner_address=inner_address
        )
        if dry_run:
            planned += actions
        else:
            for action in actions:
                log.info("apply: %s", action.command())
                reading = apply_api_action(client, action, reading) or reading
        view = gate_view(
            vpg_id, reading, outer, inner_address, placeholder=dry_run and bool(actions)
        )
    except (SoracomError, GateError) as exc:
        log.error("%s", exc)
        field = exc.field if isinstance(exc, AnswerRefused) else None
        return Refreshed(None, str(exc), field, tuple(planned))
    # A dry run before registering knows this peer's inner address only when it is asked for.
    unregistered = dry_run and any(isinstance(a, RegisterGatePeer) for a in actions)
    inner_known = not unregistered or inner_address is not None
    wanted = redirection.wanted_change(config, view)
    if wanted is None or wanted.gateway is None:
        done = Refreshed(view, api_actions=tuple(planned), placeholder=bool(planned))
        return replace(done, redirection_checked=True)
    action = SetRedirection(vpg_id, wanted.gateway if inner_known else None, view.redirection)
    if dry_run:
        planned.append(action)
        return Refreshed(view, api_actions=tuple(planned), placeholder=bool(actions))
    log.info("apply: %s", action.command())
    try:
        apply_api_action(client, action)
    except SoracomError as exc:
        log.error("%s", exc)
        return Refreshed(view, redirection_checked=True, redirection_error=str(exc))
    return Refreshed(replace(view, redirection=wanted), redirection_checked=True)
