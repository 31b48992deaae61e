"""Instance records as the CMS holds them: `InstanceMetadata` and `InstanceStatus`.

Field names, order and meaning follow upstream Llumnix v1's `cms.proto` (metadata fields 1-20,
status fields 1-40), so that a status written by an upstream llumlet reads the same here. The
comment after each field gives its proto field number and unit. Prescient's own extensions use
field numbers from 1001 on, far above upstream's, and read as 0 ("unknown") from a record that
lacks them (one written by upstream).
"""

from __future__ import annotations

import enum

import msgspec


class InferType(enum.StrEnum):
    """What an instance (or one leg of a request) does: prefill, decode, or both."""

    PREFILL = "prefill"
    DECODE = "decode"
    NEUTRAL = "neutral"


class InstanceMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """Static facts about an instance, registered once and refreshed as a heartbeat."""

    instance_id: str  # 1
    instance_type: InferType = InferType.NEUTRAL  # 2
    backend_type: str = "prescient-sim"  # 3
    ip: str = ""  # 4: gateway-reachable API server address
    ip_kvs: str = ""  # 5: host IP, migration destination and KVS hit mapping
    api_server_port: int = 0  # 6
    llumlet_port: int = 0  # 7
    kvt_port: int = 0  # 8
    node_id: str = "0"  # 9
    data_parallel_size: int = 1  # 10
    tensor_parallel_size: int = 1  # 11
    unit_id: str = ""  # 12: failover / balance unit; the instance id when DP is off
    dp_rank: int = 0  # 13
    ep_rank: int = 0  # 14
    dp_local_rank: int = 0  # 15
    utc_create: float = 0.0  # 16: seconds
    utc_update: float = 0.0  # 17: seconds
    ip_kvt: str = ""  # 18
    block_size: int = 16  # 19: tokens per KV block
    max_num_batched_tokens: int = 0  # 20: the engine's chunk budget per step
    # 1001 (Prescient extension): the engine's `max_num_seqs`, the requests it runs at once
    # (prefilling and decoding); 0: unknown (upstream records)
    max_num_seqs: int = 0


class InstanceStatus(msgspec.Struct, kw_only=True):
    """One load snapshot of an instance, produced by its engine and pushed by its llumlet."""

    instance_id: str  # 1
    schedulable: bool = True  # 2
    timestamp_ms: int = 0  # 3: stamped by the llumlet at push time
    step_id: int = 0  # 4: engine steps completed
    update_id: int = 0  # 5: status updates produced
    recent_waiting_requests: tuple[str, ...] = ()  # 6: waiting ids that arrived recently
    waiting_requests: tuple[str, ...] = ()  # 7: all waiting ids
    hybrid_scheduler_waiting_to_decode_requests_num: int = 0  # 8
    scheduler_waiting_to_decode_requests_num: int = 0  # 9
    num_waiting_requests: int = 0  # 10
    scheduler_running_to_decode_requests_num: int = 0  # 11
    num_running_requests: int = 0  # 12
    num_loading_requests: int = 0  # 13
    num_total_gpu_tokens: int = 0  # 14: KV capacity, tokens
    num_used_gpu_tokens: int = 0  # 15: tokens, whole blocks
    num_uncomputed_tokens_hybrid_scheduler_waiting_prefills: int = 0  # 16
    num_unallocated_tokens_hybrid_scheduler_waiting_decodes: int = 0  # 17
    hybrid_scheduler_waiting_to_decode_tokens_num: int = 0  # 18
    num_uncomputed_tokens_scheduler_waiting_prefills: int = 0  # 19
    scheduler_waiting_to_decode_tokens_num: int = 0  # 20
    num_uncomputed_tokens_scheduler_running_prefills: int = 0  # 21
    num_unallocated_tokens_scheduler_running_prefills: int = 0  # 22
    scheduler_running_to_decode_tokens_num: int = 0  # 23
    num_tokens_loading_requests: int = 0  # 24
    num_uncomputed_tokens_all_waiting_prefills: int = 0  # 25: (16) + (19)
    num_migrate_in_reqs: int = 0  # 26
    num_migrate_out_reqs: int = 0  # 27
    num_available_migrate_in_slots: int = 0  # 28
    num_available_migrate_out_slots: int = 0  # 29
    num_migrate_in_tokens: int = 0  # 30
    num_migrate_out_tokens: int = 0  # 31
    num_available_migrate_in_tokens: int = 0  # 32
    num_available_migrate_out_tokens: int = 0  # 33
    kv_cache_usage_ratio_migrate_in: float = 0.0  # 34
    kv_cache_usage_ratio_migrate_out: float = 0.0  # 35
    available_kv_cache_usage_ratio_migrate_in: float = 0.0  # 36
    available_kv_cache_usage_ratio_migrate_out: float = 0.0  # 37
    profiling_id: int = -1  # 38: -1 means no valid sample
    step_duration: float = 0.0  # 39: milliseconds
    num_scheduled_prefill_tokens: int = 0  # 40: prefill tokens of the sampled step
