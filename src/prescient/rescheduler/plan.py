"""What a rescheduling round decides: migrate some requests from one instance to another.

A `MigrationPlan` is the plain-data order a rescheduling policy hands to whoever executes it (the
simulator's migration driver, or a gRPC `Migrate` call to the source's llumlet upstream): the pair
of instances, which requests to pick on the source (`rule`, `order`, `value`, reference §7.3),
and the policy that asked for it (`trigger`, informational, upstream's `trigger_policy`).
"""

from __future__ import annotations

from typing import Literal

import msgspec

SelectRule = Literal["NUM_REQ", "TOKEN", "RATIO"]
SelectOrder = Literal["LCR", "FCR", "LR", "SR", "FCW", "FCWSR"]
SELECT_RULES: tuple[SelectRule, ...] = ("NUM_REQ", "TOKEN", "RATIO")
SELECT_ORDERS: tuple[SelectOrder, ...] = ("LCR", "FCR", "LR", "SR", "FCW", "FCWSR")
DRAIN = -1  # NUM_REQ value meaning "every request" (upstream's pre-stop migration)


class MigrationPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Migrate requests chosen by (`rule`, `order`, `value`) from `src` to `dst`."""

    src: str  # source instance id
    dst: str  # destination instance id
    rule: SelectRule  # what `value` counts: requests, tokens, or a fraction of the KV cache
    order: SelectOrder  # the order requests are considered in
    value: float  # requests, tokens or KV ratio; DRAIN (-1) with NUM_REQ: all of them
    trigger: str  # the rescheduling policy that planned it

    @property
    def drains(self) -> bool:
        """A pre-stop migration: every eligible request goes."""
        return self.rule == "NUM_REQ" and self.value == DRAIN
