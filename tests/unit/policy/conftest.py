"""Hand-built clusters for policy tests."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from prescient.model import InferType, InstanceMetadata, InstanceStatus, Request
from prescient.policy.framework import SchedulingContext
from prescient.policy.state import ClusterState


@dataclass
class Settings:
    """The dispatch flags with the seed documents' defaults."""

    enable_full_mode_scheduling: bool = True
    dispatch_top_k: int = 1
    dispatch_prefill_load_metric: str = "all_prefills_tokens_num"
    dispatch_prefill_load_threshold: float = 2048
    dispatch_decode_load_metric: str = "kv_cache_usage_ratio_projected"
    dispatch_decode_load_threshold: float = 1.0
    dispatch_neutral_load_metric: str = "all_prefills_tokens_num"
    dispatch_neutral_load_threshold: float = 8192
    enable_instance_status_local_account: bool = True
    request_local_account_staleness_seconds: float = 10.0
    failover_domain: str = "instance"
    instance_staleness_seconds: float = 60.0
    enable_predictor_enhanced_scheduling: bool = False
    num_predictor_warmup_samples: int = 20
    max_num_batched_tokens: int = 65536
    step_predictor: str = "quadratic"
    per_instance_predictors: bool = False
    ttft_slo: float = 6000.0
    tpot_slo: float = 50.0
    ttft_slo_dispatch_threshold: float = 1.0
    tpot_slo_dispatch_threshold: float = 1.0
    enable_cache_aware_scheduling: bool = False
    cache_aware_scheduling_min_tokens: int = 1024
    dispatch_prefill_cache_locality_metric: str = "cache_aware_all_prefills_tokens_num"
    cache_index_ttl_s: float = 120.0
    cache_index_max_blocks: int = 1_000_000
    cache_aware_miss_weight: float = 2.0
    cache_aware_backlog_tokens: float = 4096.0
    cache_aware_balance_abs_threshold: float = 64.0
    cache_aware_balance_rel_threshold: float = 1.5


def meta(iid: str, infer_type: InferType = InferType.NEUTRAL, node: str = "0", unit: str = "",
         dp: int = 1) -> InstanceMetadata:
    return InstanceMetadata(instance_id=iid, instance_type=infer_type, node_id=node,
                            unit_id=unit or iid, data_parallel_size=dp)


def status(iid: str, ts_ms: int = 1000, **fields: object) -> InstanceStatus:
    fields.setdefault("num_total_gpu_tokens", 10_000)
    return InstanceStatus(instance_id=iid, timestamp_ms=ts_ms, update_id=ts_ms, **fields)  # type: ignore[arg-type]


def request(prompt: int = 100, rid: str = "r") -> Request:
    return Request(request_id=rid, prompt_len=prompt, output_len=10)


def state_of(*pairs: tuple[InstanceMetadata, InstanceStatus | None]) -> ClusterState:
    state = ClusterState([m for m, _ in pairs])
    for m, st in pairs:
        state.set_status(state.index[m.instance_id], st)
    return state


def ctx_for(state: ClusterState, req: Request | None = None, now: float = 1.0,
            seed: int = 0) -> SchedulingContext:
    return SchedulingContext(req or request(), state, now, random.Random(seed))


@pytest.fixture
def settings() -> Settings:
    return Settings()
