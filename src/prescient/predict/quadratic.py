"""Online step-time model: prefill tokens in one engine step → step duration (ms).

Upstream (`pkg/scheduler/predictor/quadratic_predictor.go`) keeps every profiling sample
`(x = num_scheduled_prefill_tokens, y = step_duration_ms)` forever and fits, in order:

1. quadratic least squares `y = a x² + b x + c` (design rows `[x², x, 1]`, thin SVD); the fit is
   rejected when the design's condition number `s_max / s_min` exceeds `QUADRATIC_MAX_COND`
   (1e8) or is not finite;
2. linear `y = b x + c` (rows `[x, 1]`), rejected when the condition number exceeds
   `LINEAR_MAX_COND` (1e12);
3. constant `c = mean(y)` (0 with no samples), which always succeeds.

Like upstream we fit on **raw** token counts, so the condition number carries units: with
samples spread over ~100..8,192 tokens it is already ~1e8, and chunks up to 65,536 tokens make
the quadratic fall back to the linear fit (cond ~1e5). That is upstream's behaviour, kept on
purpose; it also avoids extrapolating a curved fit. Fewer samples than unknowns count as
rank-deficient (cond = inf), and so does a design whose smallest singular value is 0, e.g. all
samples at two distinct `x` (quadratic fails, the linear fit is exact) or at one (constant).

Upstream's known limitation is that stale samples cannot be purged without a restart, so a
service that slows down keeps being predicted at its old speed. We add three things:

- a bounded sample window (`max_samples`, oldest dropped first);
- drift detection (the rule is spelled out on `QuadraticPredictor.add_sample`);
- `reset()`, to drop every sample at run time.

`PredictorBank` holds one predictor per instance (heterogeneous clusters), or upstream's single
shared predictor fed by every prefill instance (`shared=True`).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections import deque
from enum import StrEnum

import numpy as np

from prescient.errors import PrescientError
from prescient.predict.bank import ModelBank, ProfilingSampleLike

QUADRATIC_MAX_COND = 1e8  # upstream: reject the quadratic fit above this condition number
LINEAR_MAX_COND = 1e12  # upstream: reject the linear fit above this condition number
DEFAULT_NUM_WARMUP_SAMPLES = 20  # --num-predictor-warmup-samples
DEFAULT_MAX_SAMPLES = 1000
DEFAULT_DRIFT_WINDOW = 20  # samples
DEFAULT_DRIFT_THRESHOLD = 0.25  # mean relative error


class PredictorNotFittedError(PrescientError):
    """`predict()` or `coefficients` was used before a successful `fit()`."""


class FitKind(StrEnum):
    """Which stage of the fallback chain produced the coefficients."""

    QUADRATIC = "quadratic"
    LINEAR = "linear"
    CONSTANT = "constant"


def _solve(design: np.ndarray, y: np.ndarray, max_cond: float) -> np.ndarray | None:
    """Least squares by thin SVD; None when the design's condition number is above `max_cond`.

    A design with fewer rows than columns, or a zero singular value, counts as cond = inf.
    """
    rows, cols = design.shape
    if rows < cols:
        return None
    u, s, vt = np.linalg.svd(design, full_matrices=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = s[0] / s[-1] if s[-1] > 0 else math.inf
    if not math.isfinite(cond) or cond > max_cond:
        return None
    coef: np.ndarray = vt.T @ ((u.T @ y) / s)
    return coef if bool(np.all(np.isfinite(coef))) else None


def fit_step_time(x: np.ndarray, y: np.ndarray) -> tuple[FitKind, float, float, float]:
    """Fit `y = a x² + b x + c` with upstream's quadratic → linear → constant chain.

    Args:
        x: scheduled prefill tokens per sample.
        y: step duration per sample, in ms.

    Returns:
        (kind, a, b, c); `a = 0` for the linear fit, `a = b = 0` for the constant one.
    """
    ones = np.ones_like(x)
    quad = _solve(np.column_stack([x * x, x, ones]), y, QUADRATIC_MAX_COND)
    if quad is not None:
        return FitKind.QUADRATIC, float(quad[0]), float(quad[1]), float(quad[2])
    lin = _solve(np.column_stack([x, ones]), y, LINEAR_MAX_COND)
    if lin is not None:
        return FitKind.LINEAR, 0.0, float(lin[0]), float(lin[1])
    return FitKind.CONSTANT, 0.0, 0.0, float(y.mean()) if y.size else 0.0


class QuadraticPredictor:
    """Step duration (ms) as a polynomial of the prefill tokens scheduled in the step.

    Life cycle as upstream: `add_sample()` marks the model unfitted; the owner calls
    `maybe_refit()` at the end of each status loop, which fits when `needs_refit` (unfitted
    and at least `num_warmup_samples` samples). `predict()` raises until the first fit and
    after every new sample until the refit.
    """

    __slots__ = ("_coef", "_drift_threshold", "_drift_window", "_errors", "_fitted", "_kind",
                 "_max_samples", "_num_drift_resets", "_num_warmup_samples", "_samples")

    def __init__(self, num_warmup_samples: int = DEFAULT_NUM_WARMUP_SAMPLES, *,
                 max_samples: int = DEFAULT_MAX_SAMPLES,
                 drift_window: int = DEFAULT_DRIFT_WINDOW,
                 drift_threshold: float | None = DEFAULT_DRIFT_THRESHOLD) -> None:
        """Args:
            num_warmup_samples: samples needed before the first fit (upstream default 20).
            max_samples: newest samples kept; older ones are dropped (upstream: unbounded).
            drift_window: samples whose mean relative error is checked for drift.
            drift_threshold: mean relative error that counts as drift; None disables it.

        Raises:
            ValueError: on a non-positive count, `drift_window > max_samples`, or a
                non-positive threshold.
        """
        if num_warmup_samples < 1 or max_samples < 1 or drift_window < 1:
            raise ValueError("num_warmup_samples, max_samples and drift_window must be >= 1")
        if drift_window > max_samples:
            raise ValueError(f"drift_window ({drift_window}) must be <= max_samples "
                             f"({max_samples})")
        if drift_threshold is not None and not drift_threshold > 0:
            raise ValueError(f"drift_threshold must be > 0, got {drift_threshold}")
        self._num_warmup_samples = num_warmup_samples
        self._max_samples = max_samples
        self._drift_window = drift_window
        self._drift_threshold = drift_threshold
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (tokens, ms)
        self._errors: deque[float] = deque(maxlen=drift_window)  # relative errors, newest last
        self._coef: tuple[float, float, float] | None = None  # (a, b, c) of the last fit
        self._kind: FitKind | None = None
        self._fitted = False
        self._num_drift_resets = 0

    def __repr__(self) -> str:
        return (f"QuadraticPredictor(num_samples={len(self._samples)}, fitted={self._fitted}, "
                f"kind={self._kind}, coef={self._coef})")

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    @property
    def samples(self) -> tuple[tuple[float, float], ...]:
        """The kept samples `(tokens, ms)`, oldest first."""
        return tuple(self._samples)

    @property
    def fitted(self) -> bool:
        """True when the coefficients reflect every kept sample."""
        return self._fitted

    @property
    def fit_kind(self) -> FitKind | None:
        """The stage of the last fit; None before the first fit or after a reset."""
        return self._kind

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """`(a, b, c)` of `y_ms = a x² + b x + c`.

        Raises:
            PredictorNotFittedError: when not fitted.
        """
        if not self._fitted or self._coef is None:
            raise PredictorNotFittedError("the step-time predictor is not fitted")
        return self._coef

    @property
    def num_drift_resets(self) -> int:
        """How many times drift detection dropped the older samples."""
        return self._num_drift_resets

    def ready_for_fit(self) -> bool:
        """Upstream `ReadyForFit`: at least `num_warmup_samples` samples are kept."""
        return len(self._samples) >= self._num_warmup_samples

    @property
    def needs_refit(self) -> bool:
        """Unfitted and ready: what upstream's status loop refits at its end."""
        return not self._fitted and self.ready_for_fit()

    def add_sample(self, tokens: float, duration_ms: float) -> bool:
        """Record one step and mark the model unfitted; check for drift.

        Drift rule: while coefficients from an earlier fit exist (the latest fit's are kept
        through the unfitted spell until the next fit), each new sample's relative error
        `|d(tokens) - duration_ms| / duration_ms` against them is appended to a record of the
        last `drift_window` errors (each error against the fit current when its sample came;
        refits do not clear the record). Once that record is full and its mean exceeds
        `drift_threshold`, every sample older than the last `drift_window` is dropped, the error
        record is cleared, and the predictor is refitted at once from the recent samples when
        they are at least `num_warmup_samples` (else it is back in warm-up, with no fit). Errors
        are not recorded before the first fit or after a reset.

        Args:
            tokens: prefill tokens scheduled in the step (> 0 in practice).
            duration_ms: the step's duration in ms (> 0).

        Returns:
            True when this sample triggered a drift reset.

        Raises:
            ValueError: on a non-finite value or a non-positive duration.
        """
        if not (math.isfinite(tokens) and math.isfinite(duration_ms)) or duration_ms <= 0:
            raise ValueError(f"bad profiling sample ({tokens}, {duration_ms} ms)")
        self._samples.append((float(tokens), float(duration_ms)))
        self._fitted = False
        if self._coef is None or self._drift_threshold is None:
            return False
        a, b, c = self._coef
        self._errors.append(abs(a * tokens * tokens + b * tokens + c - duration_ms)
                            / duration_ms)
        if (len(self._errors) < self._drift_window
                or sum(self._errors) / len(self._errors) <= self._drift_threshold):
            return False
        self._drop_stale_samples()
        return True

    def _drop_stale_samples(self) -> None:
        recent = list(self._samples)[-self._drift_window:]
        self._samples.clear()
        self._samples.extend(recent)
        self._errors.clear()
        self._num_drift_resets += 1
        if self.ready_for_fit():
            self.fit()
        else:
            self._coef, self._kind = None, None

    def fit(self) -> FitKind:
        """Fit the kept samples (any number, even none) and mark the model fitted.

        Returns:
            the stage of the fallback chain that succeeded.
        """
        data = np.array(self._samples, dtype=np.float64).reshape(-1, 2)
        kind, a, b, c = fit_step_time(data[:, 0], data[:, 1])
        self._coef, self._kind, self._fitted = (a, b, c), kind, True
        return kind

    def maybe_refit(self) -> bool:
        """Fit when `needs_refit`; True when it did."""
        if not self.needs_refit:
            return False
        self.fit()
        return True

    def predict(self, tokens: float) -> float:
        """Predicted step duration in ms for `tokens` scheduled prefill tokens.

        Raises:
            PredictorNotFittedError: when not fitted.
        """
        a, b, c = self.coefficients
        return a * tokens * tokens + b * tokens + c

    def reset(self) -> None:
        """Drop every sample, the fit and the drift record (e.g. after a service change)."""
        self._samples.clear()
        self._errors.clear()
        self._coef, self._kind, self._fitted = None, None, False


