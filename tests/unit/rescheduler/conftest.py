"""Hand-built cluster views for rescheduling tests."""

from __future__ import annotations

import msgspec

from prescient.config.scheduler import SchedulerSettings
from prescient.model import InferType, InstanceMetadata, InstanceStatus
from prescient.policy.state import ClusterState

TOTAL = 10_000  # KV tokens per instance


def settings(**kw: object) -> SchedulerSettings:
    return msgspec.structs.replace(SchedulerSettings(enable_rescheduling=True), **kw)


def meta(iid: str, infer_type: InferType = InferType.NEUTRAL, node: str = "0", unit: str = "",
         dp: int = 1) -> InstanceMetadata:
    return InstanceMetadata(instance_id=iid, instance_type=infer_type, node_id=node,
                            unit_id=unit or iid, data_parallel_size=dp)


def status(iid: str, used: float = 0.0, ts_ms: int = 1000, **fields: object) -> InstanceStatus:
    """`used`: the KV usage ratio (num_used_gpu_tokens / TOTAL)."""
    return InstanceStatus(instance_id=iid, timestamp_ms=ts_ms, update_id=ts_ms,
                          num_total_gpu_tokens=TOTAL, num_used_gpu_tokens=int(used * TOTAL),
                          **fields)  # type: ignore[arg-type]


def view(*pairs: tuple[InstanceMetadata, InstanceStatus | None]) -> ClusterState:
    state = ClusterState([m for m, _ in pairs])
    for m, st in pairs:
        state.set_status(state.index[m.instance_id], st)
    return state


def usage(*ratios: float, infer_type: InferType = InferType.NEUTRAL) -> ClusterState:
    """Instances i0, i1, ... with these KV usage ratios."""
    return view(*[(meta(f"i{k}", infer_type), status(f"i{k}", r)) for k, r in enumerate(ratios)])
