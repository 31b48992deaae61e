"""Predictor-enhanced scheduling: online step-time models and the prefill forward-simulation.

Profiling samples (prefill tokens of one engine step → its duration in ms) feed a
`QuadraticPredictor` per prefill instance (or upstream's single shared one) held by a
`PredictorBank`. At dispatch, `predict_computed_prefill_tokens` replays each instance's prefill
queue over the time since its last status and returns the tokens it has probably computed,
which the scheduler subtracts from `all_prefills_tokens_num`.

No I/O and no wall clock: elapsed time comes in as milliseconds computed by the caller.
"""

from prescient.predict.bank import ModelBank, ProfilingSampleLike
from prescient.predict.prefill_sim import (
    MAX_PREDICTED_STEP_MS,
    MIN_PREDICTED_STEP_MS,
    predict_computed_prefill_tokens,
)
from prescient.predict.quadratic import (
    LINEAR_MAX_COND,
    QUADRATIC_MAX_COND,
    FitKind,
    PredictorBank,
    PredictorNotFittedError,
    QuadraticPredictor,
    fit_step_time,
)

__all__ = [
    "LINEAR_MAX_COND",
    "MAX_PREDICTED_STEP_MS",
    "MIN_PREDICTED_STEP_MS",
    "QUADRATIC_MAX_COND",
    "FitKind",
    "ModelBank",
    "PredictorBank",
    "PredictorNotFittedError",
    "ProfilingSampleLike",
    "QuadraticPredictor",
    "fit_step_time",
    "predict_computed_prefill_tokens",
]
