"""NexusSched's structural step-time model and its bank (prescient.predict.structural)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from prescient.cms.view import ProfilingSample
from prescient.config.scheduler import SchedulerSettings
from prescient.policy.registry import make_dispatcher
from prescient.predict.enhanced import PredictorEnhancement
from prescient.predict.prefill_sim import predict_computed_prefill_tokens
from prescient.predict.quadratic import PredictorBank
from prescient.predict.structural import (
    DEFAULT_LINEAR_C_MS,
    DEFAULT_LINEAR_M_MS_PER_TOKEN,
    RefitKind,
    StepModelMode,
    StructuralBank,
    StructuralParams,
    StructuralStepModel,
    fit_structural,
)

# Parameters in the range bench/step_models.py fits on the H100 preset: w = w1 / P_max =
# 0.0066 ms/token, 1/k_S ~ 850 tokens, per-request 0.0665 ms, per-token 0.0165 ms.
H100_LIKE = StructuralParams(p_max=41.2, k_b=4.73, k_s=0.00118, w1=0.272, tau_b=0.0665,
                             tau_s=0.0165)
# A strongly saturating one: small batches are slow (k_B B ~ 0.05 at B = 1).
SATURATING = StructuralParams(p_max=50.0, k_b=0.05, k_s=0.002, w1=1.0, tau_b=0.03, tau_s=0.004)


def steps(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` (B, S) pairs like an engine's: decode-only steps (S = B) and mixed steps, B
    log-uniform in [1, 256]."""
    rng = np.random.default_rng(seed)
    b = np.floor(np.exp(rng.uniform(0, math.log(257), n))).astype(int)
    s = b + rng.integers(0, 8000, n) * (rng.random(n) < 0.5)
    return b, s


def trained(params: StructuralParams, n: int = 400, **kwargs: float) -> StructuralStepModel:
    model = StructuralStepModel(**kwargs)  # type: ignore[arg-type]
    b, s = steps(n)
    for bi, si, ti in zip(b, s, params.predict_many(b, s), strict=True):
        model.add_sample(int(bi), int(si), float(ti))
    model.fit()
    return model


@pytest.mark.parametrize("params", [H100_LIKE, SATURATING], ids=["h100-like", "saturating"])
def test_recovers_noise_free_parameters(params: StructuralParams) -> None:
    model = trained(params)
    assert model.mode is StepModelMode.STRUCTURAL
    fit = model.params
    assert fit is not None
    assert model.r2 is not None and model.r2 > 0.9999
    b, s = steps(500, seed=1)  # fresh points
    rel = np.abs(model.predict_many(b, s) / params.predict_many(b, s) - 1)
    assert rel.max() < 0.02
    if params.k_b < 1:  # above ~5 the saturation in B is 1 at B >= 1: k_B is not identifiable
        assert fit.k_b == pytest.approx(params.k_b, rel=0.05)
    assert fit.k_s == pytest.approx(params.k_s, rel=0.05)
    assert fit.w == pytest.approx(params.w, rel=0.05)
    assert fit.tau_s == pytest.approx(params.tau_s, rel=0.05)


def test_predict_and_predict_many_agree_and_s_zero_is_the_limit() -> None:
    model = trained(SATURATING)
    assert model.predict(10, 500) == pytest.approx(float(model.predict_many([10], [500])[0]))
    p = model.params
    assert p is not None
    floor = p.w / (p.k_s * -math.expm1(-p.k_b * 10)) + p.tau_b * 10
    assert model.predict(10, 0) == pytest.approx(floor)
    assert model.predict(10, 1e-9) == pytest.approx(floor, rel=1e-6)


def test_default_line_before_any_sample_and_linear_fallback_with_few_samples() -> None:
    model = StructuralStepModel()
    assert model.mode is StepModelMode.DEFAULT and not model.fitted
    assert model.predict(1, 1000) == pytest.approx(
        DEFAULT_LINEAR_C_MS + DEFAULT_LINEAR_M_MS_PER_TOKEN * 1000)
    for s in (100, 200, 400, 800, 1600):  # five samples of T = 4 + 0.03 S: below warm-up
        model.add_sample(3, s, 4.0 + 0.03 * s)
    assert model.maybe_refit() is RefitKind.NONE
    assert model.fit() is StepModelMode.LINEAR
    assert not model.fitted and model.params is None
    assert model.linear.c == pytest.approx(4.0)
    assert model.linear.m == pytest.approx(0.03)
    assert model.predict(50, 3000) == pytest.approx(94.0)


