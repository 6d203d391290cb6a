"""A kernel the agent reconciles against without netlink: it reports what it was told."""

from __future__ import annotations

import dataclasses
from typing import Any

from gatepeer.desired_state import DesiredState, ObservedState
from gatepeer.plan import Action, SetSysctl
from helpers.plan_inputs import FACTS, converged


class FakeKernel:
    """Observes what it was told; conntrack's keys appear once a ruleset has loaded, as on a
    fresh instance where the first `ct state` rule loads nf_conntrack."""

    def __init__(self, desired: DesiredState) -> None:
        self.desired = desired
        self.applied: list[Action] = []
        self.conntrack_loaded = False
        self.sysctls: dict[str, int] = {}

    def host_facts(self, *_: Any) -> Any:
        return FACTS

    def observe(self, name: str, sysctls: Any) -> ObservedState:
        if not self.applied:
            return ObservedState(
                link=None,
                addresses=frozenset(),
                fdb=frozenset(),
                sysctls=tuple(
                    (s.path, None if "netfilter" in s.path else 0) for s in self.desired.sysctls
                ),
            )
        values = []
        for s in self.desired.sysctls:
            if "netfilter" in s.path and not self.conntrack_loaded:
                values.append((s.path, None))
            else:
                values.append((s.path, self.sysctls.get(s.path, s.value)))
        return dataclasses.replace(converged(self.desired), sysctls=tuple(values))

    def apply(self, action: Action) -> None:
        self.applied.append(action)
        if isinstance(action, SetSysctl):
            self.sysctls[action.setting.path] = action.setting.value

    def close(self) -> None:
        pass
