"""Output-length predictors with controllable quality, for scheduling with predicted job sizes.

The simulator knows every request's true output length; a real router does not. These
predictors sit where a router would (they see the request, and learn from finished ones) and
let experiments dial the prediction quality (papers.md §2: queueing with predictions):

- `oracle`: the true length (the best any predictor could do).
- `lognormal:sigma=S`: the true length times `exp(N(0, S^2))`, a multiplicative error whose
  size is `S` (0.5 is roughly what learned predictors reach, rank correlation ~0.6).
- `histogram`: learned online, the median output of recent finished requests whose prompt
  falls in the same power-of-two length bucket (the global median before a bucket has data,
  `prior` before anything finished). Needs no oracle: deployable as is.

Predictions are whole tokens >= 1. Randomness comes from a seeded `random.Random`.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from typing import Protocol

from prescient.errors import ConfigError
from prescient.model import Request


class OutputLengthPredictor(Protocol):
    """Predicts a request's output tokens; `observe` reports what one actually produced."""

    def predict(self, request: Request) -> int: ...

    def observe(self, request: Request, output_len: int) -> None: ...


class OracleOutputLength:
    """The true output length."""

    def predict(self, request: Request) -> int:
        return request.output_len

    def observe(self, request: Request, output_len: int) -> None:
        """Nothing to learn."""


class NoisyOutputLength:
    """The true length times a log-normal error of spread `sigma`."""

    def __init__(self, sigma: float, rng: random.Random) -> None:
        if sigma < 0:
            raise ConfigError(f"output-length predictor sigma must be >= 0, got {sigma}")
        self.sigma = sigma
        self.rng = rng

    def predict(self, request: Request) -> int:
        return max(1, round(request.output_len * math.exp(self.rng.gauss(0.0, self.sigma))))

    def observe(self, request: Request, output_len: int) -> None:
        """Nothing to learn: the error is set, not learned."""


class HistogramOutputLength:
    """Median of recent outputs in the prompt's power-of-two length bucket, learned online."""

    def __init__(self, prior: int = 128, window: int = 256) -> None:
        self.prior = prior
        self.window = window
        self._buckets: dict[int, deque[int]] = {}
        self._all: deque[int] = deque(maxlen=window)

    def predict(self, request: Request) -> int:
        recent = self._buckets.get(self._bucket(request))
        if recent:
            return max(1, round(statistics.median(recent)))
        return max(1, round(statistics.median(self._all))) if self._all else self.prior

    def observe(self, request: Request, output_len: int) -> None:
        bucket = self._buckets.setdefault(self._bucket(request), deque(maxlen=self.window))
        bucket.append(output_len)
        self._all.append(output_len)

    @staticmethod
    def _bucket(request: Request) -> int:
        return request.prompt_len.bit_length()


def make_output_predictor(spec: str, rng: random.Random) -> OutputLengthPredictor | None:
    """`none`, `oracle`, `lognormal:sigma=S` or `histogram`; a bad spec names the forms."""
    kind, _, rest = spec.partition(":")
    if kind == "none" and not rest:
        return None
    if kind == "oracle" and not rest:
        return OracleOutputLength()
    if kind == "histogram" and not rest:
        return HistogramOutputLength()
    if kind == "lognormal" and rest.startswith("sigma="):
        try:
            return NoisyOutputLength(float(rest.removeprefix("sigma=")), rng)
        except ValueError:
            pass
    raise ConfigError(f"bad output-length predictor {spec!r}; "
                      "use none, oracle, lognormal:sigma=S or histogram")
