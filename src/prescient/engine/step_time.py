"""How long one engine step takes, given what the step computes.

A step runs prefill chunks (new tokens `c` on top of `p` tokens already in the KV cache) and
decodes (one token each, reading context `L`). The analytic default (papers.md §5.3) is

    t_ms = c0                         # weight streaming, launch and CPU overhead
         + c_tok  * scheduled_tokens  # the GEMMs: ~2 * params FLOPs per token
         + c_attn * sum(c * (p + c/2))   # causal attention of prefill chunks (token pairs)
         + c_kv   * sum(L)            # decode attention reads the KV cache
         + c_seq  * num_decodes       # per-sequence sampling and metadata

Every model here is affine in `decode_kv_tokens`. The engine relies on that to skip runs of
identical decode-only steps in closed form (`decode_run`): in such a run step `k` takes
`alpha + beta * k`.
"""

from __future__ import annotations

from typing import Protocol

import msgspec
import numpy as np


class StepTimeModel(Protocol):
    """Step duration in seconds. Must be affine in `decode_kv_tokens`."""

    def step_time(
        self, prefill_tokens: int, attn_pairs: float, num_decodes: int, decode_kv_tokens: int
    ) -> float: ...


class AnalyticStepTime(msgspec.Struct, frozen=True, kw_only=True):
    """The analytic model above; coefficients in milliseconds."""

    c0: float  # ms per step
    c_tok: float  # ms per scheduled token
    c_attn: float  # ms per prefill (query, key) token pair
    c_kv: float  # ms per KV token read by a decode
    c_seq: float = 0.0  # ms per decode sequence

    def step_time(
        self, prefill_tokens: int, attn_pairs: float, num_decodes: int, decode_kv_tokens: int
    ) -> float:
        ms = (
            self.c0
            + self.c_tok * (prefill_tokens + num_decodes)
            + self.c_attn * attn_pairs
            + self.c_kv * decode_kv_tokens
            + self.c_seq * num_decodes
        )
        return ms / 1000.0


class TableStepTime(msgspec.Struct, frozen=True, kw_only=True):
    """Measured non-attention step time by scheduled tokens, plus analytic attention terms.

    `tokens` / `ms` are samples of the whole-model non-attention time (GEMMs, norms, embedding)
    at a given number of scheduled tokens, interpolated linearly and extrapolated from the last
    two samples. Attention is not in the measurements, so it keeps the analytic terms.
    """

    tokens: tuple[int, ...]  # ascending
    ms: tuple[float, ...]
    c_attn: float
    c_kv: float
    c_seq: float = 0.0

    def __post_init__(self) -> None:
        if len(self.tokens) < 2 or len(self.tokens) != len(self.ms):
            raise ValueError("a step-time table needs >= 2 (tokens, ms) samples of equal length")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:], strict=False)):
            raise ValueError("step-time table tokens must be strictly ascending")

    def step_time(
        self, prefill_tokens: int, attn_pairs: float, num_decodes: int, decode_kv_tokens: int
    ) -> float:
        n = prefill_tokens + num_decodes
        tokens, ms = self.tokens, self.ms
        if n > tokens[-1]:
            slope = (ms[-1] - ms[-2]) / (tokens[-1] - tokens[-2])
            base = ms[-1] + slope * (n - tokens[-1])
        else:
            base = float(np.interp(n, tokens, ms))
        attn = self.c_attn * attn_pairs + self.c_kv * decode_kv_tokens
        return (base + attn + self.c_seq * num_decodes) / 1000.0
