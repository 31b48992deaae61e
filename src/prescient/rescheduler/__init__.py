"""The rescheduler: keep scheduling while requests run (Llumnix's migration policies).

Pure, like the dispatch core: rescheduling policies read the dispatcher's `ClusterState` and
return `MigrationPlan`s; request selection and the migration protocol are arithmetic over plain
data. Executing a plan is the caller's job (the simulator's migration driver, a llumlet).
"""

from prescient.rescheduler.migration import MigrationSettings, Stage, copy_time_s, next_stage
from prescient.rescheduler.plan import (
    DRAIN,
    SELECT_ORDERS,
    SELECT_RULES,
    MigrationPlan,
    SelectOrder,
    SelectRule,
)
from prescient.rescheduler.policies import (
    RESCHEDULING_POLICIES,
    Rescheduler,
    ReschedulingPolicy,
    ReschedulingSettings,
    make_rescheduler,
    make_rescheduling_policy,
)
from prescient.rescheduler.selection import Candidate, select

__all__ = [
    "DRAIN",
    "RESCHEDULING_POLICIES",
    "SELECT_ORDERS",
    "SELECT_RULES",
    "Candidate",
    "MigrationPlan",
    "MigrationSettings",
    "Rescheduler",
    "ReschedulingPolicy",
    "ReschedulingSettings",
    "SelectOrder",
    "SelectRule",
    "Stage",
    "copy_time_s",
    "make_rescheduler",
    "make_rescheduling_policy",
    "next_stage",
    "select",
]
