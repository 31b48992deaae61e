"""LENS, NexusSched's engine-side batching (papers.md §1.3), as chunk sizing for one step.

The paper's Algorithm 1 ("Latency-Guided Unified Scheduling") aims every step at a latency
target that ramps with the waiting queue `Q`:

    target = min_step + (slo_tpot - min_step) / queue_threshold * Q,  clamped to [min_step, slo]

(15 ms idle, 50 ms at >= 5 waiting), so steps stay short (fast decodes) when nothing waits and
grow (more prefill throughput) under backlog. It then fills the step greedily, decodes first
(one token each, always), running prefills with the fewest remaining tokens next (here: in
admission order, which the engine's preemption relies on), then waiting requests FIFO, each
chunk at most 512 tokens and a waiting request started only with >= 16 tokens, keeping the
batch whose predicted time is closest to the target.

Here the engine prices a step with its own (exact) step-time model, where the paper learns one
online, so "closest to the target" becomes "the most prefill that keeps the predicted step at or
under the target": each chunk is the largest that fits (bisection: the model grows with a
chunk's tokens and with its attention pairs). Two guards keep the engine live where the paper's
search could return an empty prefill: decodes run even when they alone exceed the target, and the
step's first prefill chunk gets at least `min_start_tokens` (so a backlog always drains).
"""

from __future__ import annotations

from prescient.engine.step_time import StepTimeModel


def lens_target_s(num_waiting: int, min_step_ms: float, target_step_ms: float,
                  queue_threshold: int) -> float:
    """The step-latency target in seconds for `num_waiting` queued requests."""
    fill = min(1.0, max(0, num_waiting) / queue_threshold)
    return (min_step_ms + (target_step_ms - min_step_ms) * fill) / 1000.0


class LensStep:
    """Sizes the prefill chunks of one step so its predicted duration stays under `target_s`.

    `size` says how many of `wanted` tokens a chunk may take; `take` records a chunk the engine
    scheduled. Chunks are priced as the engine prices them: tokens plus causal attention pairs
    `n * (num_computed + n / 2)`, on top of the step's decodes.
    """

    def __init__(self, model: StepTimeModel, target_s: float, *, num_decodes: int,
                 decode_kv_tokens: int, max_chunk: int, min_start_tokens: int) -> None:
        self.model = model
        self.target_s = target_s
        self.num_decodes = num_decodes
        self.decode_kv_tokens = decode_kv_tokens
        self.max_chunk = max_chunk
        self.min_start_tokens = min_start_tokens
        self.tokens = 0  # prefill tokens taken so far
        self.pairs = 0.0  # their attention pairs

    def predicted_s(self, num_computed: int, n: int) -> float:
        """The step's duration with one more chunk of `n` tokens after `num_computed`."""
        pairs = self.pairs + n * (num_computed + n / 2)
        return self.model.step_time(self.tokens + n, pairs, self.num_decodes,
                                    self.decode_kv_tokens)

    def size(self, num_computed: int, wanted: int, *, starting: bool) -> int:
        """Tokens (0 .. min(wanted, max_chunk)) the next chunk may take.

        `starting`: a waiting request, which starts only with at least `min_start_tokens` (or
        its whole remainder, when shorter), as the paper's admission rule.
        """
        cap = min(wanted, self.max_chunk)
        if cap <= 0:
            return 0
        lo, hi = 0, cap  # invariant: lo fits (or is 0), anything above hi does not
        if self.predicted_s(num_computed, cap) <= self.target_s:
            lo = cap
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self.predicted_s(num_computed, mid) <= self.target_s:
                    lo = mid
                else:
                    hi = mid
        floor = min(cap, self.min_start_tokens)
        if self.tokens == 0 and lo < floor:
            return floor  # liveness: every step moves some prefill forward
        if starting and lo < floor:
            return 0
        return lo

    def take(self, num_computed: int, n: int) -> None:
        self.tokens += n
        self.pairs += n * (num_computed + n / 2)