def test_linear_fallback_when_r2_is_low() -> None:
    rng = np.random.default_rng(3)
    model = StructuralStepModel()
    for _ in range(200):  # durations unrelated to B and S
        model.add_sample(int(rng.integers(1, 100)), int(rng.integers(1, 4000)),
                         float(rng.uniform(5, 50)))
    assert model.maybe_refit() is RefitKind.INITIAL
    assert model.fitted and model.mode is StepModelMode.LINEAR
    assert model.r2 is not None and model.r2 < 0.8
    assert model.predict(10, 2000) == pytest.approx(model.linear.c + model.linear.m * 2000)


def test_mape_gated_refit_after_a_2x_slowdown() -> None:
    model = StructuralStepModel()
    b, s = steps(600, seed=2)
    true = H100_LIKE.predict_many(b, s)
    kinds = []
    for k in range(200):
        model.add_sample(int(b[k]), int(s[k]), float(true[k]))
        kinds.append(model.maybe_refit())
    assert kinds.count(RefitKind.INITIAL) == 1
    assert set(kinds) == {RefitKind.NONE, RefitKind.INITIAL}  # accurate: no gated refit
    before = model.params
    for k in range(200, 600):  # the GPU gets twice as slow
        model.add_sample(int(b[k]), int(s[k]), 2.0 * float(true[k]))
        kinds.append(model.maybe_refit())
    gated = [k for k in kinds[200:] if k is not RefitKind.NONE]
    assert gated and gated[0] is RefitKind.LINEAR  # 2x is linear in (w, tau_B, tau_S)
    assert model.mode is StepModelMode.STRUCTURAL
    assert model.num_samples < 600  # older samples dropped at the refit
    after = model.params
    assert before is not None and after is not None
    assert (after.k_b, after.k_s) == (before.k_b, before.k_s)  # structure kept
    bt, st = steps(300, seed=4)
    rel = np.abs(model.predict_many(bt, st) / (2.0 * H100_LIKE.predict_many(bt, st)) - 1)
    assert rel.max() < 0.02


def test_gate_falls_back_to_a_full_refit_when_the_shape_changes() -> None:
    model = StructuralStepModel()
    b, s = steps(400, seed=5)
    other = StructuralParams(p_max=10.0, k_b=0.5, k_s=0.05, w1=0.5, tau_b=1.0, tau_s=0.05)
    kinds = []
    for k in range(400):
        params = SATURATING if k < 100 else other
        model.add_sample(int(b[k]), int(s[k]), float(params.predict_many(b[k], s[k])))
        kinds.append(model.maybe_refit())
    assert RefitKind.FULL in kinds
    bt, st = steps(200, seed=6)
    rel = np.abs(model.predict_many(bt, st) / other.predict_many(bt, st) - 1)
    assert rel.max() < 0.05


@pytest.mark.parametrize("params", [H100_LIKE, SATURATING], ids=["h100-like", "saturating"])
def test_solve_for_token_budget_inverts_predict(params: StructuralParams) -> None:
    model = trained(params)
    for b in (1, 8, 64):
        floor = model.predict(b, 0)
        for target in (floor * 1.05, floor + 10, floor + 100, 300.0):
            if target <= floor:
                continue
            s = model.solve_for_token_budget(b, target)
            assert 0 < s < 1e7
            assert model.predict(b, s) == pytest.approx(target, rel=1e-6)
        assert model.solve_for_token_budget(b, floor * 0.9) == 0.0
    assert model.solve_for_token_budget(1, 1e12, max_tokens=8192) == 8192.0


def test_solve_for_token_budget_on_the_linear_fallback() -> None:
    model = StructuralStepModel()
    assert model.solve_for_token_budget(4, DEFAULT_LINEAR_C_MS + 21.5) == pytest.approx(1000)
    assert model.solve_for_token_budget(4, 1.0) == 0.0


@pytest.mark.parametrize("params", [H100_LIKE, SATURATING], ids=["h100-like", "saturating"])
@pytest.mark.parametrize("batch_requests", [1, 30])
def test_as_quadratic_approximates_predict(params: StructuralParams, batch_requests: int) -> None:
    model = trained(params)
    a, b, c = model.as_quadratic(batch_requests, 8192)
    s = np.arange(1, 8193, dtype=float)
    exact = model.predict_many(np.full_like(s, batch_requests), s)
    assert np.abs((a * s * s + b * s + c) / exact - 1).max() < 0.05
    assert model.as_quadratic(batch_requests, 8192) == (a, b, c)  # cached


