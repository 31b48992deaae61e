"""The simulated engine's limits and policies, as vLLM names them where vLLM has them."""

from __future__ import annotations

from typing import Literal

import msgspec
import numpy as np


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Engine limits, as vLLM names them."""

    num_gpu_blocks: int  # KV capacity in blocks
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 256  # running requests at most
    max_num_batched_tokens: int = 8192  # tokens scheduled per step at most
    watermark: float = 0.01  # fraction of blocks kept free when admitting a request
    enable_prefix_caching: bool = True
    max_model_len: int = 131072  # prompt + output tokens at most
    recent_waiting_s: float = 10.0  # window of `recent_waiting_requests`, seconds
    enable_profiling: bool = False  # LLUMNIX_ENABLE_PROFILING: export step-time samples
    profiling_steps: int = 50  # LLUMNIX_PROFILING_STEPS: samples exported at most
    # Token budget per step: vLLM's fixed `max_num_batched_tokens`, or NexusSched's LENS
    # (engine/lens.py), which aims each step at a latency rising from `lens_min_step_ms` (idle)
    # to `lens_target_step_ms` (the TPOT SLO) as the waiting queue grows to
    # `lens_queue_threshold`, in chunks of at most `lens_max_chunk` tokens; a waiting request
    # starts with at least `lens_min_start_tokens` (the paper's 15 ms, 50 ms, 5, 512, 16)
    batching: Literal["vllm", "lens"] = "vllm"
    lens_min_step_ms: float = 15.0
    lens_target_step_ms: float = 50.0
    lens_queue_threshold: int = 5
    lens_max_chunk: int = 512
    lens_min_start_tokens: int = 16
    queue_policy: Literal["fcfs", "spf"] = "fcfs"  # waiting order: arrival, or shortest
    # predicted output first; each second of waiting counts as this many tokens shorter
    aging_tokens_per_s: float = 100.0
    # The first step after the engine idled for s seconds starts this many ms late: pairs
    # (s, ms), ascending in s, interpolated, flat past the last (a CPU engine's processes
    # fall asleep: bench/vllm_fidelity.py measures it). Empty: steps start at once.
    idle_wakeup_ms: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.num_gpu_blocks < 1 or self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError("num_gpu_blocks, block_size and max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every decode runs)")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError("watermark must be in [0, 1)")
        if self.aging_tokens_per_s < 0:
            raise ValueError("aging_tokens_per_s must be >= 0")
        lens_ok = 0 < self.lens_min_step_ms <= self.lens_target_step_ms
        if not lens_ok or self.lens_queue_threshold < 1:
            raise ValueError("LENS needs 0 < min step <= target step and a queue threshold >= 1")
        if self.lens_max_chunk < 1 or not 1 <= self.lens_min_start_tokens <= self.lens_max_chunk:
            raise ValueError("LENS needs 1 <= lens_min_start_tokens <= lens_max_chunk")
        idle = [s for s, _ in self.idle_wakeup_ms]
        if idle != sorted(set(idle)) or any(s < 0 or ms < 0 for s, ms in self.idle_wakeup_ms):
            raise ValueError("idle_wakeup_ms needs (seconds, ms) pairs, >= 0, seconds ascending")

    def wakeup_s(self, idle_s: float) -> float:
        """How late the first step after `idle_s` idle seconds starts, seconds."""
        table = self.idle_wakeup_ms
        if not table or idle_s <= 0:
            return 0.0
        xs, ys = zip(*table, strict=True)
        return float(np.interp(idle_s, xs, ys)) / 1000.0
