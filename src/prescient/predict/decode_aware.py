"""Step time with the decode batch in it, for the predictor-enhanced prefill replay.

A profiling sample says how long a step took and how many prefill tokens it scheduled, not how
many decodes shared it. Upstream's quadratic (and the structural bank fed `B = 1`) therefore
prices a step by its prefill tokens alone, with the decode load its samples happened to see
folded into the coefficients: an instance with a large decode batch is replayed as if it
computed faster than it does, one with few decodes as slower. At a slow poll that error adds
up over the interval: on the staleness benchmark the replay over-predicted the tokens computed
since a 1000 ms-old status by 19% on average (bench/RESULTS.md), most on the busiest instances,
which then looked caught up and drew more requests.

The statuses carry the decode load, so each sample is paired with the decode requests `D` and
their context tokens `K` of the status it came with (the step just before it), and

    d(x, D, K) = a x² + b x + c + e·D + f·K        ms, x = prefill tokens of the step

is fitted by least squares on a bounded window of such samples. This is the engine's own
structure (papers.md §5.3): decodes cost per sequence and per KV token read, on top of the
prefill chunk. For the replay of one instance, `D` and `K` are those of its status, so the
model reduces to the quadratic `a x² + b x + (c + e·D + f·K)` it already takes.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from prescient.predict.quadratic import QUADRATIC_MAX_COND, _solve

DEFAULT_NUM_WARMUP_SAMPLES = 40  # 5 coefficients: a few samples each before trusting them
DEFAULT_MAX_SAMPLES = 1000


class DecodeAwareStepTime:
    """`d(x, D, K)` above, refitted on demand from the newest `max_samples` samples.

    Args:
        num_warmup_samples: samples needed before the first fit; until then (or while the
            fit is ill-conditioned) `coefficients` is None and the caller keeps its own model.
        max_samples: the window of samples fitted.
    """

    def __init__(self, num_warmup_samples: int = DEFAULT_NUM_WARMUP_SAMPLES,
                 max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        if num_warmup_samples < 1 or max_samples < num_warmup_samples:
            raise ValueError("need 1 <= num_warmup_samples <= max_samples")
        self.num_warmup_samples = num_warmup_samples
        self._samples: deque[tuple[float, float, float, float]] = deque(maxlen=max_samples)
        self._coef: np.ndarray | None = None
        self._stale = False

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    @property
    def coefficients(self) -> tuple[float, float, float, float, float] | None:
        """`(a, b, c, e, f)` of the last fit, or None before a usable one."""
        if self._coef is None:
            return None
        a, b, c, e, f = (float(v) for v in self._coef)
        return a, b, c, e, f

    def add(self, prefill_tokens: float, decode_requests: float, decode_tokens: float,
            step_ms: float) -> None:
        """One step: its prefill tokens, the decode requests and their context tokens beside
        it, and its duration (ms). Non-finite or non-positive durations are ignored."""
        values = (prefill_tokens, decode_requests, decode_tokens, step_ms)
        if step_ms > 0 and all(np.isfinite(v) for v in values):
            self._samples.append((float(prefill_tokens), float(decode_requests),
                                  float(decode_tokens), float(step_ms)))
            self._stale = True

    def refit(self) -> bool:
        """Fit the window if samples came since the last fit; True if it did."""
        if not self._stale or len(self._samples) < self.num_warmup_samples:
            return False
        self._stale = False
        x, d, k, y = np.array(self._samples).T
        # scaled columns keep the conditioning check about the data, not about units
        columns = [x * x, x, np.ones_like(x), d, k]
        scale = np.array([max(float(np.abs(col).max()), 1e-12) for col in columns])
        coef = _solve(np.column_stack(columns) / scale, y, QUADRATIC_MAX_COND)
        self._coef = None if coef is None else coef / scale
        return True

    def predict(self, prefill_tokens: float, decode_requests: float, decode_tokens: float
                ) -> float:
        """Step duration (ms); raises before a usable fit."""
        coef = self.coefficients
        if coef is None:
            raise ValueError("the decode-aware step model has no usable fit yet")
        a, b, c, e, f = coef
        x = prefill_tokens
        return a * x * x + b * x + c + e * decode_requests + f * decode_tokens