def test_reset_and_validation() -> None:
    model = trained(SATURATING)
    version = model.version
    model.reset()
    assert model.version > version
    assert model.num_samples == 0 and model.mode is StepModelMode.DEFAULT
    assert not model.fitted and model.params is None
    with pytest.raises(ValueError):
        model.add_sample(0, 10, 5.0)
    with pytest.raises(ValueError):
        model.add_sample(1, 10, 0.0)
    with pytest.raises(ValueError):
        model.add_sample(1, 10, math.nan)
    with pytest.raises(ValueError):
        StructuralStepModel(refit_window=2000)
    with pytest.raises(ValueError):
        model.as_quadratic(1, 0)
    capped = StructuralStepModel(max_sample_ms=300)
    assert not capped.add_sample(1, 8000, 550.0)
    assert capped.num_samples == 0


def test_bounded_buffer_and_fixed_structure_refit() -> None:
    model = trained(SATURATING, n=400, max_samples=100)
    assert model.num_samples == 100
    b, s = steps(50)
    p = fit_structural(b, s, 3.0 * SATURATING.predict_many(b, s), k_b=SATURATING.k_b,
                       k_s=SATURATING.k_s)
    assert p is not None and p.w == pytest.approx(3.0 * SATURATING.w, rel=1e-6)
    assert p.tau_b == pytest.approx(3.0 * SATURATING.tau_b, rel=1e-5)


def test_bank_matches_the_predictor_bank_interface() -> None:
    bank = StructuralBank(20, shared=True, max_tokens=8192)
    truth = StructuralParams(p_max=42.9, k_b=9.6, k_s=0.00122, w1=0.296, tau_b=0.0,
                             tau_s=0.0163)
    tokens = np.linspace(200, 8192, 30).astype(int)
    samples = [ProfilingSample(f"i{k % 2}", int(x), float(truth.predict_many(1, x)))
               for k, x in enumerate(tokens)]
    bank.add_all(samples[:10])
    assert bank.maybe_refit_all() == 0
    a, b, c = bank.coefficient_arrays(["i0", "i1"])
    assert np.all(np.isnan(a)) and np.all(np.isnan(c))
    bank.add_all(samples[10:])
    assert bank.maybe_refit_all() == 1
    a, b, c = bank.coefficient_arrays(["i0", "i1", "new"])  # shared: one model for all
    assert np.all(np.isfinite(a)) and a[0] == a[2]
    x = np.array([512.0, 4096.0, 8192.0])
    assert np.allclose(a[0] * x * x + b[0] * x + c[0], truth.predict_many(1, x), rtol=0.05)
    computed = predict_computed_prefill_tokens([100.0, 0.0, 100.0], [20000, 5000, 0],
                                               [0, 0, 0], a, b, c, 8192)
    assert computed[0] > 0 and computed[1] == 0 and computed[2] == 0
    with pytest.raises(ValueError):
        bank.reset("i0")
    bank.reset()
    assert bank.get("i0") is None


def test_bank_per_instance() -> None:
    bank = StructuralBank(5)
    bank.add_all(ProfilingSample("i0", 100 * (k + 1), 5.0 + 2.0 * (k + 1)) for k in range(6))
    bank.maybe_refit_all()
    assert bank.get("i0") is not None and bank.get("i1") is None
    a, _, _ = bank.coefficient_arrays(["i0", "i1"])
    assert np.isfinite(a[0]) and np.isnan(a[1])
    bank.reset("i0")
    assert bank.get("i0") is None


@pytest.mark.parametrize(("choice", "bank_type"), [("quadratic", PredictorBank),
                                                   ("structural", StructuralBank)])
def test_step_predictor_setting_picks_the_bank(choice: str, bank_type: type) -> None:
    settings = SchedulerSettings(enable_predictor_enhanced_scheduling=True,
                                 step_predictor=choice)  # type: ignore[arg-type]
    dispatcher = make_dispatcher("load-balance", settings, random.Random(0))
    [feature] = [f for f in dispatcher.features if isinstance(f, PredictorEnhancement)]
    assert type(feature.bank) is bank_type