class PredictorBank(ModelBank[QuadraticPredictor]):
    """Step-time predictors of the prefill instances, fed with profiling samples.

    Per-instance mode (default): one `QuadraticPredictor` per instance id, so instances on
    different hardware or models each get their own speed. Shared mode (`shared=True`):
    upstream's single global predictor, fed by every prefill instance and used for all.
    """

    def __init__(self, num_warmup_samples: int = DEFAULT_NUM_WARMUP_SAMPLES, *,
                 shared: bool = False, max_samples: int = DEFAULT_MAX_SAMPLES,
                 drift_window: int = DEFAULT_DRIFT_WINDOW,
                 drift_threshold: float | None = DEFAULT_DRIFT_THRESHOLD) -> None:
        """Args are `QuadraticPredictor`'s, applied to each predictor; `shared` picks the mode.

        Raises:
            ValueError: as `QuadraticPredictor`.
        """
        super().__init__(shared=shared)
        self._kwargs = (num_warmup_samples, max_samples, drift_window, drift_threshold)
        self._new_model()  # validate the arguments now, not at the first sample

    def _new_model(self) -> QuadraticPredictor:
        warmup, max_samples, window, threshold = self._kwargs
        return QuadraticPredictor(warmup, max_samples=max_samples, drift_window=window,
                                  drift_threshold=threshold)

    def _feed(self, model: QuadraticPredictor, sample: ProfilingSampleLike) -> bool:
        return model.add_sample(sample.num_scheduled_prefill_tokens, sample.step_duration_ms)

    def _refit(self, model: QuadraticPredictor) -> bool:
        return model.maybe_refit()

    def _coefficients(self, model: QuadraticPredictor) -> tuple[float, float, float]:
        return model.coefficients
