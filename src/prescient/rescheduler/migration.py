"""Live migration of one request: multi-stage pre-copy, then a short stop-and-copy.

Llumnix's protocol (papers.md §3.3, v0 `migration_coordinator.py`), as pure arithmetic a driver
steps through:

1. Pre-copy stage: copy the KV blocks the request filled since the previous stage (all its full
   blocks at the first), **while it keeps decoding on the source**. The destination first
   reserves the blocks; if it cannot, the migration aborts and the source keeps the request.
2. When the blocks added since the last stage are at most `last_stage_max_blocks` (4), the last
   stage: the destination reserves what is left (the partial block and the at most one token the
   source's step in flight adds), the source **stops** the request, the rest is copied, and the
   request resumes on the destination with its KV and its output so far. Only this stage is
   downtime, and it is about one small copy, whatever the sequence length.
3. A migration that has not reached its last stage within `max_stages` stages aborts; so does
   one whose request finishes, is preempted or aborted on the source meanwhile.

Every stage costs `rpc_latency_ms` plus blocks x block size x KV bytes per token over the link's
bandwidth. Memory is held on both sides while copying: the source keeps every block until the
stop, the destination holds what it reserved.
"""

from __future__ import annotations

import enum

import msgspec

from prescient.rescheduler.selection import DEFAULT_MAX_REQ_MIG


class MigrationSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The migration link and protocol limits."""

    bandwidth_gb_s: float = 25.0  # KV copy bandwidth between instances, GB/s (200 Gb/s RDMA)
    rpc_latency_ms: float = 1.0  # per stage: the handshake and the destination's allocation
    last_stage_max_blocks: int = 4  # stop and copy once a stage would copy at most this many
    max_stages: int = 3  # abort if not converged by then
    max_req_mig_out: int = DEFAULT_MAX_REQ_MIG  # LLUMNIX_MAX_REQ_MIG_OUT: per source
    max_req_mig_in: int = DEFAULT_MAX_REQ_MIG  # LLUMNIX_MAX_REQ_MIG_IN: per destination

    def __post_init__(self) -> None:
        if self.bandwidth_gb_s <= 0:
            raise ValueError("migration bandwidth_gb_s must be > 0")
        if self.rpc_latency_ms < 0:
            raise ValueError("migration rpc_latency_ms must be >= 0")
        if self.last_stage_max_blocks < 0 or self.max_stages < 1:
            raise ValueError("migration needs last_stage_max_blocks >= 0 and max_stages >= 1")
        if self.max_req_mig_out < 1 or self.max_req_mig_in < 1:
            raise ValueError("migration slots (max_req_mig_out / _in) must be >= 1")


class Stage(enum.Enum):
    PRECOPY = "precopy"  # copy while the request decodes on the source
    FINAL = "final"  # stop the request, copy the rest, resume on the destination
    ABORT = "abort"  # did not converge


def next_stage(new_blocks: int, stages_done: int, settings: MigrationSettings) -> Stage:
    """The next stage, given the full blocks not copied yet and the stages already run."""
    if stages_done >= settings.max_stages:
        return Stage.ABORT
    return Stage.FINAL if new_blocks <= settings.last_stage_max_blocks else Stage.PRECOPY


def full_blocks(computed_tokens: int, block_size: int) -> int:
    """Blocks that will not change any more (the one being written is not copied early)."""
    return computed_tokens // block_size


def final_blocks(computed_tokens: int, block_size: int) -> int:
    """Every block the request holds once the source's step in flight has added its token."""
    return -(-(computed_tokens + 1) // block_size)


def copy_time_s(blocks: int, block_size: int, kv_bytes_per_token: int,
                settings: MigrationSettings) -> float:
    """One stage: the handshake, then the blocks over the link."""
    data = blocks * block_size * kv_bytes_per_token
    return settings.rpc_latency_ms / 1000.0 + data / (settings.bandwidth_gb_s * 1e9)
