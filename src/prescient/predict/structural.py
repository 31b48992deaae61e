"""NexusSched's "structurally-informed" step-time model (papers.md §1.2).

The model predicts the duration of one engine step from two features:

- `B`: requests scheduled in the step (prefill chunks + decodes), a count;
- `S`: tokens scheduled in the step (prefill-chunk tokens + 1 per decode), tokens.

It has six parameters and two equations:

    Thr(B, S) = P_max · (1 − exp(−k_B·B)) · (1 − exp(−k_S·S))     effective throughput, tokens/ms
    T(B, S)   = w1 · S / Thr(B, S) + τ_B·B + τ_S·S                 step duration, ms

with `P_max` in tokens/ms (peak throughput), `k_B` in 1/request and `k_S` in 1/token (how fast
small batches saturate the GPU), `w1` dimensionless, `τ_B` in ms/request (per-sequence cost:
sampling, metadata, decode KV reads) and `τ_S` in ms/token (per-token cost beyond the saturating
term). `w1` and `P_max` only ever appear as the ratio `w = w1 / P_max` (ms/token), so the data
determine `w`, not the two separately; we fix `P_max` as upstream's stage 1 does (the 95th
percentile of `S / T` over the samples with both `B` and `S` at or above their medians) and
report `w1 = w · P_max`. Predictions depend on `w` only. As `S → 0`, `S / (1 − exp(−k_S·S))` tends
to `1 / k_S`, so the model's fixed per-step cost is `w / (k_S · (1 − exp(−k_B·B))) + τ_B·B` ms.

Fitting (`fit()`), deterministic and numpy-only (upstream uses scipy's `curve_fit`):

1. `P_max` as above (reporting only).
2. For fixed `(k_B, k_S)` the model is linear in `θ = (w, τ_B, τ_S)`. We minimise the sum of
   squared *relative* errors `Σ ((T̂ − T) / T)²` (so short decode steps count as much as long
   prefill steps) subject to `w > 0, τ_B ≥ 0, τ_S ≥ 0` (exact non-negative least squares by
   enumerating the faces that keep `w`), for every `(k_B, k_S)` of a grid spaced 0.2 decades
   apart in log from `0.01 / median` to `max(100 / median, 10)` of each feature (21 × 21 points
   or more); all grid points are solved at once through their 3 × 3 normal equations.
3. Four more 11 × 11 log grids, each spanning the previous best point's grid neighbours (so
   the step shrinks 5x each time, to 3e-4 decades), refine `(k_B, k_S)`; `θ` is the exact solve
   at the final point (upstream's stage 3: structural terms fixed, linear terms refitted).

The structural fit needs `num_warmup_samples` samples (upstream: 20). With fewer samples, or
when its coefficient of determination `R²` on the kept samples is below `min_r2` (upstream 0.8),
the model uses the **linear fallback** `T = c + m·S` (c in ms, m in ms/token), a least-squares
fit of the kept samples with `c, m >= 0`; before any fit it is upstream's H100 default
`T = 8.7 ms + 0.0215 ms/token · S`.

Online adaptation (`maybe_refit()`, upstream's `partial_fit`): after each fit the relative error
`|T̂ − T| / T` of every new sample is recorded; once `refit_window` errors (upstream 64) are
recorded and their mean (the recent MAPE) exceeds `mape_threshold` (upstream 0.15), the linear
terms `θ` (or `c, m` for the fallback) are refitted with `k_B, k_S` fixed, and when the MAPE is
still above the threshold every term is refitted. Beyond upstream: the refit uses only the
window's samples from the first whose error is above the threshold (at least
`num_warmup_samples`; older samples are dropped), so a sudden slowdown is learnt from the new
regime alone; a bounded sample buffer (`max_samples`, upstream 1000); and `reset()`.

`as_quadratic()` adapts the model to the predictor-enhanced prefill replay
(`predict_computed_prefill_tokens`), which prices a step by its prefill tokens alone with
`a·x² + b·x + c`; `StructuralBank` is a drop-in for `PredictorBank` built on it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import ArrayLike

from prescient.predict.bank import ModelBank, ProfilingSampleLike

DEFAULT_NUM_WARMUP_SAMPLES = 20  # upstream: at least 20 samples before the structural fit
DEFAULT_MAX_SAMPLES = 1000  # upstream buffer size
DEFAULT_REFIT_WINDOW = 64  # upstream min_samples_for_update (from_env)
DEFAULT_MAPE_THRESHOLD = 0.15  # upstream: refit when the recent MAPE exceeds this
DEFAULT_MIN_R2 = 0.8  # upstream: linear fallback below this R²
DEFAULT_LINEAR_C_MS = 8.7  # upstream H100 fallback intercept, ms
DEFAULT_LINEAR_M_MS_PER_TOKEN = 0.0215  # upstream H100 fallback slope, ms/token
P_MAX_PERCENTILE = 95.0

_POINTS_PER_DECADE = 5  # coarse grid density (step 0.2 decades)
_FINE_POINTS = 11  # per axis, between the best point's neighbours
_ZOOMS = 4  # refinements: each shrinks the grid step 5x (0.2 decades -> 3e-4)
_LOG_SPAN = 2.0
_RIDGE = 1e-12  # relative ridge on the normal equations (keeps collinear grid points solvable)
_LAWSON_ROUNDS = 30  # as_quadratic's minimax iterations
_SUBSETS = ((0,), (0, 1), (0, 2), (0, 1, 2))  # NNLS faces that keep w (> 0)


class StepModelMode(StrEnum):
    """What produces the predictions."""

    DEFAULT = "default"  # no fit yet: upstream's H100 line
    LINEAR = "linear"  # fitted linear fallback T = c + m·S
    STRUCTURAL = "structural"  # the six-parameter model


class RefitKind(StrEnum):
    """What `maybe_refit()` did."""

    NONE = "none"
    INITIAL = "initial"  # first fit after warm-up
    LINEAR = "linear"  # MAPE gate: linear terms refitted, which was enough
    FULL = "full"  # MAPE gate: linear terms were not enough, every term refitted


@dataclass(frozen=True, slots=True)
class StructuralParams:
    """The six parameters; units in the module docstring."""

    p_max: float  # tokens/ms
    k_b: float  # 1/request
    k_s: float  # 1/token
    w1: float  # dimensionless
    tau_b: float  # ms/request
    tau_s: float  # ms/token

    @property
    def w(self) -> float:
        """`w1 / P_max`, ms/token: the only combination of the two the predictions use."""
        return self.w1 / self.p_max

    def predict_many(self, batch_requests: ArrayLike, batch_tokens: ArrayLike) -> np.ndarray:
        """`T(B, S)` in ms, element-wise; `B` is clamped to >= 1 and `S` to >= 0."""
        b = np.maximum(np.asarray(batch_requests, dtype=np.float64), 1.0)
        s = np.maximum(np.asarray(batch_tokens, dtype=np.float64), 0.0)
        return (self.w * _saturating_tokens(s, self.k_s) * _inv_saturation(b, self.k_b)
                + self.tau_b * b + self.tau_s * s)


@dataclass(frozen=True, slots=True)
class LinearParams:
    """The fallback `T = c + m·S`."""

    c: float  # ms
    m: float  # ms/token

    def predict_many(self, batch_tokens: ArrayLike) -> np.ndarray:
        return self.c + self.m * np.asarray(batch_tokens, dtype=np.float64)


def _inv_saturation(b: np.ndarray, k_b: float) -> np.ndarray:
    """`1 / (1 − exp(−k_B·B))`, dimensionless."""
    return 1.0 / -np.expm1(-k_b * b)


def _saturating_tokens(s: np.ndarray, k_s: float) -> np.ndarray:
    """`S / (1 − exp(−k_S·S))` in tokens, with its limit `1 / k_S` at `S = 0`."""
    x = k_s * s
    with np.errstate(divide="ignore", invalid="ignore"):
        out = s / -np.expm1(-x)
    return np.where(x > 0, out, 1.0 / k_s)


def _grid_solve(b: np.ndarray, s: np.ndarray, t: np.ndarray, k_bs: np.ndarray,
                k_ss: np.ndarray) -> tuple[float, int, int, np.ndarray]:
    """Best `(k_B, k_S)` of the grid and its NNLS `θ = (w, τ_B, τ_S)` under relative errors.

    Returns:
        (sum of squared relative errors, index into `k_bs`, index into `k_ss`, θ); the first is
        inf when no grid point admits `w > 0`.
    """
    r = 1.0 / t  # weights: residual r·(T̂ − T) is the relative error
    u = 1.0 / -np.expm1(-np.outer(k_ss, s))  # (nS, n) saturation in S
    v = 1.0 / -np.expm1(-np.outer(k_bs, b))  # (nB, n) saturation in B
    sr, br = s * r, b * r
    # Normal equations of the weighted design [S·U·V, B, S] (columns times r), target r·T = 1.
    gram = np.empty((len(k_ss), len(k_bs), 3, 3))
    gram[..., 0, 0] = (u * u * sr * sr) @ (v * v).T
    gram[..., 0, 1] = gram[..., 1, 0] = (u * sr * br) @ v.T
    gram[..., 0, 2] = gram[..., 2, 0] = (u * sr * sr) @ v.T
    gram[..., 1, 1] = br @ br
    gram[..., 1, 2] = gram[..., 2, 1] = br @ sr
    gram[..., 2, 2] = sr @ sr
    rhs = np.empty((len(k_ss), len(k_bs), 3))
    rhs[..., 0] = (u * sr) @ v.T
    rhs[..., 1] = br.sum()
    rhs[..., 2] = sr.sum()
    yy = float(len(t))
    best_sse = np.full(gram.shape[:2], np.inf)
    best_theta = np.zeros(rhs.shape)
    for subset in _SUBSETS:
        idx = np.array(subset)
        g = gram[..., idx[:, None], idx[None, :]]
        diag = np.diagonal(g, axis1=-2, axis2=-1)
        g = g + _RIDGE * np.einsum("...i,ij->...ij", diag, np.eye(len(idx)))
        theta_sub = np.linalg.solve(g, rhs[..., idx][..., None])[..., 0]
        theta = np.zeros(rhs.shape)
        theta[..., idx] = theta_sub
        sse = yy - 2.0 * np.einsum("...i,...i", theta, rhs) + np.einsum(
            "...i,...ij,...j", theta, gram, theta)
        feasible = (theta[..., 0] > 0) & np.all(theta >= 0, axis=-1) & np.isfinite(sse)
        better = feasible & (sse < best_sse)
        best_sse = np.where(better, sse, best_sse)
        best_theta = np.where(better[..., None], theta, best_theta)
    flat = int(np.argmin(best_sse))
    i, j = np.unravel_index(flat, best_sse.shape)
    return float(best_sse[i, j]), int(j), int(i), best_theta[i, j]


def _coarse_grid(feature: np.ndarray) -> np.ndarray:
    """Log grid of `k` (1/unit of the feature): `10^-2 / median` to `max(10^2 / median, 10)`.

    The upper end is at least 10 because the features are >= 1 (B) or mostly so (S): beyond
    `k = 10` the saturation `1 − exp(−k·x)` is 1 for every sample, so larger `k` fit the same.
    """
    median = max(float(np.median(feature)), 1.0)
    lo = math.log10(10.0 ** -_LOG_SPAN / median)
    hi = max(math.log10(10.0 ** _LOG_SPAN / median), 1.0)
    return 10.0 ** np.linspace(lo, hi, round((hi - lo) * _POINTS_PER_DECADE) + 1)


def fit_structural(batch_requests: ArrayLike, batch_tokens: ArrayLike, duration_ms: ArrayLike,
                   *, k_b: float | None = None, k_s: float | None = None
                   ) -> StructuralParams | None:
    """Fit the six parameters (stages in the module docstring); None when no fit has `w > 0`.

    Args:
        batch_requests, batch_tokens, duration_ms: the samples `(B, S, T ms)`; B >= 1, T > 0.
        k_b, k_s: when both are given, only the linear terms are fitted with these fixed.
    """
    b = np.maximum(np.asarray(batch_requests, dtype=np.float64), 1.0)
    s = np.maximum(np.asarray(batch_tokens, dtype=np.float64), 0.0)
    t = np.asarray(duration_ms, dtype=np.float64)
    if t.size == 0:
        return None
    if k_b is not None and k_s is not None:
        sse, _, _, theta = _grid_solve(b, s, t, np.array([k_b]), np.array([k_s]))
    else:
        grid_b, grid_s = _coarse_grid(b), _coarse_grid(s)
        sse, jb, js, theta = _grid_solve(b, s, t, grid_b, grid_s)
        if not math.isfinite(sse):
            return None
        k_b, k_s = float(grid_b[jb]), float(grid_s[js])
        step = 1.0 / _POINTS_PER_DECADE
        for _ in range(_ZOOMS):
            fine = np.linspace(-step, step, _FINE_POINTS)
            fine_b, fine_s = k_b * 10.0 ** fine, k_s * 10.0 ** fine
            sse, jb, js, theta = _grid_solve(b, s, t, fine_b, fine_s)
            k_b, k_s = float(fine_b[jb]), float(fine_s[js])
            step = fine[1] - fine[0]
    if not math.isfinite(sse):
        return None
    big = (b >= np.median(b)) & (s >= np.median(s)) & (s > 0)
    ratio = (s / t)[big] if np.any(big) else s / t
    p_max = float(np.percentile(ratio, P_MAX_PERCENTILE))
    if not p_max > 0:
        p_max = 1.0  # only reporting: predictions use w = w1 / P_max
    w, tau_b, tau_s = (float(x) for x in theta)
    return StructuralParams(p_max=p_max, k_b=k_b, k_s=k_s, w1=w * p_max, tau_b=tau_b,
                            tau_s=tau_s)


def fit_linear(batch_tokens: ArrayLike, duration_ms: ArrayLike) -> LinearParams:
    """Least-squares `T = c + m·S` with `c, m >= 0`; upstream's default line without samples,
    its slope with fewer than two distinct `S`."""
    s = np.asarray(batch_tokens, dtype=np.float64)
    t = np.asarray(duration_ms, dtype=np.float64)
    if t.size == 0:
        return LinearParams(DEFAULT_LINEAR_C_MS, DEFAULT_LINEAR_M_MS_PER_TOKEN)
    if np.unique(s).size < 2:
        m = DEFAULT_LINEAR_M_MS_PER_TOKEN
        return LinearParams(float(np.mean(t - m * s)), m)
    c, m = np.linalg.lstsq(np.column_stack([np.ones_like(s), s]), t, rcond=None)[0]
    if m < 0:  # durations never shrink with more tokens: the best constant
        return LinearParams(float(np.mean(t)), 0.0)
    if c < 0:  # nor is a step ever free: the best line through the origin
        return LinearParams(0.0, float(np.dot(s, t) / np.dot(s, s)))
    return LinearParams(float(c), float(m))


def _r2(t: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination (1 for a perfect fit of constant data)."""
    ss_res = float(np.sum((t - pred) ** 2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    if ss_tot <= 0:
        return 1.0 if ss_res <= 1e-12 * max(float(np.sum(t * t)), 1.0) else 0.0
    return 1.0 - ss_res / ss_tot


class StructuralStepModel:
    """Online `T(B, S)` step-time model with upstream's staged fit, MAPE gate and fallback.

    Life cycle: `add_sample()` per finished step; `maybe_refit()` at the end of each status loop
    (first fit after warm-up, then MAPE-gated refits); `predict()` at any time (upstream's H100
    line before the first fit). `fit()` refits every term on the kept samples now.
    """

    def __init__(self, num_warmup_samples: int = DEFAULT_NUM_WARMUP_SAMPLES, *,
                 max_samples: int = DEFAULT_MAX_SAMPLES,
                 refit_window: int = DEFAULT_REFIT_WINDOW,
                 mape_threshold: float = DEFAULT_MAPE_THRESHOLD,
                 min_r2: float = DEFAULT_MIN_R2,
                 max_sample_ms: float | None = None) -> None:
        """Args:
            num_warmup_samples: samples needed for the structural fit (upstream 20).
            max_samples: newest samples kept (upstream 1000).
            refit_window: recent samples whose MAPE gates a refit (upstream 64).
            mape_threshold: recent MAPE above which the model is refitted (upstream 0.15).
            min_r2: R² below which the linear fallback is used (upstream 0.8).
            max_sample_ms: samples at least this long are ignored (upstream 300 ms; default
                None keeps all, since an A100 step of 8,192 tokens takes ~550 ms).

        Raises:
            ValueError: on a count < 1, `refit_window > max_samples`, or a non-positive
                threshold.
        """
        if min(num_warmup_samples, max_samples, refit_window) < 1:
            raise ValueError("num_warmup_samples, max_samples and refit_window must be >= 1")
        if refit_window > max_samples:
            raise ValueError(f"refit_window ({refit_window}) must be <= max_samples "
                             f"({max_samples})")
        if not mape_threshold > 0 or (max_sample_ms is not None and not max_sample_ms > 0):
            raise ValueError("mape_threshold and max_sample_ms must be > 0")
        self.num_warmup_samples = num_warmup_samples
        self.max_samples = max_samples
        self.refit_window = refit_window
        self.mape_threshold = mape_threshold
        self.min_r2 = min_r2
        self.max_sample_ms = max_sample_ms
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=max_samples)
        self._errors: deque[float] = deque(maxlen=refit_window)
        self._params: StructuralParams | None = None
        self._linear = fit_linear([], [])
        self._mode = StepModelMode.DEFAULT
        self._r2: float | None = None
        self._fitted = False
        self._version = 0  # bumped by every change of the predictions
        self._quad_cache: dict[tuple[int, int], tuple[float, float, float]] = {}

    def __repr__(self) -> str:
        return (f"StructuralStepModel(num_samples={len(self._samples)}, mode={self._mode}, "
                f"params={self._params}, linear={self._linear}, r2={self._r2})")

    # ---- state -----------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    @property
    def mode(self) -> StepModelMode:
        return self._mode

    @property
    def params(self) -> StructuralParams | None:
        """The structural parameters of the last structural fit (kept while in fallback)."""
        return self._params

    @property
    def linear(self) -> LinearParams:
        """The linear fallback's coefficients."""
        return self._linear

    @property
    def r2(self) -> float | None:
        """R² of the last structural fit on its samples; None before one."""
        return self._r2

    @property
    def fitted(self) -> bool:
        """A fit with at least `num_warmup_samples` samples happened (since the last reset)."""
        return self._fitted

    @property
    def version(self) -> int:
        """Changes whenever the predictions may have changed."""
        return self._version

    @property
    def recent_mape(self) -> float | None:
        """Mean relative error of the samples recorded since the last fit (None: none yet)."""
        return sum(self._errors) / len(self._errors) if self._errors else None

    # ---- samples and fits ------------------------------------------------------------------

    def add_sample(self, batch_requests: int, batch_tokens: int, duration_ms: float) -> bool:
        """Record one step: `B` requests, `S` tokens, `duration_ms` ms.

        Returns:
            False when the sample was ignored (at least `max_sample_ms`).

        Raises:
            ValueError: on a non-finite value, `B < 1`, `S < 0` or a non-positive duration.
        """
        values = (batch_requests, batch_tokens, duration_ms)
        if not all(math.isfinite(x) for x in values) or duration_ms <= 0:
            raise ValueError(f"bad step sample {values}")
        if batch_requests < 1 or batch_tokens < 0:
            raise ValueError(f"a step needs B >= 1 and S >= 0, got {values}")
        if self.max_sample_ms is not None and duration_ms >= self.max_sample_ms:
            return False
        self._samples.append((float(batch_requests), float(batch_tokens), float(duration_ms)))
        if self._fitted:
            predicted = self.predict(batch_requests, batch_tokens)
            self._errors.append(abs(predicted - duration_ms) / duration_ms)
        return True

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        data = np.array(self._samples, dtype=np.float64).reshape(-1, 3)
        return data[:, 0], data[:, 1], data[:, 2]

    def _changed(self) -> None:
        self._errors.clear()
        self._version += 1
        self._quad_cache.clear()

    def fit(self) -> StepModelMode:
        """Refit every term on the kept samples; returns the resulting mode."""
        b, s, t = self._arrays()
        self._linear = fit_linear(s, t)
        self._mode = StepModelMode.LINEAR if t.size else StepModelMode.DEFAULT
        if t.size >= self.num_warmup_samples:
            self._fitted = True
            params = fit_structural(b, s, t)
            if params is not None:
                self._params = params
                self._r2 = _r2(t, params.predict_many(b, s))
                if self._r2 >= self.min_r2:
                    self._mode = StepModelMode.STRUCTURAL
        self._changed()
        return self._mode

    def _refit_linear_terms(self) -> None:
        """Refit `θ` with `k_B, k_S` fixed (structural), or `c, m` (fallback), on the samples."""
        b, s, t = self._arrays()
        if self._mode is StepModelMode.STRUCTURAL and self._params is not None:
            params = fit_structural(b, s, t, k_b=self._params.k_b, k_s=self._params.k_s)
            if params is not None:
                self._params = params
                self._r2 = _r2(t, params.predict_many(b, s))
                if self._r2 < self.min_r2:
                    self._mode = StepModelMode.LINEAR
        self._linear = fit_linear(s, t)
        self._changed()

    def _mape(self) -> float:
        b, s, t = self._arrays()
        return float(np.mean(np.abs(self.predict_many(b, s) - t) / t)) if t.size else 0.0

    def maybe_refit(self) -> RefitKind:
        """The first fit once warmed up, or a refit when the recent MAPE is above threshold.

        Gate: `refit_window` errors recorded since the last fit with a mean above
        `mape_threshold`. Then only the window's samples from the first one whose own error is
        above the threshold are kept (at least `num_warmup_samples`), so that after a sudden
        change the refit sees only the new regime; the linear terms are refitted on them, and
        every term when their MAPE is still above the threshold.
        """
        if not self._fitted:
            if len(self._samples) < self.num_warmup_samples:
                return RefitKind.NONE
            self.fit()
            return RefitKind.INITIAL
        if len(self._errors) < self.refit_window:
            return RefitKind.NONE
        if sum(self._errors) / len(self._errors) <= self.mape_threshold:
            return RefitKind.NONE
        errors = list(self._errors)  # aligned with the newest len(errors) samples
        first_bad = next(k for k, e in enumerate(errors) if e > self.mape_threshold)
        keep = max(len(errors) - first_bad, min(self.num_warmup_samples, len(self._samples)))
        recent = list(self._samples)[-keep:]
        self._samples.clear()
        self._samples.extend(recent)
        self._refit_linear_terms()
        if self._mape() <= self.mape_threshold:
            return RefitKind.LINEAR
        self.fit()
        return RefitKind.FULL

    def reset(self) -> None:
        """Drop every sample and fit: back to upstream's default line."""
        self._samples.clear()
        self._params, self._r2, self._fitted = None, None, False
        self._linear = fit_linear([], [])
        self._mode = StepModelMode.DEFAULT
        self._changed()

    # ---- predictions -----------------------------------------------------------------------

    def predict_many(self, batch_requests: ArrayLike, batch_tokens: ArrayLike) -> np.ndarray:
        """Predicted step durations in ms for arrays of `B` (requests) and `S` (tokens)."""
        if self._mode is StepModelMode.STRUCTURAL and self._params is not None:
            return self._params.predict_many(batch_requests, batch_tokens)
        _, s = np.broadcast_arrays(np.asarray(batch_requests, dtype=np.float64),
                                   np.maximum(np.asarray(batch_tokens, dtype=np.float64), 0.0))
        return self._linear.predict_many(s)

    def predict(self, batch_requests: float, batch_tokens: float) -> float:
        """Predicted duration in ms of a step of `B` requests and `S` tokens."""
        return float(self.predict_many(batch_requests, batch_tokens))

    def solve_for_token_budget(self, batch_requests: float, target_ms: float, *,
                               max_tokens: float = 1e7) -> float:
        """The largest `S` (tokens, in [0, max_tokens]) with `T(B, S) <= target_ms`.

        `T` increases with `S` (w > 0 and τ_S >= 0, or m > 0), so this inverts it: 0 when even
        `T(B, 0)` exceeds the target, `max_tokens` when `T(B, max_tokens)` does not. Structural:
        bisection to 1e-6 tokens; linear: `(target − c) / m`. The caller floors it to whole
        tokens.
        """
        if self.predict(batch_requests, 0.0) > target_ms:
            return 0.0
        if self.predict(batch_requests, max_tokens) <= target_ms:
            return float(max_tokens)
        if self._mode is not StepModelMode.STRUCTURAL:
            return min(max((target_ms - self._linear.c) / self._linear.m, 0.0), max_tokens)
        lo, hi = 0.0, 1.0
        while self.predict(batch_requests, hi) <= target_ms:
            lo, hi = hi, hi * 2.0
        while hi - lo > 1e-6 * max(hi, 1.0):
            mid = 0.5 * (lo + hi)
            if self.predict(batch_requests, mid) <= target_ms:
                lo = mid
            else:
                hi = mid
        return lo

    def as_quadratic(self, batch_requests: int, max_tokens: int) -> tuple[float, float, float]:
        """`(a, b, c)` with `a·S² + b·S + c ≈ T(B, S)` ms for `S` in [1, max_tokens] tokens.

        The predictor-enhanced replay prices each step by its prefill tokens alone (upstream's
        samples carry no `B`), and its steps are prefill chunks of up to
        `max_num_batched_tokens`; so `B` is fixed at a typical value (1 + the typical decode
        batch on a mixed instance; 1 when the model is trained on CMS samples, which is what
        `StructuralBank` does). The fit approximately minimises the largest *relative* error over
        96 evenly spaced and 32 log-spaced `S` in [1, max_tokens] (Lawson's iteratively
        reweighted least squares, `_LAWSON_ROUNDS` rounds), so short and long chunks count
        alike. A quadratic cannot follow a sharp knee: over [1, 8192] with the fits of
        bench/step_models.py the largest relative error is at most 1.5% on the analytic presets
        but 6.5-8.7% on `llama3-8b-a100-table` (its fits bend near 1/k_S ~ 100 tokens).
        Cached per model version.
        """
        if max_tokens < 1 or batch_requests < 1:
            raise ValueError("as_quadratic needs batch_requests >= 1 and max_tokens >= 1")
        key = (batch_requests, max_tokens)
        cached = self._quad_cache.get(key)
        if cached is not None:
            return cached
        s = np.unique(np.concatenate([np.linspace(1.0, max_tokens, 96),
                                      np.geomspace(1.0, max_tokens, 32)]))
        t = np.maximum(self.predict_many(np.full_like(s, batch_requests), s), 1e-9)
        x = s / max_tokens  # scaled for conditioning
        design = np.column_stack([x * x, x, np.ones_like(x)]) / t[:, None]  # relative errors
        weights = np.full(s.size, 1.0 / s.size)
        theta = np.zeros(3)
        for _ in range(_LAWSON_ROUNDS):
            root = np.sqrt(weights)
            theta = np.linalg.lstsq(design * root[:, None], root, rcond=None)[0]
            err = np.abs(design @ theta - 1.0)
            if not err.sum() > 0:
                break
            weights = weights * err
            weights /= weights.sum()
        qa, qb, qc = theta
        result = (float(qa) / max_tokens**2, float(qb) / max_tokens, float(qc))
        self._quad_cache[key] = result
        return result


class StructuralBank(ModelBank[StructuralStepModel]):
    """`PredictorBank`'s interface over `StructuralStepModel`s, for the prefill replay.

    Profiling samples from the CMS carry the step's prefill tokens `S` but not its request
    count, so every sample is recorded with `B = 1` (decodes in the same step are invisible,
    as for the quadratic predictor); coefficients are `as_quadratic(1, max_tokens)`. Per
    instance by default, or one shared model (`shared=True`, like upstream's single
    predictor).
    """

    BATCH_REQUESTS = 1  # B of every CMS sample and of the replay's steps

    def __init__(self, num_warmup_samples: int = DEFAULT_NUM_WARMUP_SAMPLES, *,
                 shared: bool = False, max_tokens: int = 8192,
                 max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        """`max_tokens`: the upper end of the quadratic's range (the engines' chunk budget)."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        super().__init__(shared=shared)
        self._kwargs = (num_warmup_samples, max_samples)
        self._max_tokens = max_tokens
        self._new_model()  # validate the arguments now, not at the first sample

    def _new_model(self) -> StructuralStepModel:
        warmup, max_samples = self._kwargs
        return StructuralStepModel(warmup, max_samples=max_samples,
                                   refit_window=min(DEFAULT_REFIT_WINDOW, max_samples))

    def _feed(self, model: StructuralStepModel, sample: ProfilingSampleLike) -> bool:
        model.add_sample(self.BATCH_REQUESTS, sample.num_scheduled_prefill_tokens,
                         sample.step_duration_ms)
        return False  # no drift resets here: see `maybe_refit`

    def _refit(self, model: StructuralStepModel) -> bool:
        return model.maybe_refit() is not RefitKind.NONE

    def _coefficients(self, model: StructuralStepModel) -> tuple[float, float, float]:
        return model.as_quadratic(self.BATCH_REQUESTS, self._max_tokens)
